"""`lora-tune`: thin click commands, each calling one library function."""

from __future__ import annotations

import os
import sys

import click

from lora_tune.data.formats import PREF_FORMATS
from lora_tune.errors import LoraTuneError


def _fail(e: Exception) -> None:
    click.echo(f"{click.style('error:', fg='red', bold=True)} {e}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora_tune")
def main() -> None:
    """Fine-tune an open LLM on one GPU (or a CPU) with LoRA / QLoRA."""
    _quiet_known_noise()


# commands that train run under a lean malloc (lora_tune.allocator): the first words of their command lines
TRAINING_COMMANDS = (("train",), ("demo",), ("sweep",), ("recipes", "run"))


def entry() -> None:
    """The `lora-tune` program: `main`, re-executed first under tcmalloc or mimalloc for the commands
    that train (LORA_TUNE_ALLOCATOR=system keeps glibc's malloc)."""
    from lora_tune.allocator import reexec_under

    words = [a for a in sys.argv[1:] if not a.startswith("-")]
    if any(tuple(words[: len(c)]) == c for c in TRAINING_COMMANDS):
        try:
            reexec_under()
        except LoraTuneError as e:
            _fail(e)
    main()


def _quiet_known_noise() -> None:
    """Silence third-party messages that are harmless here and would hide our own output."""
    import logging
    import warnings

    # peft still calls the pre-v5 checkpointing API name
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    # bnb tries to fetch an optional CPU kernel from the hub at import; the built-in kernel is used instead
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not sys.stderr.isatty():  # "Loading weights" bars redrawn into a log file are hundreds of lines
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.disable_progress_bar()


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="continue from the latest checkpoint in output_dir")
@click.option("--overwrite", is_flag=True, help="delete an existing run in output_dir first")
@click.option(
    "--nproc",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="train on this many processes through torchrun, one per GPU (DDP; FSDP with train.distributed=fsdp)",
)
def train(config: str, overrides: tuple[str, ...], resume: bool, overwrite: bool, nproc: int) -> None:
    """Train a LoRA adapter: lora-tune train CONFIG.yaml [section.key=value ...]."""
    from lora_tune.config import load_config

    try:
        cfg = load_config(config, overrides)  # a bad config fails here, before any process starts
        if nproc > 1 and "WORLD_SIZE" not in os.environ:
            _launch(cfg, nproc, ["train", config, *overrides, *(["--resume"] if resume else [])], overwrite)
        from lora_tune.finetune import finetune as run

        run(cfg, resume=resume, overwrite=overwrite)
    except LoraTuneError as e:
        _fail(e)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of several: done, without teardown
        from lora_tune.train.distributed import leave

        leave(0)


def _launch(cfg, nproc: int, args: list[str], overwrite: bool) -> None:
    """Become torchrun, starting `nproc` training processes (each runs `lora-tune train` as one rank)."""
    import torch

    from lora_tune.train.distributed import torchrun_command

    if cfg.train.device != "cpu" and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise LoraTuneError(f"--nproc {nproc}, but {torch.cuda.device_count()} GPU(s) are visible; one process per GPU")
    command = torchrun_command(nproc, [*args, *(["--overwrite"] if overwrite else [])])
    sys.stdout.flush()
    os.execv(command[0], command)


@main.command()
@click.option("--output-dir", default="runs/demo", show_default=True, help="run directory")
@click.argument("overrides", nargs=-1)
def demo(output_dir: str, overrides: tuple[str, ...]) -> None:
    """QLoRA-tune the embedded SmolLM2-135M on a shipped sample and show a before/after answer."""
    from lora_tune.demo import run_demo

    try:
        run_demo(output_dir, overrides)
    except LoraTuneError as e:
        _fail(e)


@main.group()
def data() -> None:
    """Inspect and validate training data."""


