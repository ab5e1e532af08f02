"""Model FLOPs per trained token and the measured matmul peak of this machine, for MFU.

For LoRA on a frozen base, one token costs (N = parameters in the linear layers and the LM head):
- forward 2N, and backward 2N for the input gradients only (frozen weights get no weight gradients);
- with gradient checkpointing, a second forward of the layers: +2N (minus the LM head);
- attention scores and mixing (no parameters): 4 * layers * (heads * head_dim) * s forward per token
  for a sequence of s tokens, twice that backward, once more when recomputed;
- the LoRA matrices themselves: 6 * r * (in + out) per adapted linear (they do get weight gradients).
MFU is achieved FLOP/s over the peak FLOP/s of a large matmul measured on the same device and dtype.
Recomputation is counted, as the issue asks: this is closer to "hardware FLOPs utilisation".
"""

from __future__ import annotations

import time

import torch

from lora_tune.bench.plan import ModelShape


def flops_per_token(shape: ModelShape, seq_len: float, checkpointing: bool, lora_r: int) -> float:
    """Training FLOPs for one token of a sequence of `seq_len` tokens (LoRA on every linear)."""
    layer_linear = shape.layers * sum(a * b for a, b in shape.linears().values())
    head = shape.vocab * shape.hidden
    attn_fwd = 4 * shape.layers * shape.heads * shape.head_dim * seq_len
    lora = shape.layers * sum(lora_r * (a + b) for a, b in shape.linears().values())
    total = 4 * (layer_linear + head) + 3 * attn_fwd + 6 * lora
    if checkpointing:
        total += 2 * layer_linear + attn_fwd + 2 * lora
    return float(total)


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None, reps: int = 5
) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` on `device` (a practical peak, not the datasheet's)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)  # warm-up: kernels chosen, pages touched
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def mfu(tokens_per_s: float, per_token: float, peak: float) -> float:
    return tokens_per_s * per_token / peak
