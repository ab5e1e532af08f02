from __future__ import annotations

import pytest

from lora_tune.config import RESUME_SAFE_KEYS, config_hash, from_dict, load_config, parse_overrides, reference
from lora_tune.errors import ConfigError


def test_defaults_need_only_train_file():
    cfg = load_config(None, ["data.train_file=x.jsonl"])
    assert cfg.model.source == "builtin:smollm2-135m"
    assert cfg.model.quantization == "nf4"
    assert cfg.lora.target_modules == "all-linear"


def test_all_problems_reported_at_once_with_suggestions():
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            ["data.train_file=x", "trian.lr=1", "train.max_step=3", "model.quantization=nf5", "train.lr=abc"],
        )
    msg = str(e.value)
    assert len(e.value.problems) == 4
    assert "did you mean `train`" in msg
    assert "did you mean `train.max_steps`" in msg
    assert "`model.quantization`" in msg and "did you mean `nf4`" in msg
    assert "`train.lr`: expected a number" in msg


def test_yaml_floats_and_lists_are_coerced():
    # YAML 1.1 reads 2e-4 as a string; the config must still take it as a number.
    cfg = from_dict({"data": {"train_file": "x"}, "train": {"lr": "2e-4"}, "lora": {"target_modules": "q_proj,v_proj"}})
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_cross_field_checks():
    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            [
                "data.train_file=x",
                "train.warmup_steps=3",
                "train.warmup_ratio=0.1",
                "train.micro_batch_size=0",
                "lora.dropout=1.5",
                "data.val_file=v",
                "data.val_fraction=0.1",
            ],
        )
    msg = str(e.value)
    assert "`train.warmup_steps` and `train.warmup_ratio`" in msg
    assert "`train.micro_batch_size` must be > 0" in msg
    assert "`lora.dropout`" in msg
    assert "`data.val_file` and `data.val_fraction`" in msg


def test_missing_train_file_is_an_error():
    with pytest.raises(ConfigError, match="data.train_file"):
        load_config(None, [])


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: 1e-4\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_relative_data_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text("data:\n  train_file: train.jsonl\n")
    cfg = load_config(p)
    assert cfg.data.train_file == str((tmp_path / "sub" / "train.jsonl").resolve())


def test_overrides_parse_and_reject_malformed():
    assert parse_overrides(["train.lr=1e-4", "lora.r=8"]) == {"train": {"lr": "1e-4"}, "lora": {"r": 8}}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.lr"])


def test_config_hash_ignores_only_safe_keys():
    base = load_config(None, ["data.train_file=x"])
    same = load_config(None, ["data.train_file=x", "train.log_every=7", "output_dir=elsewhere"])
    other = load_config(None, ["data.train_file=x", "train.lr=1e-3"])
    assert config_hash(base) == config_hash(same)
    assert config_hash(base) != config_hash(other)
    assert "train.lr" not in RESUME_SAFE_KEYS


def test_reference_documents_every_key():
    rows = reference()
    assert all(doc for _, _, doc in rows)
    assert {"train.lr", "model.quantization", "lora.r", "output_dir"} <= {k for k, _, _ in rows}


def test_a_type_error_does_not_hide_range_errors():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train_file=x", "train.micro_batch_size=-2", "data.max_length=abc", "lora.r=0"])
    assert len(e.value.problems) == 3
    msg = str(e.value)
    assert "`train.micro_batch_size` must be > 0" in msg and "`data.max_length`: expected an integer" in msg
    assert "`lora.r` must be > 0" in msg


@pytest.mark.parametrize(
    "override, ours",
    [
        ("learning_rate=1e-4", "train.lr"),
        ("lerning_rate=1e-4", "train.lr"),  # a typo of the HF name
        ("train.learning_rate=1e-4", "train.lr"),
        ("num_train_epochs=3", "train.epochs"),
        ("per_device_train_batch_size=2", "train.micro_batch_size"),
        ("gradient_accumulation_steps=4", "train.grad_accum"),
        ("lora_r=8", "lora.r"),
        ("max_seq_length=512", "data.max_length"),
        ("base_model=x", "model.source"),
        ("load_in_4bit=true", "model.quantization: nf4"),
    ],
)
def test_hugging_face_and_axolotl_names_are_pointed_to_ours(override, ours):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train_file=x", override])
    assert f"did you mean `{ours}`?" in str(e.value)
