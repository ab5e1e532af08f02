"""TrainState: what a checkpoint holds, round-tripped through JSON; old checkpoints still load."""

from __future__ import annotations

import json

from lora_tune.data.batching import Position
from lora_tune.train.state import TrainState


def test_round_trip_through_json():
    s = TrainState(
        step=7,
        position=Position(1, 3),
        best_score=-0.5,
        bad_evals=2,
        tokens_seen=1234,
        precision="bf16",
        threads=2,
        config_hash="abc",
        split=2,
        objective={"beta": 0.1},
    )
    back = TrainState.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and isinstance(back.position, Position)


def test_a_state_json_from_before_the_dataclass_loads():
    old = {
        "position": {"epoch": 0, "index": 4},
        "best_score": None,
        "bad_evals": 0,
        "tokens_seen": 99,
        "threads": 2,
        "config_hash": "x",
        "step": 4,
    }
    s = TrainState.from_dict(old)
    assert s.step == 4 and s.position == Position(0, 4) and s.precision is None and s.split == 1


def test_resume_keeps_the_precision_the_run_chose(tiny_model_dir, chat_files, tmp_path):
    """`train.precision: auto` is decided once, when a run starts; a resume reads it from the checkpoint."""
    from rich.console import Console

    from lora_tune.train.checkpoint import latest_checkpoint, state_digest
    from lora_tune.train.loop import train

    from conftest import tiny_config

    train_file, val_file = chat_files
    cfg = tiny_config(tiny_model_dir, train_file, val_file, tmp_path / "run", **{"train.precision": "auto"})
    train(cfg)
    path = latest_checkpoint(tmp_path / "run") / "state.json"
    saved = json.loads(path.read_text())
    assert saved["precision"] in ("bf16", "fp32")
    other = "fp32" if saved["precision"] == "bf16" else "bf16"
    changed = {**saved, "precision": other}  # as if this machine had decided otherwise
    path.write_text(json.dumps({**changed, "self_sha256": state_digest(changed)}))
    console = Console(record=True, width=200)
    train(cfg, resume=True, console=console)
    assert f"precision: {other} (chosen when the run started; kept on resume)" in console.export_text()
