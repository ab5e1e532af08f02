"""Token accuracy: the share of supervised tokens whose arg-max prediction is the label, chunked and plain."""

from __future__ import annotations

import pytest
import torch

from lora_tune.chunked_ce import linear_cross_entropy_with_accuracy
from lora_tune.config import ModelCfg
from lora_tune.data.batching import collate
from lora_tune.data.formats import parse_record
from lora_tune.data.tokenize import IGNORE, encode_records
from lora_tune.losses import evaluate_loss, token_losses_and_accuracy
from lora_tune.models import load_model
from lora_tune.runtime import Precision
from lora_tune.train.objectives import SFT

from conftest import chat

CPU32 = Precision(torch.device("cpu"), torch.float32, "test")


@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_chunked_hits_are_the_argmax_hits(rows):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(40, 16, generator=g), torch.randn(50, 16, generator=g)
    best = (h @ w.T).argmax(-1)
    t = torch.randint(0, 50, (40,), generator=g)
    t[::2] = best[::2]  # every other position predicted right, the rest (almost all) wrong
    _, correct = linear_cross_entropy_with_accuracy(h, w, t, rows=rows)
    assert torch.equal(correct, best == t)
    assert 0.5 <= float(correct.float().mean()) < 0.6


def _model_and_batch(tiny_model_dir, tiny_tokenizer):
    model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)
    model.eval()
    rows = [chat(f"what is {i} plus {i}?", f"the answer is {2 * i}, the lazy dog.") for i in range(4)]
    records = [parse_record(r, f"m:{i}")[0] for i, r in enumerate(rows)]
    batch = collate(encode_records(tiny_tokenizer, records, max_length=64)[0], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # relabel half of the supervised positions with the model's own prediction, so accuracy is not ~0
    labels = batch["labels"].clone()
    sup = (labels[:, 1:] != IGNORE).nonzero().tolist()
    for b, t in sup[::2]:
        labels[b, t + 1] = logits[b, t].argmax()
    batch["labels"] = labels
    return model, batch, logits


def test_token_accuracy_equals_a_hand_computation(tiny_model_dir, tiny_tokenizer):
    model, batch, logits = _model_and_batch(tiny_model_dir, tiny_tokenizer)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    hand = sum(int(logits[b, t].argmax() == target[b, t]) for b, t in keep.nonzero().tolist()) / int(keep.sum())
    assert hand >= 0.5
    with torch.no_grad():
        chunked = token_losses_and_accuracy(model, batch, chunked=True)
        plain = token_losses_and_accuracy(model, batch, chunked=False)
    assert torch.equal(chunked.correct, plain.correct)
    assert float(chunked.correct.float().mean()) == pytest.approx(hand, abs=1e-12)
    torch.testing.assert_close(chunked.losses, plain.losses)
    # the objective reports it, and evaluation totals agree
    sft = SFT()
    with torch.no_grad():
        out = sft.loss_sum(model, batch)
    assert sft.report({"correct": float(out.figures["correct"])}, sft.units(batch))["token_accuracy"] == pytest.approx(
        hand
    )
    assert evaluate_loss(model, [batch], CPU32.autocast).token_accuracy == pytest.approx(hand)
