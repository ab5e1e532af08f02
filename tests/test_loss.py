from __future__ import annotations

import copy

import pytest
import torch

from lora_tune.config import LoraCfg, ModelCfg, TrainCfg
from lora_tune.data.batching import BatchStream, collate
from lora_tune.data.formats import parse_record
from lora_tune.data.tokenize import IGNORE, encode_records
from lora_tune.losses import supervised_loss_sum
from lora_tune.models import attach_lora, load_model, prepare_for_training
from lora_tune.runtime import Precision
from lora_tune.train.objectives import SFT
from lora_tune.train.optim import build_optimizer
from lora_tune.train.step import StepParts, optimizer_step

from conftest import chat

CPU32 = Precision(torch.device("cpu"), torch.float32, "test")
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


def _examples(tok, n=8):
    rows = [chat(f"what is {i} plus {i}?", "the answer is " + "many " * (i % 4) + f"{2 * i}.") for i in range(n)]
    records = [parse_record(r, f"mem:{i}")[0] for i, r in enumerate(rows)]
    return encode_records(tok, records, max_length=64)[0]


def _lora_model(model_dir, dropout=0.0, seed=0):
    model, tok = load_model(ModelCfg(source=str(model_dir), quantization="fp32"), CPU32)
    prepare_for_training(model, gradient_checkpointing=False)
    torch.manual_seed(seed)
    pm = attach_lora(model, LoraCfg(r=4, alpha=8, dropout=dropout))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return pm, tok


def test_supervised_loss_equals_hf_loss(tiny_model_dir):
    pm, tok = _lora_model(tiny_model_dir)
    batch = collate(_examples(tok, 4), tok.pad_token_id)
    loss_sum, n = supervised_loss_sum(pm, batch)
    hf = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(loss_sum / n, hf, rtol=1e-5, atol=1e-6)


def test_accumulation_equals_one_big_batch(tiny_model_dir):
    """2 micro-batches of 4 give the same gradients as 1 batch of 8, despite different lengths/padding."""
    pm, tok = _lora_model(tiny_model_dir)
    examples = _examples(tok, 8)
    updates, losses = [], []
    for mb, accum, split in ((8, 1, 1), (4, 2, 1), (2, 4, 1), (8, 1, 4)):  # the last: 8 rows run as 4 pieces
        model = copy.deepcopy(pm)
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        # plain SGD with lr 1 and no clipping: the update is minus the accumulated gradient
        parts = StepParts(model, SFT(), torch.optim.SGD(params, lr=1.0), NO_SCALER, params, CPU32, 0.0)
        stream = BatchStream(examples, mb, seed=0, pad_id=tok.pad_token_id, shuffle=False)
        out = optimizer_step(parts, [stream.next() for _ in range(accum)], split=split)
        assert out.units == sum(e.n_supervised for e in examples)
        updates.append([b - p.detach() for b, p in zip(before, params, strict=True)])
        losses.append(out.loss)
    for other in updates[1:]:
        for a, b in zip(updates[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-5)


def test_a_step_changes_only_adapter_weights(tiny_model_dir):
    pm, tok = _lora_model(tiny_model_dir, dropout=0.1)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = build_optimizer(params, TrainCfg(lr=1e-2))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stream = BatchStream(_examples(tok, 8), 4, seed=0, pad_id=tok.pad_token_id)
    out = optimizer_step(StepParts(pm, SFT(), opt, scaler, params, CPU32, 1.0), [stream.next() for _ in range(2)])
    assert out.units > 0 and out.loss > 0
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert len(changed) == len(params)  # every adapter weight moved
