"""Bad input through the CLI: one clear error line (or short list), exit code 1, never a traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lora_tune.cli import main

from conftest import tiny_overrides, write_jsonl


def run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def test_help_lists_commands():
    code, out = run(["--help"])
    assert code == 0
    for cmd in ("train", "demo", "config-reference"):
        assert cmd in out


@pytest.mark.parametrize(
    "content, expected",
    [
        ("train: [1, 2\n", "invalid YAML"),
        ("trian:\n  lr: 1\n", "unknown section `trian`; did you mean `train`?"),
        ("train:\n  lr: fast\n", "`train.lr`: expected a number"),
    ],
)
def test_bad_config_files(tmp_path, content, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    code, out = run(["train", str(cfg), "data.train_file=x.jsonl"])
    assert code == 1 and expected in out and "Traceback" not in out


def test_missing_config_file(tmp_path):
    code, out = run(["train", str(tmp_path / "none.yaml")])
    assert code == 1 and "does not exist" in out and "Traceback" not in out


def test_missing_data_file_and_model(tmp_path, tiny_model_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code, out = run(["train", str(cfg), f"data.train_file={tmp_path / 'nope.jsonl'}"])
    assert code == 1 and "nope.jsonl does not exist" in out
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    code, out = run(["train", str(cfg), f"data.train_file={data}", f"model.source={tmp_path / 'no-model'}"])
    assert code == 1 and "model path" in out and "does not exist" in out and "Traceback" not in out


def test_bad_data_lines_fail_fast_with_file_and_line(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "{broken", {"messages": []}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code, out = run(["train", str(cfg), *tiny_overrides(tiny_model_dir, data, None, tmp_path / "run")])
    assert code == 1
    assert f"{data}:2: invalid JSON" in out and f"{data}:3:" in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()  # failed before anything was written


def test_config_reference_is_a_table():
    code, out = run(["config-reference"])
    assert code == 0 and "| `train.lr` |" in out


def test_data_inspect_good_file(tmp_path, tiny_model_dir):
    from conftest import chat

    data = write_jsonl(tmp_path / "d.jsonl", [chat("hello", "hi there"), chat("hello", "hi there"), {"text": "doc"}])
    code, out = run(["data", "inspect", str(data), "--model", str(tiny_model_dir), "--max-length", "64"])
    assert code == 0, out
    assert "valid records" in out and "3 (messages 2, text 1)" in out
    assert "1 exact" in out  # the duplicate
    assert "tokens per record" in out and "histogram" in out
    assert "⟦hi there<|im_end|>⟧" in out  # the rendered sample marks what is trained on


def test_data_inspect_bad_file_lists_every_problem(tmp_path, tiny_model_dir):
    from conftest import chat

    long_prompt = chat("the quick brown fox " * 40, "yes")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "{bad", long_prompt, {"messages": [{"role": "user"}]}])
    code, out = run(["data", "inspect", str(data), "--model", str(tiny_model_dir), "--max-length", "32"])
    assert code == 1 and "Traceback" not in out
    assert f"{data}:2: invalid JSON" in out
    assert f"{data}:3: no supervised token left after truncation" in out
    assert f"{data}:4: messages[0]: `content` must be a string" in out


def test_sweep_ranks_a_grid(tmp_path, tiny_model_dir, chat_files):
    import json

    from conftest import tiny_overrides

    train_file, val_file = chat_files
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    fixed = [
        f"--set={o}"
        for o in tiny_overrides(tiny_model_dir, train_file, val_file, tmp_path / "unused")
        if not o.startswith(("output_dir", "train.lr", "train.max_steps"))
    ]
    code, out = run(
        [
            "sweep",
            str(cfg),
            "--grid",
            "train.lr=1e-3,3e-2",
            "lora.r=2",
            "--budget-steps",
            "4",
            "--out",
            str(tmp_path / "sw"),
            *fixed,
        ]
    )
    assert code == 0, out
    ranked = json.loads((tmp_path / "sw" / "sweep.json").read_text())["ranked"]
    assert len(ranked) == 2 and all(r["steps"] == 4 for r in ranked)
    assert ranked[0]["val_loss"] <= ranked[1]["val_loss"]
    assert "| rank | train.lr | lora.r | val_loss |" in (tmp_path / "sw" / "sweep.md").read_text()
    code, out = run(["sweep", str(cfg), "--grid", "train.lr"])
    assert code == 1 and "section.key=v1,v2" in out
