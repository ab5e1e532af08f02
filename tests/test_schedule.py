from __future__ import annotations

import math

import pytest
import torch

from lora_tune.config import TrainCfg
from lora_tune.train.optim import build_scheduler, lr_factor


def test_warmup_is_linear_and_reaches_peak():
    assert [lr_factor(s, 10, 4, "constant") for s in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_cosine_goes_from_peak_to_min_at_last_step():
    total, warm = 12, 1
    vals = [lr_factor(s, total, warm, "cosine", 0.1) for s in range(total)]
    assert vals[1] == pytest.approx(1.0)
    assert vals[-1] == pytest.approx(0.1)
    mid = 1 + (total - warm - 1) // 2
    assert vals[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(vals[1:], vals[2:], strict=False))


def test_linear_decay():
    vals = [lr_factor(s, 5, 0, "linear") for s in range(5)]
    assert vals == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = build_scheduler(opt, TrainCfg(lr=0.5, warmup_steps=1, schedule="linear"), total_steps=3)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.25, 0.5, 0.0])
