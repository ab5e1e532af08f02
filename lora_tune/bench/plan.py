"""VRAM planner: predict peak training memory from the model's config.json and the run config alone,
and choose settings that fit a memory budget.

The estimate is a sum of parts, each from a simple model of what the training step keeps alive:
- base weights: NF4 = 0.5 byte/param + quantization constants (fp32 absmax per 64 weights, or with
  double quantization an 8-bit absmax per 64 plus fp32 per 256 of those: ~0.516 byte/param in all);
  int8 = 1 byte/param; 16-bit = 2; fp32 = 4. Embeddings, LM head and norms stay unquantized.
- LoRA: r * (in + out) parameters per adapted linear, fp32; with their gradients and AdamW states
  (2 x fp32, or 2 x 1 byte for 8-bit AdamW).
- activations per token per layer: with checkpointing only the layer input is kept (hidden x dtype),
  plus one layer's recompute working set; without it, every saved tensor of every layer.
- logits: only supervised positions get logits in lora_tune. With the chunked loss (default) one chunk of
  rows is alive at a time (fp32 logits, worked on in place, beside a transient 16-bit copy) plus the
  stored gradient of the hidden states; without it, all of them: the fp32 log-softmax kept for backward
  and the two fp32 gradients around it.
- dequantization scratch: one 16-bit copy of the largest quantized matrix (4-bit matmul de-quantizes).
- runtime overhead: CUDA context and allocator slack on a GPU (a constant), nothing on the CPU.

With `gpus` N > 1 the estimate is per GPU, for `train.distributed` (micro_batch_size is per GPU):
- ddp: every GPU holds the whole model and its own micro-batch, plus DDP's gradient buckets (a second
  fp32 copy of the LoRA gradients) and NCCL's buffers;
- fsdp: each GPU keeps 1/N of every weight (the 4-bit quantization constants are module attributes
  that FSDP does not shard: they stay whole); in forward and backward two decoder layers are gathered
  whole (the one computing and the one prefetched) and the root unit (embeddings, head, norms) stays
  gathered for the whole step; LoRA weights, gradients and AdamW states are sharded too. Activations
  and logits are per micro-batch, as on one GPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_tune.chunked_ce import chunk_rows
from lora_tune.config import RunCfg
from lora_tune.errors import LoraTuneError

GIB = 2**30
WEIGHT_BYTES = {"nf4": None, "fp4": None, "int8": 1.0, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0}
CUDA_OVERHEAD = 0.6 * GIB  # CUDA context + cuBLAS workspace + allocator slack, seen on recent GPUs
NCCL_BUFFERS = 0.25 * GIB  # NCCL's communicator buffers per GPU (an allowance by its defaults, not measured here)


def linear_tensor_bytes(n_in: int, n_out: int, quantization: str, double_quant: bool = True) -> int:
    """Bytes of one linear weight as bitsandbytes (or torch) stores it.

    4-bit: two weights a byte; one absmax per block of 64, fp32, or with double quantization 8-bit plus
    one fp32 per 256 of those and a 256-entry fp32 code table; the 16-entry fp32 NF4/FP4 table. int8:
    one byte a weight and an fp32 scale per output row.
    """
    n = n_in * n_out
    if quantization in ("nf4", "fp4"):
        blocks = math.ceil(n / 64)
        absmax = blocks + 4 * math.ceil(blocks / 256) + 256 * 4 if double_quant else 4 * blocks
        return math.ceil(n / 2) + absmax + 16 * 4
    if quantization == "int8":
        return n + 4 * n_out
    return n * int(WEIGHT_BYTES[quantization])


@dataclass
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        try:
            heads = cfg["num_attention_heads"]
            return cls(
                cfg["vocab_size"],
                cfg["hidden_size"],
                cfg["intermediate_size"],
                cfg["num_hidden_layers"],
                heads,
                cfg.get("num_key_value_heads") or heads,
                cfg.get("head_dim") or cfg["hidden_size"] // heads,
                bool(cfg.get("tie_word_embeddings")),
            )
        except KeyError as e:
            raise LoraTuneError(
                f"config.json lacks {e.args[0]}; the planner knows decoder-only transformers "
                "(Llama, Mistral, Qwen, SmolLM, ...)"
            ) from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear in one layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def norm_params(self) -> int:
        return self.hidden * (2 * self.layers + 1)


@dataclass
class Plan:
    """A memory estimate in bytes, by part, and the settings it assumes."""

    parts: dict[str, float]
    micro_batch_size: int
    grad_accum: int
    max_length: int
    gradient_checkpointing: bool
    device: str
    notes: list[str] = field(default_factory=list)
    gpus: int = 1  # the estimate is per GPU of this many

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def load_model_config(source: str) -> dict[str, Any]:
    """config.json of a local folder, a builtin model or a hub id (only that file is fetched)."""
    from lora_tune.models import resolve_source

    resolved = resolve_source(source, log=lambda *_: None)  # errors clearly on missing local paths
    if Path(resolved).is_dir():
        path = Path(resolved) / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(resolved, "config.json"))
        except Exception as e:  # noqa: BLE001 - offline, gated or missing: all say the same to the user
            raise LoraTuneError(
                f"could not read config.json of {source} ({type(e).__name__}); pass a local folder or go online"
            ) from None
    return json.loads(path.read_text())


def estimate(
    shape: ModelShape, cfg: RunCfg, device: str = "cuda", supervised_fraction: float = 1.0, gpus: int = 1
) -> Plan:
    """Peak training memory of `cfg` on `shape` (worst case: every sample `max_length` tokens long), per
    GPU when training on `gpus` of them (see the module docstring)."""
    m, lo, t = cfg.model, cfg.lora, cfg.train
    act_bytes = 4.0 if t.precision == "fp32" or (m.quantization == "fp32" and device == "cpu") else 2.0
    q = m.quantization
    unquant_bytes = WEIGHT_BYTES[q] if q in ("bf16", "fp16", "fp32") else act_bytes
    parts: dict[str, float] = {}
    per_layer = sum(linear_tensor_bytes(a, b, q, m.double_quant) for a, b in shape.linears().values())
    parts["base weights (linear layers)"] = float(shape.layers * per_layer)
    parts["embeddings, LM head, norms"] = (shape.embedding_params() + shape.norm_params()) * unquant_bytes
    linears = shape.linears()
    targets = set(linears) if lo.target_modules == "all-linear" else set(lo.target_modules) & set(linears)
    lora_params = shape.layers * sum(lo.r * (a + b) for name, (a, b) in linears.items() if name in targets)
    opt_bytes = 8.0 if t.optimizer in ("adamw", "paged_adamw_32bit") else 2.0
    parts["LoRA weights + grads + optimizer"] = lora_params * (4 + 4 + opt_bytes)
    tokens = t.micro_batch_size * cfg.data.max_length
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    lora_inputs = len(targets) * h if lo.dropout > 0 else 0  # dropout keeps a masked copy of each input
    # per token, one layer: norms in/out, q/k/v, attention output, MLP gate/up/act/product, residuals
    layer_saved = (6 * h + 2 * kv + 4 * i + lora_inputs) * act_bytes + 2 * h * 4  # RMSNorm keeps fp32 inputs
    if t.gradient_checkpointing:
        parts["activations"] = tokens * (shape.layers * h * act_bytes + layer_saved)
    else:
        parts["activations"] = tokens * shape.layers * layer_saved
    supervised = tokens * supervised_fraction
    if t.chunked_loss:
        transient = act_bytes if act_bytes < 4 else 0  # the 16-bit logits beside their fp32 copy
        chunk = min(supervised, chunk_rows(shape.vocab)) * shape.vocab * (4 + transient)
        if t.gradient_checkpointing:
            # the loss runs at the end of forward, one layer's recompute in backward: never both at once
            chunk = max(0.0, chunk - tokens * layer_saved)
        parts["logits + loss"] = chunk + supervised * h * act_bytes  # + the stored hidden-state gradient
    else:
        # the fp32 log-softmax saved for backward and, in backward, the gradients into and out of it
        parts["logits + loss"] = supervised * shape.vocab * 12
    if q in ("nf4", "fp4", "int8"):
        parts["de-quantization scratch"] = max(a * b for a, b in linears.values()) * act_bytes * 2
    if device == "cuda":
        parts["CUDA context + allocator slack"] = CUDA_OVERHEAD
    if gpus > 1:
        distribute(parts, shape, cfg, gpus, lora_params, per_layer)
    batch = (t.micro_batch_size, t.grad_accum, cfg.data.max_length, t.gradient_checkpointing)
    return Plan(parts, *batch, device, gpus=gpus)


def distribute(parts: dict[str, float], shape: ModelShape, cfg: RunCfg, gpus: int, lora_params: int, layer: int):
    """Turn the one-GPU `parts` into one GPU's share of training on `gpus` (DDP or FSDP), in place."""
    if cfg.train.distributed == "ddp":
        parts["DDP gradient buckets"] = lora_params * 4.0
        parts["NCCL buffers"] = NCCL_BUFFERS
        return
    constants = 0.0
    if cfg.model.quantization in ("nf4", "fp4"):  # absmax etc. live in the modules' quant_state: not sharded
        n = sum(a * b for a, b in shape.linears().values())
        constants = float(shape.layers * (layer - math.ceil(n / 2)))
    linear, root = parts["base weights (linear layers)"], parts["embeddings, LM head, norms"]
    sharded = {
        "base weights (linear layers)": {
            "base weights (linear layers), 1/N shard": (linear - constants) / gpus,
            "4-bit quantization constants (not sharded)": constants,
            "two decoder layers gathered (computing + prefetched)": 2.0 * (layer - constants / shape.layers),
        },
        "embeddings, LM head, norms": {"embeddings, LM head, norms: shard + gathered for the step": root / gpus + root},
        "LoRA weights + grads + optimizer": {
            "LoRA weights + grads + optimizer, 1/N shard": parts["LoRA weights + grads + optimizer"] / gpus
        },
    }
    items = [(k, v) for name, value in parts.items() for k, v in sharded.get(name, {name: value}).items() if v]
    parts.clear()
    parts.update(items)
    parts["NCCL buffers"] = NCCL_BUFFERS


