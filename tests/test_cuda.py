"""The CUDA subset (`pytest -m cuda`): what only a GPU can show. Skipped where no GPU is visible (CI);
`benchmarks/gpu_acceptance.sh` runs it on a GPU machine and records the outcome.

- exact resume on CUDA, the CUDA random state included (LoRA dropout draws from it);
- the fp16 GradScaler path (scale, unscale before clipping, skipped steps) trains and resumes;
- NF4 gradients through bitsandbytes' CUDA kernels equal those through the de-quantized weights;
- merge and its fidelity check on the GPU;
- a real out-of-memory error (a memory cap) is recovered by splitting the micro-batch.
"""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from lora_tune.config import LoraCfg, ModelCfg
from lora_tune.train.hooks import Hook
from lora_tune.train.loop import train

from conftest import tiny_config

pytestmark = pytest.mark.cuda

CUDA = {"train.device": "cuda"}


class StopAfter(Hook):
    """Simulates a crash (Ctrl-C) right after step `n` is done and checkpointed."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, run, out):
        if run.state.step == self.n:
            raise KeyboardInterrupt


def _losses(run) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r.get("split"), r["step"], r["loss"]) for r in map(json.loads, lines)]


def _train_cut_and_resume(tiny_model_dir, chat_files, tmp_path, **extra):
    """(uninterrupted run dir, interrupted-then-resumed run dir) of the same settings."""
    settings = {**CUDA, "train.max_steps": 6, "train.save_every": 3, "lora.dropout": 0.1, **extra}
    quiet = Console(quiet=True)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train(tiny_config(tiny_model_dir, *chat_files, ref, **settings), console=quiet)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model_dir, *chat_files, cut, **settings), console=quiet, hooks=[StopAfter(4)])
    train(tiny_config(tiny_model_dir, *chat_files, cut, **settings), resume=True, console=quiet)
    return ref, cut


def test_resume_on_cuda_is_exact_with_the_cuda_random_state(tiny_model_dir, chat_files, tmp_path):
    torch.backends.cudnn.deterministic = True
    ref, cut = _train_cut_and_resume(tiny_model_dir, chat_files, tmp_path)
    assert _losses(cut) == _losses(ref)  # dropout masks after the resume are the ones of the uninterrupted run
    rng = torch.load(sorted((cut / "checkpoints").iterdir())[-1] / "rng.pt", weights_only=True)
    assert len(rng["cuda"]) == torch.cuda.device_count() >= 1


def test_fp16_trains_with_the_grad_scaler_and_resumes(tiny_model_dir, chat_files, tmp_path):
    fp16 = {"model.quantization": "fp16", "train.precision": "fp16"}
    ref, cut = _train_cut_and_resume(tiny_model_dir, chat_files, tmp_path, **fp16)
    losses = [loss for split, _, loss in _losses(ref) if split != "val"]
    assert all(map(lambda v: v == v and abs(v) < 1e4, losses))  # finite
    assert losses[-1] < losses[0]
    scaler = torch.load(sorted((ref / "checkpoints").iterdir())[-1] / "scaler.pt", weights_only=True)
    assert scaler["scale"] > 0  # the scaler was on (a disabled one saves an empty state)
    got = [loss for split, _, loss in _losses(cut) if split != "val"]
    assert got == pytest.approx(losses, rel=1e-3)


def test_nf4_gradients_on_cuda_equal_the_dequantized_model(tiny_model_dir):
    import bitsandbytes.functional as bf

    from lora_tune.models import attach_lora, load_model, prepare_for_training
    from lora_tune.runtime import choose_precision

    gpu32 = choose_precision("fp32", torch.device("cuda"))
    q_model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="nf4"), gpu32)
    d_model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), gpu32)
    assert next(q_model.model.layers[0].parameters()).device.type == "cuda"
    dense = dict(d_model.named_modules())
    for name, mod in q_model.named_modules():
        if mod.__class__.__name__ == "Linear4bit":
            dense[name].weight.data.copy_(bf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float())
    x = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    grads = []
    for m in (q_model, d_model):
        prepare_for_training(m, gradient_checkpointing=True)
        torch.manual_seed(1)
        pm = attach_lora(m, LoraCfg(r=4, alpha=8, dropout=0.0))
        pm.train()
        for n, p in pm.named_parameters():  # a non-zero B, so that A gets gradients too
            if "lora_B" in n:
                p.data.normal_(0, 0.02, generator=torch.Generator(p.device).manual_seed(len(n)))
        pm(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-5, msg=n)


def test_merge_and_its_fidelity_check_on_the_gpu(tiny_model_dir, chat_files, tmp_path):
    from lora_tune.merge import merge_adapter

    run = tmp_path / "run"
    settings = {**CUDA, "train.max_steps": 4, "model.quantization": "nf4", "train.precision": "bf16"}
    train(tiny_config(tiny_model_dir, *chat_files, run, **settings), console=Console(quiet=True))
    report = merge_adapter(run / "adapter", tmp_path / "merged", dtype="bf16", base_weights="dequantized", log=print)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    last = report.fidelity[-1]
    assert last.reference.startswith("as trained: nf4")
    assert last.mean_kl < 1e-3


def test_a_real_out_of_memory_error_is_recovered_by_splitting(tmp_path):
    """Cap this process's GPU memory above its weights at 10 rows' worth of activations (by the planner),
    then run one optimizer step of 16 rows: CUDA raises a real OutOfMemoryError, and the step is redone
    in pieces (8 or 4 rows) with the loss of the whole batch."""
    from lora_tune.bench.plan import ModelShape, estimate
    from lora_tune.bench.shapes import random_model
    from lora_tune.config import load_config
    from lora_tune.models import attach_lora, prepare_for_training
    from lora_tune.runtime import choose_precision
    from lora_tune.train.objectives import SFT
    from lora_tune.train.optim import build_optimizer
    from lora_tune.train.step import StepParts, optimizer_step

    shape = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096}
    shape |= {"num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4}
    shape |= {"max_position_embeddings": 4096, "tie_word_embeddings": False}
    cfg = load_config(None, ["data.train_file=x", "model.quantization=bf16", "data.max_length=2048"])
    plan = {mb: estimate(ModelShape.from_config(shape), _with(cfg, mb), "cuda").total for mb in (4, 16)}
    per_row = (plan[16] - plan[4]) / 12  # activations and logits of one 2048-token row
    precision = choose_precision("bf16", torch.device("cuda"), "bf16")

    def step(cap_bytes: float | None):
        torch.manual_seed(0)
        model = random_model(shape, "bf16", precision)
        prepare_for_training(model, gradient_checkpointing=False)
        model = attach_lora(model, LoraCfg(r=8, alpha=16, dropout=0.0))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(params, cfg.train)
        parts = StepParts(model, SFT(), opt, torch.amp.GradScaler("cuda", enabled=False), params, precision)
        ids = torch.randint(3, 32000, (16, 2048), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        if cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + cap_bytes) / total))
        notes: list[str] = []
        try:
            return optimizer_step(parts, [batch], log=notes.append), notes
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            del model, opt, parts
            torch.cuda.empty_cache()

    whole, _ = step(None)
    cut, notes = step(10 * per_row)
    assert cut.recovered and cut.split >= 2 and any("out of memory" in n for n in notes), notes
    assert cut.loss == pytest.approx(whole.loss, rel=1e-3)


def _with(cfg, micro: int):
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro))
