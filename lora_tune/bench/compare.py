"""Side-by-side benchmark of lora_tune and TRL: each configuration in a fresh process, alternating tools,
median of `reps` runs; writes results JSON, a markdown table and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from lora_tune.allocator import choose, preload_env
from lora_tune.atomic import atomic_write_text
from lora_tune.bench.data import write_bench_data
from lora_tune.bench.worker import Spec
from lora_tune.runtime import CPU_FLAGS_ENV, avx2_kind_env, cpu_flags, cpu_kind


@dataclass(frozen=True)
class Row:
    """One configuration of the matrix: settings shared by both tools, the data, the CPU kinds it runs on."""

    name: str
    settings: dict
    data: str = "chats"  # bench.data.SHAPES: chats (70-400 tokens) or long (every sample cut to max_length)
    kinds: tuple[str, ...] = ("native", "avx2")


# bf16 and NF4 run on the native kind only: with AVX2 kernels, bf16 matmuls run at 0.006x fp32 here
# (measured), so neither tool's user would train in bf16 there, and our `auto` picks fp32 by itself.
FP32, BF16 = {"quantization": "fp32"}, {"quantization": "bf16"}
MATRIX = [
    Row("chats-fp32-mb8-len256", {**FP32, "micro_batch_size": 8, "max_length": 256}),
    Row("full256-fp32-mb8", {**FP32, "micro_batch_size": 8, "max_length": 256}, "long"),
    Row("full512-fp32-mb4", {**FP32, "micro_batch_size": 4, "max_length": 512}, "long"),
    Row("full256-bf16-mb8", {**BF16, "micro_batch_size": 8, "max_length": 256}, "long", ("native",)),
    Row("full512-bf16-mb4", {**BF16, "micro_batch_size": 4, "max_length": 512}, "long", ("native",)),
    Row("qlora-nf4", {"quantization": "nf4", "micro_batch_size": 4, "max_length": 512}, "chats", ("native",)),
]


# the environment that makes torch's CPU kernels those of a kind of CPU this machine can stand in for
CPU_KINDS = {
    "native": {},
    # ATen's vectorised kernels and oneDNN limited to AVX2, without bf16 instructions, as on an AVX2-only
    # CPU. fp32 GEMMs (MKL) already run at this machine's AVX2 rate either way.
    # the runtime seam's flags say so too, so that precision choices are those of such a CPU
    "avx2": avx2_kind_env({}),
}
CPU_KIND_NAMES = {"native": "this CPU's own kernels", "avx2": "AVX2 kernels (AVX-512 and bf16 instructions unused)"}


def worker_env(spec: Spec, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The worker's environment: the CPU kind's settings, and for ours the allocator that
    `lora-tune train` runs under (TRL runs under the system's, as its users do)."""
    # inductor's kernel cache is keyed without the ISA: kernels built for one kind crash or compute
    # garbage under the other, so each kind keeps its own
    cache = Path(tempfile.gettempdir()) / f"lora_tune-inductor-{spec.cpu_kind}"
    env = {**environ, **CPU_KINDS[spec.cpu_kind], "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    if spec.tool == "ours":
        env = preload_env(env, choose(spec.allocator)) or env
    return env


def run_one(spec: Spec) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tune.bench.worker", json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
        env=worker_env(spec),
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        return {**asdict(spec), "error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(line.removeprefix("BENCH "))


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


# the CPU features that decide matmul speed (x86, then Arm), recorded with every benchmark
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve", "bf16")


def hardware() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or "unknown"
    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "cpu_flags": sorted(cpu_flags(info) & set(SIMD_FLAGS)),
        "kernels": torch.backends.cpu.get_cpu_capability(),
        # what the runtime seam made of it, where LORA_TUNE_CPU_FLAGS stands in for another kind
        **({"seen_as_flags": sorted(cpu_kind().flags & set(SIMD_FLAGS))} if os.environ.get(CPU_FLAGS_ENV) else {}),
        "gpu": gpu,
        "platform": platform.platform(),
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "trl", "lora_tune"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def write_results_json(out_dir: Path, prefix: str, result: dict) -> Path:
    """`<out_dir>/results/<prefix>-<UTC stamp>.json`, written atomically; returns its path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    path = Path(out_dir) / "results" / f"{prefix}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    return path


MEDIANS = ("tokens_per_s", "peak_mb", "val_loss", "step_s", "padding_share", "mfu")


def add_mfu(runs: list[dict], flops: dict) -> None:
    """Each run's MFU: its real tokens/s x model FLOPs per token / the measured matmul peak."""
    from lora_tune.bench.flops import flops_per_token, mfu
    from lora_tune.bench.plan import ModelShape

    shape = ModelShape(**flops["shape"])
    for r in runs:
        if "error" not in r:
            key = f"{r.get('data', 'chats')}:{r.get('max_length')}"
            seq = flops.get("attention_seq_len_at", {}).get(key, flops["attention_seq_len"])
            per_token = flops_per_token(shape, seq, r["gradient_checkpointing"], r["r"])
            r["mfu"] = mfu(r["tokens_per_s"], per_token, flops["peak_flops"])


def summarize(runs: list[dict]) -> list[dict]:
    """Per (CPU kind, configuration): each tool's medians, and the figures over every pairing of
    repetitions: our lowest tokens/s against TRL's highest, our highest peak against TRL's lowest."""
    rows = []
    for kind, name in dict.fromkeys((r.get("cpu_kind", "native"), r["name"]) for r in runs):
        row: dict = {"cpu_kind": kind, "name": name}
        ok = {}
        for tool in ("ours", "trl"):
            ok[tool] = [
                r
                for r in runs
                if r["name"] == name and r.get("cpu_kind", "native") == kind and r["tool"] == tool and "error" not in r
            ]
            if not ok[tool]:
                row[tool] = None
                continue
            row[tool] = {k: statistics.median(r[k] for r in ok[tool]) for k in MEDIANS if all(k in r for r in ok[tool])}
            row[tool]["runs"] = len(ok[tool])
            row[tool]["peaks_mb"] = [r["peak_mb"] for r in ok[tool]]
            row[tool]["tokens_per_s_all"] = [r["tokens_per_s"] for r in ok[tool]]
        if row["ours"] and row["trl"]:
            o, t = row["ours"], row["trl"]
            row["speedup"] = o["tokens_per_s"] / t["tokens_per_s"]
            row["worst_speedup"] = min(o["tokens_per_s_all"]) / max(t["tokens_per_s_all"])
            row["memory_ratio"] = max(o["peaks_mb"]) / min(t["peaks_mb"])
            row["median_memory_ratio"] = o["peak_mb"] / t["peak_mb"]
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = [
        f"# lora_tune vs TRL SFTTrainer + PEFT ({result['date']}, git {result['git_sha']})",
        "",
        f"Hardware: {hw['cpu']} ({hw['cores']} threads; CPU flags: {', '.join(hw.get('cpu_flags', [])) or '?'}), "
        f"GPU: {hw['gpu'] or 'none'}. Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        "SmolLM2-135M-Instruct, LoRA r=16 all-linear, AdamW, constant lr, gradient checkpointing; "
        f"{result['warmup_steps']} warm-up steps excluded, {result['steps']} timed steps; {result['reps']} runs of "
        "each tool per row, each in a fresh process, tools alternating. Data: `chats` are 1-6-turn chats "
        "(68-406 tokens); `full` rows use 16-24-turn chats that every max_length cuts, so every sample is "
        "full-length. fp32 rows compute in fp32 for both tools; bf16 rows load bf16 weights, NF4 rows 4-bit "
        "weights with bf16 compute. lora_tune runs as `lora-tune train` does by default: "
        f"allocator {result.get('allocator', '?')}, train.compile {result.get('compile', '?')}; TRL at its defaults.",
        "",
    ]
    for kind in dict.fromkeys(r["cpu_kind"] for r in result["summary"]):
        lines += [
            f"### {kind}: {CPU_KIND_NAMES.get(kind, kind)}",
            "",
            "| configuration | ours tokens/s | TRL tokens/s | speed-up (median) | speed-up, worst pairing "
            "| ours peak MB (each run) | TRL peak MB (each run) | memory: our highest / TRL's lowest "
            "| ours val loss | TRL val loss | ours MFU | TRL MFU | ours padding | TRL padding |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in result["summary"] if r["cpu_kind"] == kind):
            o, t = r["ours"], r["trl"]
            if not (o and t):
                lines.append(
                    f"| {r['name']} | {o and round(o['tokens_per_s'])} | {t and round(t['tokens_per_s'])} |"
                    " failed |" + " |" * 10
                )
                continue
            lines.append(
                f"| {r['name']} | {o['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
                f"{r['worst_speedup']:.2f}x | {', '.join(f'{x:.0f}' for x in o['peaks_mb'])} | "
                f"{', '.join(f'{x:.0f}' for x in t['peaks_mb'])} | {r['memory_ratio']:.2f} | {o['val_loss']:.3f} | "
                f"{t['val_loss']:.3f} | {_pct(o, 'mfu')} | {_pct(t, 'mfu')} | {_pct(o, 'padding_share')} | "
                f"{_pct(t, 'padding_share')} |"
            )
        lines.append("")
    lines += [
        "Tokens/s counts real (non-padding) tokens. Peak MB is the process's peak RSS minus its RSS after "
        "importing torch/transformers/peft/trl. The worst pairing sets our slowest run against TRL's fastest, "
        "and our highest peak against TRL's lowest. Validation loss is the mean over assistant tokens of the "
        "held-out chats after the run, computed by the same code for both. MFU (bf16 and NF4 rows): real "
        "tokens/s x model FLOPs per token (`lora_tune/bench/flops.py`) over the best bf16 matmul FLOP/s measured "
        "on this machine"
        + (f" ({result['flops']['peak_flops'] / 1e12:.2f} TFLOP/s)" if result.get("flops") else "")
        + ". Padding: share of the computed token positions that were padding.",
    ]
    return "\n".join(lines) + "\n"


def _pct(d: dict, k: str) -> str:
    return f"{100 * d[k]:.1f}%" if k in d else "-"


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"] if r["ours"] and r["trl"]]
    names = [f"{r['name']}\n({r['cpu_kind']})" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), dpi=110)
    for ax, key, label in (
        (axes[0], "tokens_per_s", "real tokens / s (higher is better)"),
        (axes[1], "peak_mb", "peak memory, MB (lower is better)"),
    ):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["ours"][key] for r in rows], 0.4, label="lora_tune")
        ax.bar([i + 0.2 for i in x], [r["trl"][key] for r in rows], 0.4, label="TRL + PEFT")
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M, {result['hardware']['gpu'] or 'CPU'}")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def flops_setup(rows: list[Row], files: dict[str, Path], model: str = "builtin:smollm2-135m") -> dict:
    """What MFU needs: the model's shape, each row's token-weighted mean attended length (keyed
    "data:max_length"), and the bf16 matmul peak."""
    from dataclasses import asdict as as_dict

    import torch

    from lora_tune.bench.flops import matmul_peak
    from lora_tune.bench.plan import ModelShape, load_model_config
    from lora_tune.config import ModelCfg
    from lora_tune.data.readers import load_records
    from lora_tune.data.tokenize import encode_records
    from lora_tune.models import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source(model, log=lambda *_: None), ModelCfg(source=model))

    def attended(data: str, length: int) -> float:  # the token-weighted mean length a token attends over
        lengths = [len(e.input_ids) for e in encode_records(tok, load_records(files[data]), length)[0]]
        return sum(n * n for n in lengths) / sum(lengths)

    keys = {(r.data, r.settings.get("max_length", 512)) for r in rows}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    at = {f"{data}:{length}": attended(data, length) for data, length in keys}
    return {
        "shape": as_dict(ModelShape.from_config(load_model_config(model))),
        "attention_seq_len": next(iter(at.values())),
        "attention_seq_len_at": at,
        "peak_flops": matmul_peak(device),
        "peak_device": str(device),
    }


