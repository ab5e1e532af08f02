"""The DPO benchmark (lora_tune.bench.dpo_worker, benchmarks/compare_dpo.py) on the tiny model: each tool's
worker in a fresh process, as the benchmark runs it, and the summary and table on made-up runs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

import lora_tune.config as C
from lora_tune.bench.dpo_worker import DPOSpec, cut_prompt, per_step, prompt_limit, timed_figures

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _compare_dpo():
    spec = importlib.util.spec_from_file_location("compare_dpo", ROOT / "benchmarks" / "compare_dpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pair(i: int) -> dict:
    return {
        "prompt": [
            {"role": "system", "content": "answer briefly"},
            {"role": "user", "content": f"what is {i} plus {i}?"},
        ],
        "chosen": [{"role": "assistant", "content": f"the answer is {2 * i}."}],
        "rejected": [{"role": "assistant", "content": f"I do not know, maybe {2 * i + 1}?"}],
    }


@pytest.fixture
def pref_files(tmp_path) -> tuple[Path, Path]:
    """A handful of TRL conversational preference pairs: 8 to train on, 4 held out."""
    return (
        write_jsonl(tmp_path / "train.jsonl", [pair(i) for i in range(8)]),
        write_jsonl(tmp_path / "test.jsonl", [pair(i) for i in range(8, 12)]),
    )


def _run_tiny(tool: str, files: tuple[Path, Path], monkeypatch, adapter_dir: Path) -> dict:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the test shares the machine
    spec = DPOSpec(
        tool=tool,
        train_file=str(files[0]),
        test_file=str(files[1]),
        model="builtin:tiny-random",
        quantization="fp32",
        micro_batch_size=2,
        max_length=64,
        r=4,
        alpha=8,
        steps=2,
        warmup_steps=1,
        adapter_dir=str(adapter_dir),
    )
    result = _compare_dpo().measure(spec)  # the benchmark's own runner: fresh process, worker_env
    assert "error" not in result, result.get("error")
    return result


def _check_record(r: dict, tool: str) -> None:
    assert r["tool"] == tool and r["steps"] == 2 and len(r["step_seconds"]) == 2
    assert all(s > 0 for s in r["step_seconds"]) and r["seconds"] == pytest.approx(sum(r["step_seconds"]))
    assert r["pairs"] == 4 and r["pairs_per_s"] == pytest.approx(4 / r["seconds"])
    assert r["tokens_per_s"] > r["pairs_per_s"] and 0 <= r["padding_share"] < 1 and r["peak_mb"] > 0
    assert math.isfinite(r["final_loss"]) and 0 < r["final_loss"] < 2  # near log 2 after two tiny steps
    assert r["max_prompt_length_used"] == 32
    assert 0 <= r["preference_accuracy"] <= 1  # scored by our evaluation on the 4 held-out pairs
    assert "cpu_flags" in r["hardware"] and r["versions"]["torch"]
    assert Path(r["adapter_dir"], "adapter_config.json").is_file()  # kept where the spec asked


@pytest.mark.slow
def test_trl_half_runs_and_prints_one_json_record(pref_files, monkeypatch, tmp_path):
    pytest.importorskip("trl", reason="TRL is a benchmark-only extra: pip install -e '.[bench]'")
    r = _run_tiny("trl", pref_files, monkeypatch, tmp_path / "adapter")
    _check_record(r, "trl")
    assert r["final_train"]["rewards/accuracies"] is not None and "rewards/margins" in r["final_train"]
    assert r["trl_dropped_pairs"] == 0 and r["versions"]["trl"]


@pytest.mark.skipif(
    not hasattr(C, "PreferenceCfg"),
    reason="lora_tune.config has no `preference` section yet (train.objective: dpo is being built)",
)
@pytest.mark.slow
def test_ours_half_runs_and_prints_one_json_record(pref_files, monkeypatch, tmp_path):
    r = _run_tiny("ours", pref_files, monkeypatch, tmp_path / "adapter")
    _check_record(r, "ours")
    assert r["final_train"]  # the objective's own figures from metrics.jsonl


def test_prompt_is_cut_to_its_end_only_when_the_pair_is_too_long():
    ex = {"prompt_ids": list(range(10)), "chosen_ids": [1] * 4, "rejected_ids": [2] * 6}
    assert cut_prompt(ex, limit=4, max_length=16) == {"prompt_ids": list(range(10))}  # 10 + 6 fits
    assert cut_prompt(ex, limit=4, max_length=15) == {"prompt_ids": [6, 7, 8, 9]}
    assert cut_prompt({**ex, "prompt_ids": [0, 1]}, limit=4, max_length=4) == {"prompt_ids": [0, 1]}
    assert prompt_limit(DPOSpec(tool="trl", train_file="x", max_length=100)) == 50
    assert prompt_limit(DPOSpec(tool="trl", train_file="x", max_prompt_length=7)) == 7


def test_timing_leaves_out_the_warmup_steps():
    ends = [5.0, 6.0, 8.0, 11.0]  # step 0 ended at 5 s (warm-up), the timed steps took 1, 2, 3 s
    f = timed_figures(ends, [2, 2, 2, 2], [10, 20, 30, 40], [20, 40, 40, 40], warmup=1)
    assert f["step_seconds"] == [1.0, 2.0, 3.0] and f["seconds"] == 6.0 and f["pairs"] == 6
    assert f["pairs_per_s"] == 1.0 and f["tokens_per_s"] == 90 / 6 and f["padding_share"] == 1 - 90 / 120
    assert per_step([1, 2, 3, 4, 5], 2) == [3, 7]  # a trailing partial step (a prefetched batch) is dropped


def test_summary_pairs_each_variant_with_trl_and_the_table_shows_it():
    cd = _compare_dpo()
    run = {"cpu_kind": "native", "step_s": 1.0, "padding_share": 0.1, "final_loss": 0.6}
    ours = "ours precompute_ref=false"
    pre = "ours precompute_ref=true"
    runs = [
        {
            **run,
            "tool": "ours",
            "name": ours,
            "pairs_per_s": 4.0,
            "tokens_per_s": 400,
            "peak_mb": 100,
            "preference_accuracy": 0.7,
        },
        {
            **run,
            "tool": "ours",
            "name": pre,
            "pairs_per_s": 6.0,
            "tokens_per_s": 600,
            "peak_mb": 80,
            "preference_accuracy": 0.7,
        },
        {
            **run,
            "tool": "trl",
            "name": "TRL",
            "pairs_per_s": 2.0,
            "tokens_per_s": 210,
            "peak_mb": 200,
            "preference_accuracy": 0.6,
        },
        {
            **run,
            "tool": "trl",
            "name": "TRL",
            "pairs_per_s": 3.0,
            "tokens_per_s": 310,
            "peak_mb": 180,
            "preference_accuracy": None,
        },
        {
            **run,
            "tool": "ours",
            "name": ours,
            "pairs_per_s": 5.0,
            "tokens_per_s": 500,
            "peak_mb": 120,
            "preference_accuracy": 0.8,
        },
        {"tool": "ours", "name": pre, "cpu_kind": "native", "error": "boom"},
    ]
    plain, precomputed = cd.summarize_dpo(runs)
    assert plain["name"] == ours and precomputed["name"] == pre
    assert plain["pairs_speedup"] == pytest.approx(4.5 / 2.5)  # medians
    assert plain["worst_pairs_speedup"] == pytest.approx(4.0 / 3.0)  # our slowest run against TRL's fastest
    assert plain["speedup"] == pytest.approx(450 / 260) and plain["memory_ratio"] == pytest.approx(120 / 180)
    assert plain["ours"]["preference_accuracy"] == pytest.approx(0.75) and plain["trl"]["preference_accuracy"] is None
    assert precomputed["ours"]["runs"] == 1 and precomputed["pairs_speedup"] == pytest.approx(6.0 / 2.5)
    assert cd.systems("both", False) == [(ours, "ours", False), (pre, "ours", True), ("TRL", "trl", False)]
    settings = {
        **{k: v for k, v in vars(DPOSpec(tool="ours", train_file="x")).items()},
        "max_prompt_length_used": 256,
    }
    md = cd.markdown(
        {
            "date": "d",
            "git_sha": "s",
            "hardware": {"cpu": "c", "cores": 2, "gpu": None, "cpu_flags": ["avx2"]},
            "versions": {"trl": "1.16.0"},
            "reps": 2,
            "settings": settings,
            "data": {"train": "t.jsonl", "test": "h.jsonl", "train_pairs": 8, "test_pairs": 4},
            "trl_precompute": False,
            "summary": [plain, precomputed],
        }
    )
    assert "### native" in md and "precompute_ref_log_probs=false" in md
    assert f"| {ours} | 4.50 | 2.50 | 1.80x | 1.33x | 450 | 260 | 1.73x |" in md
    assert "| 0.700, 0.800 | 0.600, - |" in md


def test_compare_dpo_says_how_to_build_missing_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _compare_dpo().main(["--train", str(tmp_path / "nope.jsonl"), "--test", str(tmp_path / "nope2.jsonl")])
    assert e.value.code == 2 and "lora-tune recipes build preference-docs" in capsys.readouterr().err
