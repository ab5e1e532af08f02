"""Planner arithmetic, auto-fit, the out-of-memory fallback, and the benchmark code on a tiny setup."""

from __future__ import annotations

import json

import pytest
import torch

from lora_tune.bench.plan import GIB, ModelShape, auto_fit, estimate, parse_size
from lora_tune.config import load_config
from lora_tune.errors import LoraTuneError

from conftest import tiny_config

LLAMA_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}


def test_shape_counts_llama_8b_parameters():
    shape = ModelShape.from_config(LLAMA_8B)
    total = shape.linear_params() + shape.embedding_params() + shape.norm_params()
    assert total == pytest.approx(8.03e9, rel=0.01)  # Llama-3-8B has 8.03 B parameters


@pytest.mark.parametrize("quantization, double", [("nf4", True), ("nf4", False), ("int8", True), ("bf16", True)])
def test_weight_parts_equal_the_bytes_of_a_loaded_model(tiny_model_dir, quantization, double):
    """The planner's weight parts against the tensors (and bitsandbytes' quantization constants) of the
    tiny model as loaded, not against the planner's own formula."""
    from lora_tune.bench.memory import _tensor_bytes
    from lora_tune.config import ModelCfg
    from lora_tune.models import load_model
    from lora_tune.runtime import Precision

    model, _ = load_model(
        # kept in 4 bits on this CPU too: the planner plans the 4-bit layers a GPU keeps
        ModelCfg(source=str(tiny_model_dir), quantization=quantization, double_quant=double, cpu_dequantize=False),
        Precision(torch.device("cpu"), torch.bfloat16, "test"),
    )
    linear, other = [], []
    for name, p in model.named_parameters():
        is_linear = name.endswith("proj.weight")
        (linear if is_linear else other).append(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            nested = qs.state2 if qs.nested else None
            linear += [qs.absmax, qs.code] + ([nested.absmax, nested.code] if nested is not None else [])
        if getattr(p, "SCB", None) is not None:  # int8's per-row scales
            linear.append(p.SCB)
    over = [f"model.quantization={quantization}", f"model.double_quant={double}", "train.precision=bf16"]
    cfg = load_config(None, ["data.train_file=x", *over])
    plan = estimate(ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text())), cfg, "cpu")
    assert plan.parts["base weights (linear layers)"] == _tensor_bytes(linear)  # to the byte
    assert plan.parts["embeddings, LM head, norms"] == pytest.approx(_tensor_bytes(other), rel=1e-3)


def test_estimate_parts_follow_the_settings():
    shape = ModelShape.from_config(LLAMA_8B)
    base = load_config(
        None, ["data.train_file=x", "model.quantization=nf4", "data.max_length=1024", "train.micro_batch_size=1"]
    )
    plan = estimate(shape, base)
    no_ckpt = estimate(
        shape,
        load_config(
            None,
            [
                "data.train_file=x",
                "data.max_length=1024",
                "train.micro_batch_size=1",
                "train.gradient_checkpointing=false",
            ],
        ),
    )
    assert no_ckpt.parts["activations"] > 5 * plan.parts["activations"]
    bf16 = estimate(shape, load_config(None, ["data.train_file=x", "model.quantization=bf16"]))
    assert bf16.parts["base weights (linear layers)"] > 3.8 * plan.parts["base weights (linear layers)"]
    assert "CUDA context + allocator slack" not in estimate(shape, base, device="cpu").parts


def test_auto_fit_keeps_the_effective_batch():
    shape = ModelShape.from_config(LLAMA_8B)
    cfg = load_config(
        None,
        [
            "data.train_file=x",
            "train.micro_batch_size=8",
            "train.grad_accum=2",
            "data.max_length=2048",
            "train.gradient_checkpointing=false",
        ],
    )
    fitted, plan = auto_fit(shape, cfg, 12 * GIB)
    assert plan.total <= 12 * GIB and plan.notes
    assert fitted.train.micro_batch_size * fitted.train.grad_accum >= 16
    assert fitted.train.gradient_checkpointing
    with pytest.raises(LoraTuneError, match="nothing fits"):
        auto_fit(shape, cfg, 2 * GIB)


def test_parse_size():
    assert parse_size("12GiB") == 12 * GIB and parse_size("800MiB") == 800 * 2**20 and parse_size("24") == 24 * GIB
    with pytest.raises(LoraTuneError):
        parse_size("lots")