def compare(
    out_dir: Path,
    reps: int = 2,
    steps: int = 6,
    warmup: int = 2,
    matrix: list[Row] = MATRIX,
    kinds: tuple[str, ...] = tuple(CPU_KINDS),
    log=print,
) -> dict:
    """Run the matrix on each CPU kind; write `<out_dir>/results/trl-<stamp>.json`, `RESULTS.md`, `results.png`.

    lora_tune runs as `lora-tune train` would for a long run: under its allocator, with train.compile
    on (what `auto` picks on the CPU from AUTO_MIN_STEPS steps); the compile falls in the warm-up steps
    and is reported as `warmup_s`.
    """
    from lora_tune.train.compile import AUTO_MIN_STEPS

    out_dir = Path(out_dir)
    files = {shape: write_bench_data(out_dir / "data", shape=shape) for shape in {r.data for r in matrix}}
    flops = flops_setup(matrix, {k: v[0] for k, v in files.items()})
    log(f"matmul peak here: {flops['peak_flops'] / 1e12:.2f} TFLOP/s (bf16)")
    runs = []
    for kind in kinds:
        for rep in range(reps):
            for row in (r for r in matrix if kind in r.kinds):
                for tool in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):
                    spec = Spec(
                        tool=tool,
                        name=row.name,
                        train_file=str(files[row.data][0]),
                        val_file=str(files[row.data][1]),
                        steps=steps,
                        warmup_steps=warmup,
                        cpu_kind=kind,
                        data=row.data,
                        compile=True,
                        **row.settings,
                    )
                    r = run_one(spec)
                    runs.append(r)
                    msg = (
                        r.get("error", "").splitlines()[-1:]
                        if "error" in r
                        else [f"{r['tokens_per_s']:.0f} tok/s, {r['peak_mb']:.0f} MB, val {r['val_loss']:.3f}"]
                    )
                    log(f"[{kind} {rep + 1}/{reps}] {row.name:22s} {tool:5s} {msg[0] if msg else 'error'}")
    add_mfu([r for r in runs if r.get("cpu_kind") == "native" and r.get("quantization") != "fp32"], flops)
    ours = next((r for r in runs if r["tool"] == "ours" and "error" not in r), {})
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_sha": _git_sha(),
        "hardware": hardware(),
        "versions": versions(),
        "reps": reps,
        "steps": steps,
        "warmup_steps": warmup,
        "allocator": ours.get("allocator_active", "?"),
        "compile": f"on (what auto picks on the CPU for runs of {AUTO_MIN_STEPS}+ steps)",
        "flops": flops,
        "runs": runs,
        "summary": summarize(runs),
    }
    write_results_json(out_dir, "trl", result)
    results_md = out_dir / "RESULTS.md"
    old = results_md.read_text() if results_md.exists() else ""
    kept = old[old.find("\n## ") :] if "\n## " in old else ""  # sections appended by hand or by ablation.py
    atomic_write_text(results_md, markdown(result) + "\n![chart](results.png)\n" + kept)
    plot(result, out_dir / "results.png")
    return result
