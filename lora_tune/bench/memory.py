"""Measured peak tensor memory of one training step, to check the planner against.

On CUDA this is `max_memory_allocated`. On the CPU, where torch keeps no allocator statistics, it is
the bytes of every tensor alive before the step (weights, quantization constants, LoRA weights,
optimizer states) plus the peak of the running sum of allocations and frees that torch's profiler
records during one full optimizer step.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from lora_tune.config import RunCfg
from lora_tune.losses import IGNORE


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def static_bytes(model, optimizer) -> int:
    """Weights, buffers, bitsandbytes quantization constants and optimizer states."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            inner = getattr(qs, "state2", None) if getattr(qs, "nested", False) else None
            tensors += [qs.absmax, qs.code] + ([inner.absmax, inner.code] if inner is not None else [])
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _tensor_bytes(tensors)


def measure_step(cfg: RunCfg, device: str = "cpu", shape: dict | None = None) -> dict[str, float]:
    """Peak bytes of one optimizer step of `cfg` on batches of `max_length`-token samples, all supervised.

    `shape`: a config.json (as a dict) to build a random-weight model from in memory (`bench.shapes`)
    instead of loading `cfg.model.source`.
    """
    from lora_tune.bench.shapes import random_model
    from lora_tune.models import attach_lora, load_model, prepare_for_training, resolve_source
    from lora_tune.runtime import choose_device, choose_precision
    from lora_tune.train.objectives import SFT
    from lora_tune.train.optim import build_optimizer
    from lora_tune.train.step import StepParts, optimizer_step

    dev = choose_device(device)
    weight = cfg.model.quantization if cfg.model.quantization in ("bf16", "fp16") else None
    precision = choose_precision(cfg.train.precision, dev, weight)
    if shape is not None:
        model = random_model(shape, cfg.model.quantization, precision, cfg.model.double_quant)
    else:
        # the planner plans 4-bit weights kept in 4 bits (as on a GPU), so they are measured that way
        mcfg = dataclasses.replace(cfg.model, cpu_dequantize=False)
        model, _ = load_model(mcfg, precision, resolve_source(cfg.model.source, log=lambda *_: None))
    prepare_for_training(model, cfg.train.gradient_checkpointing)
    model = attach_lora(model, cfg.lora)
    model.train()  # from_pretrained returns eval mode, where checkpointing (and dropout) are off
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision.use_scaler)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.data.max_length)
    ids = torch.randint(3, model.config.vocab_size, shape, generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["labels"][:, 0] = IGNORE

    t = cfg.train
    parts = StepParts(model, SFT(t.chunked_loss), optimizer, scaler, params, precision, t.max_grad_norm)

    def step():
        optimizer_step(parts, [batch])

    step()  # optimizer states exist from here on
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak_bytes": float(torch.cuda.max_memory_allocated()), "static_bytes": float("nan")}
    static = static_bytes(model, optimizer)
    peak = dynamic_peak_bytes(step)
    return {"peak_bytes": float(static + peak), "static_bytes": float(static), "step_peak_bytes": float(peak)}


def planner_check(cfg: RunCfg, device: str = "cpu", shape: dict | None = None) -> dict[str, float]:
    """One optimizer step of `cfg` measured (`measure_step`) against the planner's estimate of its tensors
    (the CUDA context is not a tensor): MB each, and the planner's relative error."""
    from lora_tune.bench.plan import ModelShape, estimate, load_model_config

    measured = measure_step(cfg, device, shape=shape)["peak_bytes"]
    plan = estimate(ModelShape.from_config(shape or load_model_config(cfg.model.source)), cfg, device)
    planned = plan.total - plan.parts.get("CUDA context + allocator slack", 0)
    return {"measured_mb": measured / 2**20, "planned_mb": planned / 2**20, "error": (planned - measured) / measured}


def dynamic_peak_bytes(fn) -> int:
    """Peak CPU tensor bytes allocated (and not yet freed) while `fn()` runs, above the level at its start.

    From the allocator's running total that torch's profiler records with each allocation and free
    (its trace's "[memory]" events). Summing the ops' own "self" memory instead undercounts: an op
    that frees inside itself (a chunked loop, a composite op) books the frees at its start.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not mem:
        return 0
    first = min(mem, key=lambda a: a.get("Ev Idx", 0))  # the earliest event
    start = first["Total Allocated"] - first["Bytes"]
    return max(a["Total Allocated"] for a in mem) - start