def auto_fit(shape: ModelShape, cfg: RunCfg, budget: float, device: str = "cuda") -> tuple[RunCfg, Plan]:
    """The fastest settings that fit `budget` bytes, keeping the effective batch (micro-batch x accumulation).

    Tries, in order: the given settings; gradient checkpointing on; smaller micro-batches (more
    accumulation); finally a shorter max_length. Raises when nothing fits.
    """
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum
    candidates = []
    for ckpt in [cfg.train.gradient_checkpointing] + ([True] if not cfg.train.gradient_checkpointing else []):
        mb = cfg.train.micro_batch_size
        while mb >= 1:
            candidates.append((ckpt, mb, cfg.data.max_length))
            mb //= 2
    length = cfg.data.max_length // 2
    while length >= 128:
        candidates.append((True, 1, length))
        length //= 2
    for ckpt, mb, length in candidates:
        trial = replace(
            cfg,
            train=replace(
                cfg.train,
                gradient_checkpointing=ckpt,
                micro_batch_size=mb,
                grad_accum=max(1, math.ceil(effective / mb)),
            ),
            data=replace(cfg.data, max_length=length),
        )
        plan = estimate(shape, trial, device)
        if plan.total <= budget:
            if (ckpt, mb, length) != candidates[0]:
                plan.notes.append(
                    f"chose micro_batch_size={mb}, grad_accum={trial.train.grad_accum}, "
                    f"gradient_checkpointing={ckpt}, max_length={length} to fit {budget / GIB:.1f} GiB"
                )
            return trial, plan
    four_bit = cfg.model.quantization in ("nf4", "fp4")
    raise LoraTuneError(
        f"nothing fits in {budget / GIB:.1f} GiB, even micro-batch 1 at max_length 128 with "
        f"checkpointing; use a smaller model{'' if four_bit else ' or 4-bit weights (model.quantization=nf4)'}"
    )


def parse_size(text: str) -> float:
    """'12GiB', '12GB', '12g', '800MiB' -> bytes (GB and GiB both taken as 2**30, as GPUs are sold)."""
    import re

    m = re.fullmatch(r"\s*([\d.]+)\s*([gmk]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise LoraTuneError(f"--gpu-memory {text!r}: write a size like 12GiB or 800MiB")
    return float(m.group(1)) * {"g": GIB, "m": 2**20, "k": 2**10, "": GIB}[m.group(2)]
