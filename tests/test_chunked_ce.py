from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_tune.bench.memory import dynamic_peak_bytes
from lora_tune.chunked_ce import linear_cross_entropy
from lora_tune.config import LoraCfg, ModelCfg
from lora_tune.data.batching import collate
from lora_tune.data.formats import parse_record
from lora_tune.data.tokenize import encode_records
from lora_tune.losses import supervised_loss_sum
from lora_tune.models import attach_lora, load_model, prepare_for_training
from lora_tune.runtime import Precision

from conftest import chat


def _case(n=37, hidden=24, vocab=101, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype)
    t = torch.randint(0, vocab, (n,), generator=g)
    upstream = torch.rand(n, generator=g)  # unequal per-position weights, as a token-weighted sum gives
    return h, w, t, upstream


def _plain(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, reduction="none")


@pytest.mark.parametrize("rows", [1, 8, 37, 1000])
def test_matches_plain_cross_entropy_in_fp32(rows):
    h, w, t, up = _case()
    ref = _plain(h, w, t)
    (ref * up).sum().backward()
    ref_grad, h.grad = h.grad.clone(), None
    ours = linear_cross_entropy(h, w, t, rows=rows)
    (ours * up).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_plain_cross_entropy_under_bf16_autocast(dtype):
    h, w, t, up = _case(dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _plain(h, w, t)
    (ref * up).sum().backward()
    ref_grad, h.grad = h.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t, rows=8)
    (ours * up).sum().backward()
    assert ours.dtype == torch.float32 and h.grad.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # same bf16 logits, same fp32 softmax
    # the gradient differs only in where one bf16 rounding happens (before or after the upstream scale)
    torch.testing.assert_close(h.grad.float(), ref_grad.float(), rtol=2e-2, atol=4e-3)


def _matmuls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")


def test_no_gradient_work_without_grad():
    """Without autograd each chunk does one matmul (the logits); with it, two (and the gradient one)."""
    h, w, t, _ = _case()  # 37 rows in chunks of 5: 8 chunks
    with torch.no_grad():
        losses = linear_cross_entropy(h, w, t, rows=5)
    assert not losses.requires_grad
    torch.testing.assert_close(losses, _plain(h, w, t).detach(), rtol=1e-5, atol=1e-5)

    def without():
        with torch.no_grad():
            linear_cross_entropy(h, w, t, rows=5)

    def with_grad():
        linear_cross_entropy(h, w, t, rows=5)

    assert _matmuls(with_grad) == 2 * _matmuls(without) and _matmuls(without) >= 8


def test_refuses_a_trainable_head():
    h, w, t, _ = _case()
    with pytest.raises(ValueError, match="plain loss"):
        linear_cross_entropy(h, w.requires_grad_(), t)


def test_peak_memory_is_a_fraction_of_the_plain_path():
    """512 positions x 32k vocabulary: the plain path holds ~5 x 64 MB of logits; chunks hold one slice."""
    h, w, t, _ = _case(n=512, hidden=64, vocab=32_000)

    def run(fn):
        def go():
            fn(h, w, t).sum().backward()
            h.grad = None

        return dynamic_peak_bytes(go)

    plain = run(_plain)
    chunked = run(lambda *a: linear_cross_entropy(*a, rows=64))
    logits_fp32 = 512 * 32_000 * 4
    assert plain > 2 * logits_fp32
    assert chunked < logits_fp32 / 2


def _lora_model(model_dir, train_head=False):
    cpu32 = Precision(torch.device("cpu"), torch.float32, "test")
    model, tok = load_model(ModelCfg(source=str(model_dir), quantization="fp32"), cpu32)
    prepare_for_training(model, gradient_checkpointing=False)
    torch.manual_seed(0)
    pm = attach_lora(model, LoraCfg(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"] if train_head else []))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    rows = [chat(f"what is {i} times 3?", f"it is {3 * i}, " + "surely " * i) for i in range(4)]
    records = [parse_record(r, f"mem:{i}")[0] for i, r in enumerate(rows)]
    batch = collate(encode_records(tok, records, max_length=64)[0], tok.pad_token_id)
    return pm, batch


def test_model_loss_and_lora_gradients_match_with_and_without_chunks(tiny_model_dir):
    pm, batch = _lora_model(tiny_model_dir)
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    results = []
    for chunked in (False, True):
        loss, n = supervised_loss_sum(pm, batch, chunked=chunked)
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in params.items()}))
        pm.zero_grad(set_to_none=True)
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for k in params:
        torch.testing.assert_close(chunked_grads[k], plain_grads[k], rtol=1e-4, atol=1e-7)


def test_a_trained_head_takes_the_plain_path_and_gets_its_gradient(tiny_model_dir):
    pm, batch = _lora_model(tiny_model_dir, train_head=True)
    loss, n = supervised_loss_sum(pm, batch, chunked=True)
    (loss / n).backward()
    head_grads = [p.grad for name, p in pm.named_parameters() if "lm_head" in name and p.requires_grad]
    assert head_grads and all(g is not None and g.abs().sum() > 0 for g in head_grads)
