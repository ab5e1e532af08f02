"""Generation: an error in the generation thread reaches the caller (no hang); chat history fits the context."""

from __future__ import annotations

import threading

import pytest
import torch

from lora_tune.config import ModelCfg
from lora_tune.evaluate.generate import Sampling, prompt_text, stream_reply, trim_history
from lora_tune.models import load_model
from lora_tune.runtime import Precision

CPU32 = Precision(torch.device("cpu"), torch.float32, "test")


def test_an_error_while_generating_is_raised_not_swallowed(tiny_model_dir, tiny_tokenizer):
    model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)

    def broken(**kwargs):
        raise ValueError("bad generation setting")

    model.generate = broken  # this instance only
    result: dict = {}

    def call():
        try:
            stream_reply(model, tiny_tokenizer, [{"role": "user", "content": "hi"}], Sampling(4), lambda *a, **k: None)
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "stream_reply hung after the generation thread failed"
    assert isinstance(result.get("error"), RuntimeError) and "bad generation setting" in str(result["error"])


def test_chat_history_is_trimmed_to_the_context(tiny_tokenizer):
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "the newest question"})

    def length(m):
        return len(tiny_tokenizer(prompt_text(tiny_tokenizer, m), add_special_tokens=False)["input_ids"])

    full = length(msgs)
    kept, dropped = trim_history(tiny_tokenizer, msgs, context=full // 2 + 16, max_new_tokens=16)
    assert dropped > 0 and kept[0] == msgs[0] and kept[-1] == msgs[-1]
    assert length(kept) + 16 <= full // 2 + 16
    assert [m["role"] for m in kept[1:]] == ["user", "assistant"] * ((len(kept) - 2) // 2) + ["user"]
    assert trim_history(tiny_tokenizer, msgs, context=10_000, max_new_tokens=16) == (msgs, 0)


@pytest.mark.parametrize("context", [1])
def test_the_newest_turn_is_kept_even_when_too_long(tiny_tokenizer, context):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    kept, dropped = trim_history(tiny_tokenizer, msgs, context=context, max_new_tokens=1)
    assert kept == msgs[-1:] and dropped == 1


def test_generation_halves_the_batch_on_out_of_memory(tiny_model_dir):
    from lora_tune.evaluate.generate import generate_texts

    model, tiny_tokenizer = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)
    prompts = [prompt_text(tiny_tokenizer, [{"role": "user", "content": f"q{i}"}]) for i in range(5)]
    expected, _ = generate_texts(model, tiny_tokenizer, prompts, Sampling(3), batch_size=1)
    real, sizes = model.generate, []

    def small_batches_only(**kw):
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("pretend")
        return real(**kw)

    model.generate = small_batches_only
    texts, _ = generate_texts(model, tiny_tokenizer, prompts, Sampling(3), batch_size=8)
    assert texts == expected and sizes[:2] == [5, 4] and max(sizes[2:]) == 2
