"""Evaluation sees prompts exactly as training did; a reply whose end can't be found is an error, not an EOS
at the start of the turn."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors

from lora_tune.config import ModelCfg
from lora_tune.data.formats import parse_record
from lora_tune.data.tokenize import IGNORE, encode_record
from lora_tune.errors import LoraTuneError
from lora_tune.evaluate.generate import Sampling, generate_texts
from lora_tune.evaluate.run import prompt_ids
from lora_tune.models import fix_tokenizer, load_model
from lora_tune.runtime import Precision

from conftest import build_tokenizer, chat

CPU32 = Precision(torch.device("cpu"), torch.float32, "test")


def _bos_tokenizer():
    tok = build_tokenizer()
    fix_tokenizer(tok)  # as loading does: a pad token for batched generation
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    return tok, bos


def test_a_raw_prompt_is_scored_with_the_bos_training_gave_it(tiny_model_dir):
    tok, bos = _bos_tokenizer()
    rec = parse_record({"prompt": "what is 2 plus 2?", "completion": " 4"}, "mem:1")[0]
    ex = encode_record(tok, rec)
    prompt_part = [t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label == IGNORE]
    assert prompt_part[0] == bos
    assert prompt_ids(tok, rec) == prompt_part  # generation starts from the very tokens training saw
    model, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)
    texts, _ = generate_texts(model, tok, [prompt_ids(tok, rec), "hello"], Sampling(3))
    assert len(texts) == 2


def test_chat_prompts_match_training_tokens(tiny_tokenizer):
    rec = parse_record(chat("what is 1 plus 1?", "2."), "mem:2")[0]
    ex = encode_record(tiny_tokenizer, rec)
    ids = prompt_ids(tiny_tokenizer, rec)
    assert ex.input_ids[: len(ids)] == ids and all(label == IGNORE for label in ex.labels[: len(ids)])


def test_a_reply_the_template_rewrites_without_an_end_marker_is_an_error(tiny_tokenizer):
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tiny_tokenizer.chat_template = template
    try:
        rec = parse_record(chat("hello there", "general kenobi"), "data/train.jsonl:7")[0]
        with pytest.raises(LoraTuneError, match=r"data/train.jsonl:7: assistant turn 1: the chat template changes"):
            encode_record(tiny_tokenizer, rec, template)
    finally:
        from lora_tune.data.templates import CHATML

        tiny_tokenizer.chat_template = CHATML
