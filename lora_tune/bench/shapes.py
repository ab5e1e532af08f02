"""Random-weight models with real architectures, built in memory on the device they will run on.

Memory and speed depend on shapes, not values, so a model with Llama-3.1-8B's config.json and random
weights measures exactly what the real one would, without a download or a 16 GB file. The weights are
initialised on the target device (seconds for 8B on a GPU) and, for 4-bit, each decoder linear is
quantized by bitsandbytes as `from_pretrained(quantization_config=...)` would: same module classes
(`bnb.nn.Linear4bit`), same packed bytes and quantization constants, the head and embeddings left in
16-bit.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_tune.errors import LoraTuneError
from lora_tune.runtime import DTYPES, Precision


def random_model(
    config: dict[str, Any], quantization: str, precision: Precision, double_quant: bool = True, seed: int = 0
):
    """A causal LM of `config` (a config.json as a dict) with random weights, on `precision.device`.

    `quantization`: nf4 / fp4 (bitsandbytes 4-bit, like a QLoRA load) or bf16 / fp16 / fp32.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k != "model_type"}
    cfg = AutoConfig.for_model(config.get("model_type", "llama"), **fields)
    dtype = DTYPES.get(quantization, precision.dtype)
    torch.manual_seed(seed)
    with torch.device(precision.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if quantization in ("nf4", "fp4"):
        quantize_linears(model, quantization, precision.dtype, double_quant)
    elif quantization not in DTYPES:
        raise LoraTuneError(f"random_model: quantization {quantization!r} is not built here; use nf4, fp4 or 16/32-bit")
    model.config.use_cache = False
    return model


def quantize_linears(model: torch.nn.Module, quant_type: str, compute: torch.dtype, double_quant: bool) -> None:
    """Replace every linear of the decoder layers by a bitsandbytes 4-bit one holding its weight, in place."""
    import bitsandbytes as bnb

    decoder = model.get_decoder()
    for layer in decoder.layers:
        for name, child in list(layer.named_modules()):
            if type(child) is not torch.nn.Linear:
                continue
            parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            new = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute,
                compress_statistics=double_quant,
                quant_type=quant_type,
                device="meta",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type
            )
            new.weight = weight.to(child.weight.device)  # quantizes on the way
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            new.quant_state = new.weight.quant_state
            setattr(parent, name.rpartition(".")[2], new)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the 16-bit originals
