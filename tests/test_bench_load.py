"""The serving load test: its statistics, and one small run end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_tune.bench.load import Sample, percentile, summarize

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def test_percentiles_are_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0 and percentile(values, 95) == 5.0 and percentile(values, 20) == 1.0
    assert percentile([], 50) is None


def test_summary_counts_errors_apart_and_measures_from_request_start():
    samples = [
        Sample("m", start=0.0, first=0.5, end=2.0, tokens=10),
        Sample("m", start=1.0, first=1.2, end=2.0, tokens=6),
        Sample("m", start=1.0, first=None, end=1.1, tokens=0, error="APIConnectionError: refused"),
    ]
    s = summarize(samples, wall=4.0)
    assert s["requests"] == 3 and s["errors"] == 1 and s["generated_tokens"] == 16 and s["tokens_per_s"] == 4.0
    assert s["latency_p50_s"] == 1.0 and s["latency_p95_s"] == 2.0
    assert s["ttft_p50_s"] == pytest.approx(0.2) and s["ttft_p95_s"] == 0.5
    assert s["error_examples"] == ["APIConnectionError: refused"]


@pytest.mark.slow
def test_the_load_script_runs_against_a_real_server(tiny_model_dir, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--adapters", "1", "--rounds", "1",
           "--clients", "4", "--max-tokens", "4", "--prompts", "8", "--out", str(tmp_path),
           "--quantization", "fp32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "results").glob("serve-*.json")
    r = json.loads(result.read_text())
    for phase in ("sequential", "concurrent"):
        assert r[phase]["requests"] == 8 and r[phase]["errors"] == 0 and r[phase]["generated_tokens"] > 0
    assert r["server_stats"]["max_models_in_a_step"] == 2 and "cpu_flags" in r["hardware"]
    assert "| 4 | 8 | 0 |" in result.with_suffix(".md").read_text()
