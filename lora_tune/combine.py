"""Combining several LoRA adapters of one base model into one adapter, through peft.

When each method fits:
- `linear`: a weighted average of adapters with the same rank and targets; good for blending closely
  related skills (e.g. two tones of the same assistant).
- `cat`: concatenates the low-rank factors, so the result is exactly the weighted sum of the adapters'
  updates (rank = sum of ranks); the faithful choice when memory allows.
- `ties` / `dare_ties`: trim small entries and resolve sign conflicts before summing (TIES), optionally
  after random drop-and-rescale (DARE); for merging adapters trained on different tasks that would
  otherwise interfere. `density` sets the fraction kept.
- `dare_linear`: DARE drop-and-rescale, then a linear sum.
- `svd`: sums the full updates and re-factorises them to a chosen rank with an SVD; slower, any ranks.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lora_tune.atomic import replace_dir
from lora_tune.errors import LoraTuneError

METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "svd")


def combine_adapters(
    adapters: list[str | Path],
    weights: list[float],
    method: str,
    out_dir: str | Path,
    density: float | None = None,
    base: str | None = None,
) -> Path:
    """Write the combination of `adapters` (one base model) as a loadable adapter folder."""
    import torch
    from peft import PeftModel

    from lora_tune.config import ModelCfg
    from lora_tune.models import adapter_meta, load_model, load_tokenizer, resolve_source
    from lora_tune.runtime import Precision

    adapters = [Path(a) for a in adapters]
    if method not in METHODS:
        raise LoraTuneError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if len(adapters) < 2 or len(weights) != len(adapters):
        raise LoraTuneError("give two or more adapters and one weight per adapter (--weights 0.5,0.5)")
    if method in ("ties", "dare_linear", "dare_ties") and density is None:
        density = 0.5
    metas = [adapter_meta(a) for a in adapters]
    bases = {m.get("base_model") for m in metas if m.get("base_model")}
    if base is None:
        if len(bases) > 1:
            raise LoraTuneError(f"the adapters were trained on different base models: {sorted(bases)}")
        base = next(iter(bases), None)
    if base is None:
        raise LoraTuneError("the adapters do not say which base model they belong to; pass --base SRC")
    # the factors are combined on a CPU copy of the base in fp32; no 4-bit weights are involved
    precision = Precision(torch.device("cpu"), torch.float32, "fp32 for combining")
    model, _ = load_model(ModelCfg(source=base, quantization="fp32"), precision, resolve_source(base))
    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        pm.load_adapter(path, adapter_name=name)
    kwargs = {"density": density} if density is not None else {}
    if method == "svd":
        kwargs["svd_rank"] = max(json.loads((a / "adapter_config.json").read_text())["r"] for a in adapters)
    try:
        pm.add_weighted_adapter(names, list(weights), "combined", combination_type=method, **kwargs)
    except ValueError as e:
        raise LoraTuneError(f"peft could not combine these adapters with {method}: {e}") from None
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        pm.save_pretrained(tmp, selected_adapters=["combined"])
        saved = tmp / "combined" if (tmp / "combined").is_dir() else tmp  # peft nests non-default adapters
        load_tokenizer(str(adapters[0]), ModelCfg(source=str(adapters[0]))).save_pretrained(saved)
        meta = {
            **metas[0],
            "combined_from": [str(a) for a in adapters],
            "weights": list(weights),
            "method": method,
            "density": density,
        }
        (saved / "lora_tune.json").write_text(json.dumps(meta, indent=2))
        replace_dir(saved, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