@data.command("inspect")
@click.argument("source")
@click.option(
    "--model",
    "model_source",
    default="builtin:smollm2-135m",
    show_default=True,
    help="whose tokenizer and chat template to use (only the tokenizer is loaded)",
)
@click.option(
    "--format",
    "fmt",
    default="auto",
    show_default=True,
    type=click.Choice(
        [
            "auto",
            "text",
            "prompt_completion",
            "alpaca",
            "sharegpt",
            "messages",
            "preference",
            "openai_preference",
            "kto",
        ]
    ),
)
@click.option("--max-length", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--max-prompt-length", default=None, type=click.IntRange(min=1), help="preference data: prompt tokens kept"
)
@click.option(
    "--truncation", default="truncate", show_default=True, type=click.Choice(["truncate", "keep_end", "drop"])
)
@click.option(
    "--loss-on", default="assistant", show_default=True, type=click.Choice(["assistant", "completion", "all"])
)
@click.option("--chat-template", default=None, help="chatml, llama-3, alpaca or a .jinja file")
@click.option("--sample", "sample_index", default=0, show_default=True, help="which record to show rendered")
@click.option("--batch-size", default=4, show_default=True, help="micro-batch size the batching advice is for")
def data_inspect(
    source: str,
    model_source: str,
    fmt: str,
    max_length: int,
    truncation: str,
    loss_on: str,
    chat_template: str | None,
    sample_index: int,
    batch_size: int,
    max_prompt_length: int | None,
) -> None:
    """Validate every record of SOURCE (file, folder or hub id), print statistics and one rendered sample.

    Preference data (pairs or KTO records, detected from the first record) gets pair statistics and one
    rendered pair. Exits 1 if any record is invalid.
    """
    from rich.console import Console

    from lora_tune.config import ModelCfg
    from lora_tune.data.doctor import inspect_data, print_report
    from lora_tune.data.pair_doctor import inspect_pairs, looks_like_preferences, print_pair_report
    from lora_tune.data.templates import resolve_chat_template
    from lora_tune.models import load_tokenizer, resolve_source

    console = Console(soft_wrap=True)
    try:
        tok = load_tokenizer(resolve_source(model_source, log=console.print), ModelCfg(source=model_source))
        template = resolve_chat_template(tok, chat_template)
        if fmt in PREF_FORMATS or (fmt == "auto" and looks_like_preferences(source)):
            pairs = inspect_pairs(source, tok, max_length, max_prompt_length, template, sample_index)
            print_pair_report(pairs, tok, console)
            sys.exit(0 if pairs.ok else 1)
        rep = inspect_data(
            source,
            tok,
            fmt,
            max_length,
            truncation,
            loss_on,
            template,
            sample_index=sample_index,
            batch_size=batch_size,
        )
    except LoraTuneError as e:
        _fail(e)
    print_report(rep, tok, console)
    sys.exit(0 if rep.ok else 1)


def _model_options(f):
    """--model / --adapter / --run / --quantization / --device, shared by eval, generate and chat."""
    f = click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))(f)
    f = click.option(
        "--quantization",
        default=None,
        type=click.Choice(["nf4", "fp4", "int8", "bf16", "fp16", "fp32"]),
        help="base weights (default: as trained for an adapter, else bf16)",
    )(f)
    f = click.option("--run", "run_dir", default=None, help="a lora-tune run directory (uses its adapter/)")(f)
    f = click.option("--adapter", default=None, help="an adapter folder")(f)
    return click.option(
        "--model",
        "model_source",
        default=None,
        help="base model: hub id, local folder or builtin:smollm2-135m (default: the adapter's)",
    )(f)


def _sampling_options(f):
    f = click.option("--repetition-penalty", default=1.0, show_default=True, type=float)(f)
    f = click.option("--top-p", default=1.0, show_default=True, type=float)(f)
    f = click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy")(f)
    return click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))(f)


