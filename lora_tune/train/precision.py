"""Choosing the device and the compute dtype, with a reason a person can read."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from lora_tune.errors import LoraTuneError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """How a run computes: device, autocast dtype, whether fp16 loss scaling is on, and why."""

    device: torch.device
    dtype: torch.dtype
    reason: str

    @property
    def use_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none.
        return self.dtype is torch.float16

    @property
    def name(self) -> str:
        return {v: k for k, v in _DTYPES.items()}[self.dtype]

    def autocast(self) -> AbstractContextManager:
        if self.dtype is torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def choose_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LoraTuneError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    return torch.device(name)


def cpu_bf16_speedup(size: int = 512, reps: int = 5) -> float:
    """Measured fp32-time / bf16-time of a matmul on this CPU (>1 means bf16 is faster)."""
    a = torch.randn(size, size)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # warm-up: first call pays for kernel selection
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ x
        times[dtype] = time.perf_counter() - t0
    return times[torch.float32] / times[torch.bfloat16]


def choose_precision(requested: str, device: torch.device, weight_dtype: str | None = None) -> Precision:
    """Pick the compute dtype.

    `weight_dtype` is the dtype of unquantized base weights (bf16/fp16), which fixes the compute dtype.
    GPU: bf16 where supported, else fp16 with a GradScaler. CPU: bf16 autocast or fp32, whichever
    a quick matmul measurement says is faster on this machine.
    """
    if weight_dtype in ("bf16", "fp16"):
        if requested not in ("auto", weight_dtype):
            raise LoraTuneError(
                f"train.precision={requested} does not match model.quantization={weight_dtype}; "
                f"use train.precision=auto or {weight_dtype}"
            )
        requested = weight_dtype
    if device.type == "cpu" and requested == "fp16":
        raise LoraTuneError("fp16 training is not supported on the CPU; use bf16 or fp32 (train.precision=auto)")
    if requested != "auto":
        dtype = _DTYPES[requested]
        if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise LoraTuneError("this GPU has no bf16 support; use train.precision=fp16 (or auto)")
        why = "set by model.quantization" if weight_dtype == requested else "set by train.precision"
        return Precision(device, dtype, f"{requested} ({why})")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(device, torch.bfloat16, "bf16 autocast: this GPU supports bf16")
        return Precision(device, torch.float16, "fp16 autocast + GradScaler: this GPU has no bf16")
    speedup = cpu_bf16_speedup()
    if speedup > 1.1:
        return Precision(device, torch.bfloat16, f"bf16 autocast: measured {speedup:.1f}x faster than fp32 here")
    return Precision(device, torch.float32, f"fp32: bf16 measured only {speedup:.2f}x fp32's speed on this CPU")
