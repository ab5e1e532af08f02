"""benchmarks/gpu_acceptance.py on the CPU (`--quick`: tiny sizes), so the script is ready for the first GPU:
each part writes its JSON and its summary section as it finishes, a failed part does not stop the next,
and parts without time left are listed as not run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _only(out: Path, pattern: str) -> Path:
    found = sorted(out.glob(pattern))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_quick_run_saves_each_part_and_a_summary(gpu, tmp_path):
    assert gpu.main(["--quick", "--out", str(tmp_path), "--parts", "tests,planner,chunked"]) == 0
    tests = json.loads(_only(tmp_path, "gpu-tests-*.json").read_text())
    names = {t["name"]: t["outcome"] for t in tests["tests"]}
    assert len(names) == 5 and set(names.values()) == {"skipped"}  # the cuda subset, collected and skipped
    assert "test_a_real_out_of_memory_error_is_recovered_by_splitting" in names
    planner = json.loads(_only(tmp_path, "gpu-planner-*.json").read_text())
    assert [r["model.quantization"] for r in planner["rows"]] == ["nf4", "fp32"]
    assert all(r["measured_mb"] > 0 and r["planned_mb"] > 0 for r in planner["rows"])
    chunked = json.loads(_only(tmp_path, "gpu-chunked-*.json").read_text())
    cases = [c["case"] for c in chunked["cases"]]
    assert cases[0] == "full logits" and len(cases) >= 3 and all(c["ms"] > 0 for c in chunked["cases"])
    summary = _only(tmp_path, "gpu-2*.md").read_text()
    for heading in ("## 1. CUDA tests", "## 2. Planner vs measured", "## 3. Chunked loss", "## bench"):
        assert heading in summary
    assert "not run" in summary.split("## bench")[1]  # not asked for: listed, not silently missing
    assert planner["versions"]["torch"] and "gpu" in planner


def test_a_failed_part_is_recorded_and_the_next_one_runs(gpu, tmp_path, monkeypatch):
    def broken(run):
        raise RuntimeError("planner broke")

    monkeypatch.setattr(gpu, "part_planner", broken)
    assert gpu.main(["--quick", "--out", str(tmp_path), "--parts", "planner,chunked"]) == 0
    assert "planner broke" in json.loads(_only(tmp_path, "gpu-planner-*.json").read_text())["error"]
    summary = _only(tmp_path, "gpu-2*.md").read_text()
    assert "failed" in summary and "## 3. Chunked loss" in summary


def test_no_time_left_starts_nothing(gpu, tmp_path):
    assert gpu.main(["--quick", "--out", str(tmp_path), "--budget-s", "0"]) == 0
    assert not list(tmp_path.glob("gpu-*-*.json"))
    summary = _only(tmp_path, "gpu-2*.md").read_text()
    assert summary.count("not run: out of time") == 4


def test_junit_outcomes(gpu, tmp_path):
    report = tmp_path / "j.xml"
    report.write_text(
        '<testsuites><testsuite><testcase name="a" time="1.5"/>'
        '<testcase name="b" time="0.1"><failure message="assert 1 == 2&#10;more">trace</failure></testcase>'
        '<testcase name="c" time="0"><skipped message="needs a CUDA GPU"/></testcase></testsuite></testsuites>'
    )
    got = [(t["name"], t["outcome"], t["message"]) for t in gpu.junit_outcomes(report)]
    assert got == [("a", "passed", ""), ("b", "failed", "assert 1 == 2"), ("c", "skipped", "needs a CUDA GPU")]


@pytest.mark.parametrize("script", ["gpu_acceptance.sh", "gpu_prepare.sh"])
def test_the_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)]).returncode == 0
