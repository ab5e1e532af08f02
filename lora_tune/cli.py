"""`lora-tune`: thin click commands, each calling one library function."""

from __future__ import annotations

import sys

import click

from lora_tune.errors import LoraTuneError


def _fail(e: LoraTuneError) -> None:
    click.echo(f"{click.style('error:', fg='red', bold=True)} {e}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora_tune")
def main() -> None:
    """Fine-tune an open LLM on one GPU (or a CPU) with LoRA / QLoRA."""
    _quiet_known_noise()


def _quiet_known_noise() -> None:
    """Silence third-party messages that are harmless here and would hide our own output."""
    import logging
    import warnings

    # peft still calls the pre-v5 checkpointing API name
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    # bnb's CPU 4-bit matmul has no registered autograd kernel; its gradients are checked against a
    # dense model in tests/test_models.py::test_nf4_lora_gradients_match_dequantized_model
    warnings.filterwarnings("ignore", message="bitsandbytes::gemv_4bit: an autograd kernel was not registered")
    # bnb tries to fetch an optional CPU kernel from the hub at import; the built-in kernel is used instead
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="continue from the latest checkpoint in output_dir")
@click.option("--overwrite", is_flag=True, help="delete an existing run in output_dir first")
def train(config: str, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Train a LoRA adapter: lora-tune train CONFIG.yaml [section.key=value ...]."""
    from lora_tune.config import load_config
    from lora_tune.train.loop import train as run

    try:
        cfg = load_config(config, overrides)
        run(cfg, resume=resume, overwrite=overwrite)
    except LoraTuneError as e:
        _fail(e)


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
    type=click.Choice(["auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages"]),
)
@click.option("--max-length", default=1024, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--truncation", default="truncate", show_default=True, type=click.Choice(["truncate", "keep_end", "drop"])
)
@click.option(
    "--loss-on", default="assistant", show_default=True, type=click.Choice(["assistant", "completion", "all"])
)
@click.option("--chat-template", default=None, help="chatml, llama-3, alpaca or a .jinja file")
@click.option("--sample", "sample_index", default=0, show_default=True, help="which record to show rendered")
def data_inspect(
    source: str,
    model_source: str,
    fmt: str,
    max_length: int,
    truncation: str,
    loss_on: str,
    chat_template: str | None,
    sample_index: int,
) -> None:
    """Validate every record of SOURCE (file, folder or hub id), print statistics and one rendered sample.

    Exits 1 if any record is invalid.
    """
    from rich.console import Console

    from lora_tune.config import ModelCfg
    from lora_tune.data.doctor import inspect_data, print_report
    from lora_tune.data.templates import resolve_chat_template
    from lora_tune.models import load_tokenizer, resolve_source

    console = Console(soft_wrap=True)
    try:
        tok = load_tokenizer(resolve_source(model_source, log=console.print), ModelCfg(source=model_source))
        template = resolve_chat_template(tok, chat_template)
        rep = inspect_data(source, tok, fmt, max_length, truncation, loss_on, template, sample_index=sample_index)
    except LoraTuneError as e:
        _fail(e)
    print_report(rep, tok, console)
    sys.exit(0 if rep.ok else 1)


@main.command("config-reference")
def config_reference() -> None:
    """Print every config key with its default and meaning (markdown)."""
    from lora_tune.config import reference

    click.echo("| key | default | meaning |\n|---|---|---|")
    for key, default, doc in reference():
        click.echo(f"| `{key}` | `{default}` | {doc} |")


if __name__ == "__main__":
    main()