def test_out_of_memory_halves_micro_batches_and_keeps_the_math(tiny_model_dir, chat_files, tmp_path, monkeypatch):
    """A forced OOM on micro-batches of more than 1 row: the run goes on, with the same losses."""
    from lora_tune.train import objectives
    from lora_tune.train.loop import train
    from lora_tune.train.metrics import read_metrics

    train_file, val_file = chat_files
    args = {"train.max_steps": 4, "lora.dropout": 0.0}
    train(tiny_config(tiny_model_dir, train_file, val_file, tmp_path / "a", **args))
    real = objectives.token_losses_and_accuracy

    def small_only(model, batch, chunked):
        if batch["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("pretend")
        return real(model, batch, chunked)

    monkeypatch.setattr(objectives, "token_losses_and_accuracy", small_only)
    train(tiny_config(tiny_model_dir, train_file, val_file, tmp_path / "b", **args, **{"train.save_every": 0}))
    # the recovered first step is checkpointed at once (otherwise only the final step would be)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000001", "step-000004"]
    # with the halved layout, which a resume restores
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step-000001" / "state.json").read_text())
    assert saved["split"] == 4  # micro-batches of 4 rows as pieces of 1

    def losses(run):
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("split", "train") == "train"]

    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-5)


def test_planner_is_close_to_measured_cpu_memory(tiny_model_dir):
    """The planner against the profiler-measured peak of one step, on the tiny model (no CUDA overhead)."""
    from lora_tune.bench.memory import measure_step

    cfg = tiny_config(
        tiny_model_dir,
        "x",
        None,
        "unused",
        **{"data.max_length": 128, "train.micro_batch_size": 4, "train.precision": "fp32"},
    )
    measured = measure_step(cfg)
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    planned = estimate(shape, cfg, device="cpu").total
    assert measured["static_bytes"] > 0 and measured["step_peak_bytes"] > 0
    assert abs(planned - measured["peak_bytes"]) / measured["peak_bytes"] < 0.25


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["ours", "trl"])
def test_benchmark_worker_on_a_tiny_setup(tiny_model_dir, tmp_path, tool):
    import subprocess
    import sys

    from lora_tune.bench.data import write_bench_data

    if tool == "trl":
        pytest.importorskip("trl", reason="TRL is a benchmark-only extra: pip install -e '.[bench]'")
    train_file, val_file = write_bench_data(tmp_path, n_train=12, n_val=4)
    assert write_bench_data(tmp_path / "again", 12, 4)[0].read_text() == train_file.read_text()  # deterministic
    spec = {
        "tool": tool,
        "name": "tiny",
        "model": str(tiny_model_dir),
        "quantization": "fp32",
        "train_file": str(train_file),
        "val_file": str(val_file),
        "steps": 2,
        "warmup_steps": 1,
        "micro_batch_size": 2,
        "max_length": 1024,
        "extra": {"train.precision": "fp32"} if tool == "ours" else {},
    }
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tune.bench.worker", json.dumps(spec)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("BENCH "))[6:])
    assert result["steps"] == 2 and result["tokens_per_s"] > 0 and result["peak_mb"] > 0
    assert 0 <= result["padding_share"] < 1 and result["step_s"] > 0 and result["supervised_tokens"] > 0
    assert 0 < result["val_loss"] < 20


