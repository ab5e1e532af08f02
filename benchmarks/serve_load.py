"""Load test for `lora-tune serve`: concurrent clients against the same prompts sent one at a time.

    python benchmarks/serve_load.py [--clients 8] [--rounds 2] [--max-tokens 64] [--adapters 2]

Starts the server on 127.0.0.1 with the embedded SmolLM2-135M and random-weight adapters on it (serving
cost depends on shapes only), sends the fixed prompt set (lora_tune.bench.load.PROMPTS, each round once
per prompt, models taken in turn: base, adapter 1, adapter 2, ...) first from one client, then from N
concurrent clients. Greedy, streaming, usage from the server. Reports generated tokens/s, p50/p95
latency and time to first token, and errors, with the concurrent/sequential ratios. Writes
benchmarks/results/serve-<stamp>.json and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lora_tune.atomic import atomic_write_text
from lora_tune.bench.compare import _git_sha, hardware, versions, write_results_json
from lora_tune.bench.load import PROMPTS, ServerProcess, random_adapter, run_phase, summarize

HERE = Path(__file__).resolve().parent
BASE = "builtin:smollm2-135m"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="times the prompt set is sent in each phase")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts of the set")
    ap.add_argument("--adapters", type=int, default=2, help="random adapters served beside the base")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--quantization", default=None, help="passed to lora-tune serve (default: as trained, bf16)")
    ap.add_argument("--model", default=BASE)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds per phase after which no request starts")
    args = ap.parse_args(argv)

    import openai

    from lora_tune.models import resolve_source

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        base_dir = resolve_source(args.model, log=lambda *_: None)
        names = [f"adapter{i + 1}" for i in range(args.adapters)]
        flags = ["--model", args.model, "--max-batch", str(args.max_batch), "--max-queue", "1024", "--no-jobs"]
        for i, name in enumerate(names):
            folder = random_adapter(base_dir, Path(tmp) / name, i, base_name=args.model, quantization="bf16", scale=0.3)
            flags += ["--adapter", f"{name}={folder}"]
        if args.quantization:
            flags += ["--quantization", args.quantization]
        server = ServerProcess(flags)
        try:

            def make_client():
                return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)

            models = [args.model, *names]
            prompts = PROMPTS[: args.prompts]
            work = [(models[i % len(models)], p) for _ in range(args.rounds) for i, p in enumerate(prompts)]
            run_phase(make_client, [(m, PROMPTS[0]) for m in models], 1, 8)  # warm-up: load kernels and adapters
            print(f"sequential: {len(work)} requests from 1 client", file=sys.stderr)
            seq = summarize(*run_phase(make_client, work, 1, args.max_tokens, args.deadline))
            print(f"concurrent: {len(work)} requests from {args.clients} clients", file=sys.stderr)
            conc = summarize(*run_phase(make_client, work, args.clients, args.max_tokens, args.deadline))
            import httpx

            stats = httpx.get(f"{server.root}/stats").json()
        finally:
            server.stop()
    result = {
        "benchmark": "serve-load",
        "git_sha": _git_sha(),
        "hardware": hardware(),
        "versions": versions(),
        "settings": {**vars(args), "models": models, "requests": len(work)},
        "sequential": seq,
        "concurrent": conc,
        "ratios": {
            "tokens_per_s": conc["tokens_per_s"] / seq["tokens_per_s"],
            "latency_p50": conc["latency_p50_s"] / seq["latency_p50_s"],
            "ttft_p50": conc["ttft_p50_s"] / seq["ttft_p50_s"],
        },
        "server_stats": stats,
    }
    path = write_results_json(Path(args.out), "serve", result)
    md = markdown(result, path.name)
    atomic_write_text(path.with_suffix(".md"), md)
    print(md)
    return 0 if seq["errors"] == conc["errors"] == 0 else 1


def markdown(r: dict, name: str) -> str:
    s, h = r["settings"], r["hardware"]

    def row(label: str, p: dict) -> str:
        return (
            f"| {label} | {p['requests']} | {p['errors']} | {p['generated_tokens']} | {p['tokens_per_s']:.1f} | "
            f"{p['latency_p50_s']:.2f} / {p['latency_p95_s']:.2f} | {p['ttft_p50_s']:.2f} / {p['ttft_p95_s']:.2f} |"
        )

    ratio = r["ratios"]
    return "\n".join([
        f"### lora-tune serve under load ({name}, git {r['git_sha']})",
        "",
        f"{s['model']} + {s['adapters']} adapters (requests take the models in turn), greedy, max_tokens "
        f"{s['max_tokens']}, --max-batch {s['max_batch']}; CPU {h['cpu']} ({h['cores']} threads, "
        f"{', '.join(h['cpu_flags'])}).",
        "",
        "| clients | requests | errors | tokens | tokens/s | latency p50 / p95 (s) | first token p50 / p95 (s) |",
        "|---|---|---|---|---|---|---|",
        row("1 (one at a time)", r["sequential"]),
        row(str(s["clients"]), r["concurrent"]),
        "",
        f"Concurrent / one at a time: {ratio['tokens_per_s']:.2f}x the tokens/s, p50 latency "
        f"{ratio['latency_p50']:.2f}x, p50 first token {ratio['ttft_p50']:.2f}x. Largest batch seen: "
        f"{r['server_stats']['max_batch_seen']}; most models in one forward pass: "
        f"{r['server_stats']['max_models_in_a_step']}.",
        "",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