@main.command("eval")
@_model_options
@click.option("--data", default=None, help="chat / instruction / prompt-completion records (or pairs) to score")
@click.option("--text", default=None, help="raw text (file or folder) for strided perplexity")
@click.option(
    "--metrics",
    default="perplexity",
    show_default=True,
    help="comma list of: perplexity, f1, exact_match, rouge_l, accuracy, macro_f1; or preference_accuracy (pairs)",
)
@click.option("--labels", default=None, help="comma list of class labels (accuracy, macro_f1)")
@click.option("--label-mode", default="likelihood", show_default=True, type=click.Choice(["likelihood", "generate"]))
@click.option("--compare", is_flag=True, help="also evaluate the base model alone and report deltas")
@click.option("--max-samples", default=None, type=click.IntRange(min=1))
@click.option("--max-length", default=2048, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--max-prompt-length", default=None, type=click.IntRange(min=1), help="pairs: prompt tokens kept (its end)"
)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--window", default=None, type=click.IntRange(min=2), help="strided perplexity window (default: context)")
@click.option(
    "--stride", default=None, type=click.IntRange(min=1), help="strided perplexity stride (default: window/2)"
)
@click.option("--out", default=None, help="write the report here as JSON (and .md beside it)")
@_sampling_options
def eval_cmd(
    model_source,
    adapter,
    run_dir,
    quantization,
    device,
    data,
    text,
    metrics,
    labels,
    label_mode,
    compare,
    max_samples,
    max_length,
    max_prompt_length,
    batch_size,
    window,
    stride,
    out,
    max_new_tokens,
    temperature,
    top_p,
    repetition_penalty,
) -> None:
    """Score a model (base, adapter, or both with --compare) with perplexity and task metrics."""
    from rich.console import Console

    from lora_tune.evaluate.generate import Sampling
    from lora_tune.evaluate.run import EvalSettings, ModelSpec, print_report, run_eval, write_report

    console = Console(soft_wrap=True)
    try:
        spec = ModelSpec.resolve(model_source, adapter, run_dir, quantization)
        settings = EvalSettings(
            data=data,
            text=text,
            metrics=[m.strip() for m in metrics.split(",") if m.strip()],
            labels=[x.strip() for x in labels.split(",")] if labels else None,
            label_mode=label_mode,
            max_samples=max_samples,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            batch_size=batch_size,
            window=window,
            stride=stride,
            sampling=Sampling(max_new_tokens, temperature, top_p, repetition_penalty),
        )
        report = run_eval(spec, settings, compare=compare, device=device, console=console)
    except LoraTuneError as e:
        _fail(e)
    print_report(report, console)
    if out:
        paths = write_report(report, out)
        console.print(f"report written to {paths[0]} and {paths[1]}")


def _load_chat_model(model_source, adapter, run_dir, quantization, device):
    from lora_tune.evaluate.run import ModelSpec, load_for_inference

    spec = ModelSpec.resolve(model_source, adapter, run_dir, quantization)
    return load_for_inference(spec, device)[:2]


@main.command()
@_model_options
@click.option("--prompt", required=True, help="the user message")
@click.option("--system", default=None, help="an optional system message")
@_sampling_options
def generate(
    model_source,
    adapter,
    run_dir,
    quantization,
    device,
    prompt,
    system,
    max_new_tokens,
    temperature,
    top_p,
    repetition_penalty,
) -> None:
    """Answer one prompt with the chat template, streaming to the terminal."""
    from lora_tune.evaluate.generate import Sampling, stream_reply

    try:
        model, tok = _load_chat_model(model_source, adapter, run_dir, quantization, device)
    except LoraTuneError as e:
        _fail(e)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        stream_reply(model, tok, msgs, Sampling(max_new_tokens, temperature, top_p, repetition_penalty), click.echo)
    except RuntimeError as e:
        _fail(e)