@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_per_token_matches_a_flop_counter(tiny_model_dir, checkpointing):
    """The FLOP model against torch's FlopCounterMode on a real LoRA step of the tiny model (eager
    attention, so every matmul is counted; the loss scores all but the last position)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lora_tune.bench.flops import flops_per_token
    from lora_tune.config import LoraCfg, ModelCfg
    from lora_tune.models import attach_lora, load_model, prepare_for_training
    from lora_tune.runtime import Precision
    from lora_tune.train.objectives import SFT

    cpu32 = Precision(torch.device("cpu"), torch.float32, "test")
    model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32", attn_implementation="eager"), cpu32)
    prepare_for_training(model, checkpointing)
    pm = attach_lora(model, LoraCfg(r=4, dropout=0.0))
    pm.train()
    rows, seq = 2, 64
    ids = torch.randint(3, model.config.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with FlopCounterMode(display=False) as counter:
        SFT().loss_sum(pm, batch).loss.backward()
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    predicted = flops_per_token(shape, seq, checkpointing, lora_r=4) * rows * seq
    assert 0.95 < counter.get_total_flops() / predicted < 1.02


def test_matmul_peak_is_measured():
    from lora_tune.bench.flops import matmul_peak

    assert matmul_peak(torch.device("cpu"), torch.float32, n=128, reps=2) > 1e6


def test_benchmark_summary_and_table():
    from lora_tune.bench.compare import add_mfu, markdown, summarize

    run = {
        "tool": "ours",
        "name": "x",
        "cpu_kind": "native",
        "tokens_per_s": 10.0,
        "peak_mb": 5.0,
        "val_loss": 1.0,
        "step_s": 2.0,
        "padding_share": 0.25,
        "gradient_checkpointing": True,
        "r": 16,
    }
    trl = {**run, "tool": "trl", "tokens_per_s": 5.0, "peak_mb": 10.0, "padding_share": 0.5}
    # a second repetition of each: ours slower and larger, TRL faster and smaller
    runs = [run, trl, {**run, "tokens_per_s": 8.0, "peak_mb": 7.0}, {**trl, "tokens_per_s": 6.0, "peak_mb": 9.0}]
    runs.append({**run, "cpu_kind": "avx2", "tokens_per_s": 3.0})  # another kind is another row
    runs.append({**trl, "cpu_kind": "avx2", "tokens_per_s": 2.0})
    shape = dict(vocab=100, hidden=8, intermediate=16, layers=2, heads=2, kv_heads=2, head_dim=4, tied=True)
    no_ckpt = {**run, "tool": "ours-no-ckpt", "gradient_checkpointing": False}
    add_mfu([*runs[:2], no_ckpt], {"shape": shape, "attention_seq_len": 10.0, "peak_flops": 1e6})
    # each run is credited with its own settings' work: the same tokens/s without recomputation is less MFU
    from lora_tune.bench.flops import flops_per_token

    ratio = flops_per_token(ModelShape(**shape), 10.0, False, 16) / flops_per_token(ModelShape(**shape), 10.0, True, 16)
    assert no_ckpt["mfu"] == pytest.approx(runs[0]["mfu"] * ratio) and ratio < 1
    summary = summarize(runs)
    native, avx2 = summary
    assert (native["cpu_kind"], avx2["cpu_kind"]) == ("native", "avx2")
    assert native["speedup"] == pytest.approx(9.0 / 5.5)  # medians
    assert native["worst_speedup"] == pytest.approx(8.0 / 6.0)  # our slowest run against TRL's fastest
    assert native["memory_ratio"] == pytest.approx(7.0 / 9.0)  # our highest peak against TRL's lowest
    assert native["trl"]["padding_share"] == 0.5 and avx2["speedup"] == 1.5
    md = markdown(
        {
            "date": "d",
            "git_sha": "s",
            "hardware": {"cpu": "c", "cores": 2, "gpu": None, "cpu_flags": ["avx2", "fma"]},
            "versions": {},
            "warmup_steps": 1,
            "steps": 1,
            "reps": 2,
            "summary": summary,
        }
    )
    assert "CPU flags: avx2, fma" in md and "### native" in md and "### avx2" in md
    assert "| x | 9 | 6 | 1.64x | 1.33x | 5, 7 | 10, 9 | 0.78 |" in md
    assert "| 25.0% | 50.0% |" in md


def test_worker_env_gives_ours_the_allocator_and_each_kind_its_kernels_and_cache(tmp_path):
    from lora_tune.allocator import find_library
    from lora_tune.bench.compare import worker_env
    from lora_tune.bench.worker import Spec

    base = {"PATH": "/usr/bin"}
    spec = dict(name="x", train_file="t", val_file="v")
    ours, trl = (worker_env(Spec(tool=t, cpu_kind="avx2", **spec), base) for t in ("ours", "trl"))
    assert ours["ATEN_CPU_CAPABILITY"] == trl["ATEN_CPU_CAPABILITY"] == "avx2"
    assert "LD_PRELOAD" not in trl  # TRL runs under the system's malloc, as its users do
    assert find_library("mimalloc") in ours["LD_PRELOAD"] or find_library("tcmalloc") in ours["LD_PRELOAD"]
    native = worker_env(Spec(tool="ours", **spec), base)
    assert "ATEN_CPU_CAPABILITY" not in native
    assert native["TORCHINDUCTOR_CACHE_DIR"] != ours["TORCHINDUCTOR_CACHE_DIR"]
    assert "LD_PRELOAD" not in worker_env(Spec(tool="ours", allocator="system", **spec), base)


def test_hardware_records_the_cpu_flags():
    from lora_tune.bench.compare import SIMD_FLAGS, hardware
    from lora_tune.runtime import cpu_flags

    hw = hardware()
    assert set(hw["cpu_flags"]) == cpu_flags() & set(SIMD_FLAGS) and hw["kernels"]


def test_long_bench_data_is_cut_by_every_max_length(tmp_path, tiny_tokenizer):
    from lora_tune.bench.data import write_bench_data
    from lora_tune.data.readers import load_records
    from lora_tune.data.tokenize import encode_records

    train, _ = write_bench_data(tmp_path, n_train=20, n_val=2, shape="long")
    records = load_records(train)
    assert all(16 <= sum(m["role"] == "assistant" for m in r.messages) <= 24 for r in records)
    examples, stats = encode_records(tiny_tokenizer, records, 512)
    assert stats.truncated == len(records) and all(len(e.input_ids) == 512 for e in examples)


def test_train_auto_fit_applies_the_plan(tiny_model_dir, chat_files, tmp_path):
    from lora_tune.finetune import finetune

    train_file, val_file = chat_files
    over = {"train.max_steps": 2, "train.micro_batch_size": 8, "train.grad_accum": 1, "data.max_length": 64}
    cfg = tiny_config(tiny_model_dir, train_file, val_file, tmp_path / "run", **over)
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    import dataclasses

    at_two = estimate(shape, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=2)), "cpu")
    budget_mib = (at_two.total + 1024) / 2**20
    cfg = tiny_config(
        tiny_model_dir,
        train_file,
        val_file,
        tmp_path / "run",
        **over,
        **{"train.auto_fit": True, "train.memory_budget": f"{budget_mib:.4f}MiB"},
    )
    res = finetune(cfg)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert res.steps == 2 and "micro_batch_size: 2" in saved and "grad_accum: 4" in saved


def test_plan_with_a_budget_says_whether_it_fits(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from lora_tune.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{source: {tiny_model_dir}, quantization: bf16}}\ndata: {{train_file: x.jsonl}}\n")
    big = CliRunner().invoke(main, ["plan", str(cfg), "--gpu-memory", "8", "--device", "cpu"])
    assert big.exit_code == 0, big.output
    assert "read as 8 GiB" in big.output and "fits in 8.00 GiB" in big.output and "headroom" in big.output
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    need = estimate(shape, load_config(cfg), "cpu").total
    small = CliRunner().invoke(
        main, ["plan", str(cfg), "--gpu-memory", f"{need * 0.7 / 2**20:.3f}MiB", "--device", "cpu"]
    )
    assert "does not fit" in small.output and "auto-fit (train.auto_fit=true) would choose" in small.output


def test_nothing_fits_never_suggests_4bit_to_a_4bit_config(tiny_model_dir):
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    for quant, hint in (("nf4", False), ("bf16", True)):
        cfg = load_config(None, ["data.train_file=x", f"model.quantization={quant}"])
        with pytest.raises(LoraTuneError, match="nothing fits") as e:
            auto_fit(shape, cfg, 1024)
        assert ("4-bit" in str(e.value)) == hint


def test_planner_per_gpu_for_ddp_and_fsdp():
    shape = ModelShape.from_config(LLAMA_8B)
    common = ["data.train_file=x", "model.quantization=nf4", "data.max_length=1024", "train.micro_batch_size=2"]
    one = estimate(shape, load_config(None, common))
    ddp = estimate(shape, load_config(None, [*common, "train.distributed=ddp"]), gpus=2)
    # DDP: the whole model on each GPU, plus a second fp32 copy of the LoRA gradients and NCCL's buffers
    # LoRA weights, gradients and two AdamW states are 16 bytes a parameter; the buckets 4 more
    assert ddp.parts["DDP gradient buckets"] == pytest.approx(one.parts["LoRA weights + grads + optimizer"] / 4)
    assert ddp.total == pytest.approx(one.total + ddp.parts["DDP gradient buckets"] + ddp.parts["NCCL buffers"])
    assert ddp.gpus == 2
    fsdp = {n: estimate(shape, load_config(None, [*common, "train.distributed=fsdp"]), gpus=n) for n in (2, 4)}
    two, four = fsdp[2].parts, fsdp[4].parts
    shard = "base weights (linear layers), 1/N shard"
    assert two[shard] == pytest.approx(2 * four[shard])  # 1/N of the 4-bit weights
    constants = two["4-bit quantization constants (not sharded)"]
    assert constants == four["4-bit quantization constants (not sharded)"] > 0
    # the shards and the constants add up to the one-GPU 4-bit weights; packed, NF4 is half a byte a weight
    assert 2 * two[shard] + constants == pytest.approx(one.parts["base weights (linear layers)"])
    assert 2 * two[shard] == pytest.approx(shape.linear_params() / 2, rel=1e-6)
    for same in ("activations", "logits + loss"):
        assert two[same] == one.parts[same]
    assert fsdp[4].total < fsdp[2].total < ddp.total
    assert "DDP gradient buckets" not in two
