"""The random-weight model shapes in benchmarks/shapes/ have the published parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHAPES = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes"
PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_model_built_from_the_shape_has_the_published_size(name):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**json.loads((SHAPES / f"{name}.json").read_text()))
    with torch.device("meta"):  # shapes only: nothing allocated
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