@main.command()
@_model_options
@click.option("--system", default=None, help="an optional system message")
@_sampling_options
def chat(
    model_source, adapter, run_dir, quantization, device, system, max_new_tokens, temperature, top_p, repetition_penalty
) -> None:
    """Interactive multi-turn chat (keeps history; /reset clears it, /exit or Ctrl-D quits)."""
    from lora_tune.evaluate.generate import Sampling, stream_reply, trim_history

    try:
        model, tok = _load_chat_model(model_source, adapter, run_dir, quantization, device)
    except LoraTuneError as e:
        _fail(e)
    sampling = Sampling(max_new_tokens, temperature, top_p, repetition_penalty)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    click.echo("chat: /reset clears the history, /exit quits")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        history, dropped = trim_history(tok, history, context, max_new_tokens)
        if dropped:
            click.echo(f"(note: dropped the {dropped} oldest exchange(s) to fit the model's {context}-token context)")
        click.echo("assistant> ", nl=False)
        try:
            reply = stream_reply(model, tok, history, sampling, lambda s, **kw: click.echo(s, **kw))
        except RuntimeError as e:  # say so and keep the session; the unanswered turn is taken back
            click.echo(f"{click.style('error:', fg='red', bold=True)} {e}", err=True)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


@main.command()
@click.option("--adapter", default=None, help="adapter folder")
@click.option("--run", "run_dir", default=None, help="a lora-tune run directory (uses its adapter/)")
@click.option("--out", required=True, help="output folder for the merged model")
@click.option("--base", default=None, help="base model (default: the one the adapter was trained on)")
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "fp16"]))
@click.option(
    "--base-weights",
    default="original",
    show_default=True,
    type=click.Choice(["original", "dequantized"]),
    help="merge into the original 16-bit weights, or into the de-quantized NF4 weights trained against",
)
@click.option("--no-check", is_flag=True, help="skip the fidelity check")
def merge(adapter, run_dir, out, base, dtype, base_weights, no_check) -> None:
    """Merge an adapter into its base: a standard 16-bit HF folder, with a fidelity check."""
    from pathlib import Path

    from lora_tune.merge import merge_adapter

    if not (adapter or run_dir):
        _fail(LoraTuneError("say which adapter to merge: --adapter DIR or --run DIR"))
    try:
        rep = merge_adapter(
            adapter or Path(run_dir) / "adapter", out, base, dtype, base_weights, check=not no_check, log=click.echo
        )
    except LoraTuneError as e:
        _fail(e)
    click.echo(
        f"merged {rep.merged_tensors} weights into {rep.base_weights} {rep.base} -> {rep.out_dir} ({rep.dtype}); "
        f"peak memory {rep.peak_rss_mb:,.0f} MB for a {rep.model_mb:,.0f} MB model"
    )
    for w in rep.warnings:
        click.echo(click.style(f"WARNING: {w}", fg="red", bold=True), err=True)


@main.command("merge-adapters")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--weights", required=True, help="one weight per adapter, comma separated (e.g. 0.7,0.3)")
@click.option(
    "--method",
    default="linear",
    show_default=True,
    type=click.Choice(["linear", "cat", "ties", "dare_linear", "dare_ties", "svd"]),
)
@click.option("--density", default=None, type=float, help="fraction kept by ties/dare (default 0.5)")
@click.option("--base", default=None, help="base model (default: the adapters' own)")
@click.option("--out", required=True, help="output adapter folder")
def merge_adapters(adapters, weights, method, density, base, out) -> None:
    """Combine adapters of one base model into one adapter (peft's weighted-adapter methods)."""
    from lora_tune.combine import combine_adapters

    try:
        w = [float(x) for x in weights.split(",")]
    except ValueError:
        _fail(LoraTuneError(f"--weights {weights!r}: give numbers separated by commas, e.g. 0.5,0.5"))
    try:
        path = combine_adapters(list(adapters), w, method, out, density, base)
    except LoraTuneError as e:
        _fail(e)
    click.echo(f"combined {len(adapters)} adapters with {method} into {path}")


@main.command("export-gguf")
@click.argument("merged_dir")
@click.option("--out", required=True, help="output .gguf file")
@click.option("--type", "qtype", default="f16", show_default=True, type=click.Choice(["f16", "q8_0"]))
@click.option("--no-verify", is_flag=True, help="skip reading the file back and comparing logits")
def export_gguf_cmd(merged_dir, out, qtype, no_verify) -> None:
    """Write a merged Llama-family model as GGUF (llama.cpp / Ollama), verified by loading it back."""
    from lora_tune.export_gguf import export_gguf

    try:
        export_gguf(merged_dir, out, qtype, verify=not no_verify, log=click.echo)
    except LoraTuneError as e:
        _fail(e)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option(
    "--gpu-memory",
    default=None,
    help="memory budget, e.g. 12GiB (a bare number means GiB): does it fit, and what would auto-fit choose",
)
@click.option(
    "--device",
    default="cuda",
    show_default=True,
    type=click.Choice(["cuda", "cpu"]),
    help="cuda adds the CUDA context overhead",
)
@click.option(
    "--gpus",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="per-GPU memory when training on this many (train.distributed: ddp or fsdp)",
)
def plan(config: str, overrides: tuple[str, ...], gpu_memory: str | None, device: str, gpus: int) -> None:
    """Predict peak training memory from config.json alone (no weights), and fit a budget."""
    from rich.console import Console

    from lora_tune.bench.plan import GIB, ModelShape, auto_fit, estimate, load_model_config, parse_size
    from lora_tune.config import load_config

    console = Console(soft_wrap=True)
    try:
        cfg = load_config(config, overrides)
        shape = ModelShape.from_config(load_model_config(cfg.model.source))
        result = estimate(shape, cfg, device, gpus=gpus)
        budget = parse_size(gpu_memory) if gpu_memory else None
    except LoraTuneError as e:
        _fail(e)
    _plan_table(console, cfg, result)
    if budget is None:
        return
    if gpu_memory.strip().replace(".", "", 1).isdigit():
        console.print(f"(--gpu-memory {gpu_memory} read as {gpu_memory} GiB)")
    if gpus > 1:  # auto-fit plans one process (train.auto_fit is refused with --nproc)
        verdict = "[green]fits[/]" if result.total <= budget else "[red]does not fit[/]"
        console.print(f"{verdict} in {budget / GIB:.2f} GiB per GPU ({gpus} GPUs, {cfg.train.distributed})")
        return
    if result.total <= budget:
        console.print(
            f"[green]fits[/] in {budget / GIB:.2f} GiB: {(budget - result.total) / GIB:.2f} GiB of headroom; "
            "auto-fit would keep these settings"
        )
        return
    console.print(f"[red]does not fit[/] in {budget / GIB:.2f} GiB: {(result.total - budget) / GIB:.2f} GiB over")
    try:
        fitted, plan = auto_fit(shape, cfg, budget, device)
    except LoraTuneError as e:
        _fail(e)
    t = fitted.train
    console.print(
        f"auto-fit (train.auto_fit=true) would choose: micro-batch {t.micro_batch_size} x grad_accum "
        f"{t.grad_accum}, checkpointing {'on' if t.gradient_checkpointing else 'off'}, max_length "
        f"{fitted.data.max_length}: {plan.total / GIB:.2f} GiB, {(budget - plan.total) / GIB:.2f} GiB of headroom"
    )
    for note in plan.notes:
        console.print(f"  {note}")


def _plan_table(console, cfg, result) -> None:
    from rich.table import Table

    from lora_tune.bench.plan import GIB

    gpus = f", per GPU of {result.gpus} ({cfg.train.distributed})" if result.gpus > 1 else ""
    table = Table(
        title=f"{cfg.model.source}: {cfg.model.quantization}, LoRA r={cfg.lora.r}, micro-batch "
        f"{result.micro_batch_size} x {result.max_length} tokens, checkpointing "
        f"{'on' if result.gradient_checkpointing else 'off'}{gpus}"
    )
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for name, b in result.parts.items():
        table.add_row(name, f"{b / GIB:.3f}")
    table.add_row("[bold]total[/]", f"[bold]{result.total / GIB:.3f}[/]")
    console.print(table)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("grid_items", nargs=-1)
@click.option("--grid", "grid_opts", multiple=True, help="a dimension, section.key=v1,v2 (repeatable)")
@click.option("--set", "fixed", multiple=True, help="a fixed override, section.key=value (repeatable)")
@click.option("--budget-steps", default=None, type=click.IntRange(min=1), help="optimizer steps per run")
@click.option("--out", default="runs/sweep", show_default=True, help="folder for the runs and the table")
def sweep(config, grid_items, grid_opts, fixed, budget_steps, out) -> None:
    """Train a grid of settings for the same step budget and rank them by validation.

    lora-tune sweep CONFIG --grid train.lr=1e-4,2e-4 lora.r=8,16 --budget-steps 100
    """
    from lora_tune.sweep import parse_grid, run_sweep

    try:
        run_sweep(config, parse_grid([*grid_opts, *grid_items]), out, budget_steps, tuple(fixed))
    except LoraTuneError as e:
        _fail(e)


@main.group()
def recipes() -> None:
    """Ready-made fine-tunes for common domains (recipes/<name>/)."""


_recipes_dir = click.option(
    "--recipes-dir", default=None, help="folder of recipes (default: $LORA_TUNE_RECIPES, ./recipes, the checkout's)"
)


@recipes.command("list")
@_recipes_dir
def recipes_list(recipes_dir) -> None:
    """Show every recipe with its task and headline metric."""
    from rich.console import Console
    from rich.table import Table

    from lora_tune.recipes.registry import find_recipes

    try:
        found = find_recipes(recipes_dir)
    except LoraTuneError as e:
        _fail(e)
    table = Table(title=f"recipes ({len(found)})")
    for col in ("name", "task", "metric"):
        table.add_column(col, no_wrap=col != "task")
    for r in found.values():
        table.add_row(r.name, r.title, r.metric)
    Console(soft_wrap=True).print(table)
    click.echo("run one: lora-tune recipes run NAME [--smoke] [section.key=value ...]")


@recipes.command("build")
@click.argument("name")
@click.option("--out", default=None, help="output folder (default: the recipe's data/)")
@click.option("--smoke", is_flag=True, help="a small subset, as used by --smoke runs")
@_recipes_dir
def recipes_build(name, out, smoke, recipes_dir) -> None:
    """Build a recipe's data files (deterministic; sources are fetched once and checked by SHA-256)."""
    from lora_tune.recipes.registry import get_recipe
    from lora_tune.recipes.run import build_data

    try:
        build_data(get_recipe(name, recipes_dir), out, smoke=smoke, log=click.echo)
    except LoraTuneError as e:
        _fail(e)


@recipes.command("run")
@click.argument("name")
@click.argument("overrides", nargs=-1)
@click.option("--smoke", is_flag=True, help="a few steps on a tiny random model and a data subset (for tests)")
@click.option("--merge", is_flag=True, help="merge the adapter into a 16-bit model in <run>/merged")
@click.option("--output-dir", default=None, help="run directory (default: runs/recipes/NAME)")
@click.option("--resume", is_flag=True, help="continue from the latest checkpoint in the run directory")
@click.option("--overwrite", is_flag=True, help="delete an existing run in the run directory first")
@_recipes_dir
def recipes_run(name, overrides, smoke, merge, output_dir, resume, overwrite, recipes_dir) -> None:
    """Build data, train, evaluate base vs tuned, merge if asked, and write report.md/.json.

    lora-tune recipes run sentiment-movies train.lr=5e-4 --overwrite
    """
    from lora_tune.recipes.registry import get_recipe
    from lora_tune.recipes.run import run_recipe

    try:
        run_recipe(get_recipe(name, recipes_dir), overrides, smoke, merge, output_dir, resume, overwrite)
    except LoraTuneError as e:
        _fail(e)


@main.command()
@click.option("--out", default="benchmarks", show_default=True, help="folder for results/*.json, RESULTS.md, PNG")
@click.option("--reps", default=2, show_default=True, type=click.IntRange(min=1), help="runs per tool and setting")
@click.option("--steps", default=6, show_default=True, type=click.IntRange(min=1), help="timed steps per run")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=1), help="untimed first steps")
@click.option("--only", multiple=True, help="run only these configurations (repeatable), e.g. --only qlora-nf4")
@click.option(
    "--kinds", default="native,avx2", show_default=True, help="CPU kinds to run on: native, avx2 (AVX2 kernels only)"
)
@click.option("--quality", is_flag=True, help="task metrics at equal steps over seeds instead of speed and memory")
@click.option("--seeds", default="0,1,2", show_default=True, help="--quality: comma-separated seeds")
@click.option("--tasks", default=None, help="--quality: comma-separated tasks (default: all)")
@click.option("--ablate", is_flag=True, help="--quality: add runs with one lora_tune default changed at a time")
def bench(out, reps, steps, warmup, only, kinds, quality, seeds, tasks, ablate) -> None:
    """lora_tune vs TRL SFTTrainer + PEFT side by side: tokens/s, peak memory, MFU, padding, val loss;
    with --quality, task metrics (macro-F1, exact match, perplexity) over several seeds."""
    import importlib.util
    from pathlib import Path

    no_trl = LoraTuneError("the benchmark runs TRL side by side: pip install -e '.[bench]' (adds trl)")
    if quality:
        from lora_tune.bench.quality import ABLATIONS, run_quality
        from lora_tune.bench.quality_data import TASKS

        names = [t.strip() for t in tasks.split(",")] if tasks else None
        unknown = sorted(set(names or []) - {t.name for t in TASKS})
        if unknown:
            _fail(LoraTuneError(f"no task named {', '.join(unknown)}; choose from {', '.join(t.name for t in TASKS)}"))
        try:
            seed_list = tuple(int(x) for x in seeds.split(","))
        except ValueError:
            _fail(LoraTuneError(f"--seeds {seeds!r}: give whole numbers separated by commas, e.g. --seeds 0,1,2"))
        if importlib.util.find_spec("trl") is None:
            _fail(no_trl)
        try:
            run_quality(Path(out), names, seed_list, list(ABLATIONS) if ablate else None, log=click.echo)
        except LoraTuneError as e:
            _fail(e)
        return
    from lora_tune.bench.compare import CPU_KINDS, MATRIX, compare

    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip())
    if not kind_list or set(kind_list) - set(CPU_KINDS):
        _fail(LoraTuneError(f"--kinds {kinds!r}: choose from {', '.join(CPU_KINDS)}"))

    matrix = [m for m in MATRIX if not only or m.name in only]
    if not matrix:
        _fail(
            LoraTuneError(f"no configuration named {', '.join(only)}; choose from {', '.join(m.name for m in MATRIX)}")
        )
    if importlib.util.find_spec("trl") is None:
        _fail(no_trl)
    compare(Path(out), reps=reps, steps=steps, warmup=warmup, matrix=matrix, kinds=kind_list, log=click.echo)


@main.command()
@click.option(
    "--model",
    "model_source",
    default=None,
    help="base model (default: the one the adapters were trained on, else builtin:smollm2-135m)",
)
@click.option(
    "--adapter",
    "adapter_items",
    multiple=True,
    metavar="NAME=DIR",
    help="serve this adapter (or run folder) as model NAME (repeatable)",
)
@click.option(
    "--adapters-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="every adapter or run folder inside is a model named after it, found without a restart",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0 opens it to others)"
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port")
@click.option(
    "--api-key",
    envvar="LORA_TUNE_API_KEY",
    default=None,
    help="require 'Authorization: Bearer KEY' on every route but /health [env: LORA_TUNE_API_KEY]",
)
@click.option(
    "--quantization",
    default=None,
    type=click.Choice(["nf4", "fp4", "int8", "bf16", "fp16", "fp32"]),
    help="base weights (default: as the first adapter was trained, else bf16)",
)
@click.option(
    "--base-weights",
    default="original",
    show_default=True,
    type=click.Choice(["original", "dequantized"]),
    help="dequantized: 16-bit weights rounded as the 4-bit base a QLoRA adapter was trained on had them",
)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option(
    "--cpu-dequantize",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "true", "false"]),
    help="a 4-bit base on the CPU: de-quantize it once (16-bit speed, same weights); auto: when it fits in memory",
)
@click.option(
    "--max-adapters",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="adapters kept in memory; the least recently used is unloaded beyond this",
)
@click.option(
    "--max-batch",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="sequences generated together in one batch",
)
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="sequences waiting for a place; beyond this requests get 503 with Retry-After",
)
@click.option(
    "--request-timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="seconds a request may take from arrival to its last token",
)
@click.option(
    "--max-body-mb",
    default=4.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="largest request body accepted (413 beyond)",
)
@click.option(
    "--default-max-tokens",
    default=512,
    show_default=True,
    type=click.IntRange(min=1),
    help="reply length when a request sets no max_tokens (always capped by the context length)",
)
@click.option(
    "--data-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="fine-tuning service state: uploaded files, the job database, job runs "
    "[default: ~/.local/share/lora_tune/service]",
)
@click.option("--no-jobs", is_flag=True, help="serve models only: no /v1/files or /v1/fine_tuning routes")
@click.option(
    "--runs-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="a folder of run folders to show on the dashboard at /dashboard (read only)",
)
def serve(
    model_source,
    adapter_items,
    adapters_dir,
    host,
    port,
    api_key,
    quantization,
    base_weights,
    device,
    cpu_dequantize,
    max_adapters,
    max_batch,
    max_queue,
    request_timeout,
    max_body_mb,
    default_max_tokens,
    data_dir,
    no_jobs,
    runs_dir,
) -> None:
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models) for a base model
    and many adapters at once, batched and streaming, with OpenAI's fine-tuning API (/v1/files,
    /v1/fine_tuning/jobs) training on this machine. Needs the serve extra: pip install 'lora_tune[serve]'."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        _fail(LoraTuneError("lora-tune serve needs FastAPI and uvicorn: pip install 'lora_tune[serve]'"))
    from lora_tune.server.adapters import parse_adapter_args
    from lora_tune.server.app import Limits
    from lora_tune.server.serve import DEFAULT_DATA_DIR, ServeOptions
    from lora_tune.server.serve import serve as run_server

    try:
        opts = ServeOptions(
            model=model_source,
            adapters=parse_adapter_args(adapter_items),
            adapters_dir=Path(adapters_dir) if adapters_dir else None,
            host=host,
            port=port,
            quantization=quantization,
            base_weights=base_weights,
            device=device,
            cpu_dequantize={"true": True, "false": False}.get(cpu_dequantize, "auto"),
            max_adapters=max_adapters,
            max_batch=max_batch,
            max_queue=max_queue,
            limits=Limits(
                api_key or None,
                int(max_body_mb * 2**20),
                request_timeout=request_timeout,
                default_max_tokens=default_max_tokens,
            ),
            data_dir=None if no_jobs else Path(data_dir or DEFAULT_DATA_DIR).expanduser(),
            runs_dir=Path(runs_dir).expanduser() if runs_dir else None,
        )
        run_server(opts, log=lambda s: click.echo(s, err=True))
    except LoraTuneError as e:
        _fail(e)


@main.command("config-reference")
def config_reference() -> None:
    """Print every config key with its default and meaning (markdown)."""
    from lora_tune.config import reference

    click.echo("| key | default | meaning |\n|---|---|---|")
    for key, default, doc in reference():
        click.echo(f"| `{key}` | `{default}` | {doc} |")


if __name__ == "__main__":
    entry()
