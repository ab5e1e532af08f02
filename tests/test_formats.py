"""Every format and file type through to token ids and labels, against hand-built expectations."""

from __future__ import annotations

import json

import pytest

from lora_tune.data.formats import parse_record
from lora_tune.data.readers import load_records, read_records
from lora_tune.data.templates import FALLBACK_TEMPLATES
from lora_tune.data.tokenize import IGNORE, encode_messages, encode_record, encode_records
from lora_tune.errors import DataError, LoraTuneError

from conftest import build_tokenizer, write_jsonl


def sup(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])


def rec(obj, fmt="auto", columns=None):
    r, problems = parse_record(obj, "f.jsonl:1", fmt, columns)
    assert not problems, problems
    return r


def test_text_is_all_supervised_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = encode_record(tok, rec({"text": "hello world"}))
    assert ex.input_ids == tok("hello world")["input_ids"] + [tok.eos_token_id]
    assert ex.labels == ex.input_ids


def test_prompt_completion_masks_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = encode_record(tok, rec({"prompt": "what is 2 plus 2?", "completion": " 4"}))
    p, c = tok("what is 2 plus 2?")["input_ids"], tok(" 4", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p + c + [tok.eos_token_id]
    assert ex.labels == [IGNORE] * len(p) + c + [tok.eos_token_id]
    assert encode_record(tok, rec({"prompt": "a", "completion": "b"}), loss_on="all").labels[0] != IGNORE


def test_conversational_prompt_completion_becomes_messages(tiny_tokenizer):
    r = rec(
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "yo"}],
        }
    )
    assert r.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_alpaca_and_sharegpt_match_the_equivalent_messages(tiny_tokenizer):
    tok = tiny_tokenizer
    msgs = [{"role": "user", "content": "sum the numbers\n\n1 2 3"}, {"role": "assistant", "content": "6"}]
    want = encode_messages(tok, msgs)
    alpaca = encode_record(tok, rec({"instruction": "sum the numbers", "input": "1 2 3", "output": "6"}))
    share = encode_record(
        tok,
        rec(
            {
                "conversations": [
                    {"from": "human", "value": "sum the numbers\n\n1 2 3"},
                    {"from": "gpt", "value": "6"},
                ]
            }
        ),
    )
    assert alpaca == want and share == want
    assert sup(tok, want) == "6<|im_end|>"


def test_loss_on_completion_keeps_only_the_last_turn(tiny_tokenizer):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
    ]
    assert sup(tiny_tokenizer, encode_messages(tiny_tokenizer, msgs, loss_on="completion")) == "second<|im_end|>"


def test_column_mapping():
    r = rec({"question": "q?", "answer": "a!"}, columns={"prompt": "question", "completion": "answer"})
    assert (r.prompt, r.completion) == ("q?", "a!")


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "expected a user turn"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "expected an assistant",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 2},
                ]
            },
            "`weight` must be 0 or 1",
        ),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown speaker 'alien'"),
        ({"instruction": "do", "output": ""}, "`output` is empty"),
        ({"prompt": "p", "completion": 3}, "`completion` must be a string"),
        ({"answer": "x"}, "no known fields"),
        ({"messages": [{"role": "user", "content": "a", "tool_calls": []}]}, "unsupported field(s) tool_calls"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_invalid_records(obj, message):
    r, problems = parse_record(obj, "f.jsonl:7", "auto")
    assert r is None and problems and all(p.startswith("f.jsonl:7: ") for p in problems)
    assert message in "\n".join(problems)


def test_file_types_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"text": "one"}])
    (d / "b.json").write_text('[\n  {"prompt": "p", "completion": "c"},\n\n  {"text": "two"}\n]\n')
    msgs = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    (d / "c.csv").write_text(f'messages\n"{msgs.replace(chr(34), chr(34) * 2)}"\n')
    pq.write_table(pa.table({"instruction": ["i"], "output": ["o"]}), d / "d.parquet")
    (d / "e.txt").write_text("a whole document\n\nwith paragraphs\n")
    records = load_records(d)
    assert [r.kind for r in records] == ["text", "prompt_completion", "text", "messages", "messages", "text"]
    assert [r.where.rsplit("/", 1)[1] for r in records] == [
        "a.jsonl:1",
        "b.json:2",
        "b.json:4",
        "c.csv:2",
        "d.parquet:row 1",
        "e.txt:1",
    ]


def test_json_and_csv_errors_carry_line_numbers(tmp_path):
    (tmp_path / "x.json").write_text('[\n {"text": "ok"},\n {"text": ""}\n]')
    (tmp_path / "y.csv").write_text('prompt,completion\n"multi\nline",fine\np,\n')
    _, problems = read_records(tmp_path / "x.json")
    assert problems == [f"{tmp_path / 'x.json'}:3: `text` is empty"]
    _, problems = read_records(tmp_path / "y.csv")
    assert problems == [f"{tmp_path / 'y.csv'}:4: `completion` is empty"]


def test_unsupported_and_missing_sources(tmp_path):
    (tmp_path / "z.xlsx").write_text("x")
    with pytest.raises(LoraTuneError, match="unsupported file type"):
        load_records(tmp_path / "z.xlsx")
    with pytest.raises(LoraTuneError, match="hub dataset"):
        load_records("nobody-here/no-such-dataset")  # offline in tests
    with pytest.raises(DataError):
        write_jsonl(tmp_path / "e.jsonl", ["{nope"])
        load_records(tmp_path / "e.jsonl")


def test_long_text_is_chunked_not_cut(tiny_tokenizer):
    r = rec({"text": "the quick brown fox jumps over the lazy dog " * 6})
    full = encode_record(tiny_tokenizer, r)
    kept, stats = encode_records(tiny_tokenizer, [r], max_length=16)
    assert stats.chunked == 1 and [t for e in kept for t in e.input_ids] == full.input_ids
    assert all(len(e.input_ids) <= 16 for e in kept)


def test_keep_end_truncation_keeps_the_response(tiny_tokenizer):
    r = rec(
        {
            "messages": [
                {"role": "user", "content": "the lazy dog " * 20},
                {"role": "assistant", "content": "yes"},
            ]
        }
    )
    kept, stats = encode_records(tiny_tokenizer, [r], max_length=20, truncation="keep_end")
    assert stats.truncated == 1 and sup(tiny_tokenizer, kept[0]) == "yes<|im_end|>"
    kept, stats = encode_records(tiny_tokenizer, [r], max_length=20, truncation="truncate")
    assert not kept and stats.dropped_no_supervised == 1


# The templates published with each model family, as reproduced offline (no hub access here to compare
# byte for byte); Qwen 2.5's tool-call branches are left out (they render nothing for plain chats).
REAL_TEMPLATES = {
    "llama-3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
        "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    "phi-3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    "qwen2.5": (
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
        "{%- else %}\n"
        "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\\n' }}\n"
        "{%- endif %}\n"
        "{%- for message in messages %}\n"
        '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
        '(message.role == "assistant" and not message.tool_calls) %}\n'
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
        "    {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|im_start|>assistant\\n' }}\n"
        "{%- endif %}\n"
    ),
    "alpaca (no end token)": FALLBACK_TEMPLATES["alpaca"],
}
END = {
    "llama-3": "<|eot_id|>",
    "mistral": "<|im_end|>",
    "gemma": "<end_of_turn>",
    "phi-3": "<|end|>",
    "qwen2.5": "<|im_end|>",
    "alpaca (no end token)": "<|im_end|>",
}


@pytest.fixture(scope="module")
def multi_tok():
    tok = build_tokenizer(with_template=False)
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<start_of_turn>",
                "<end_of_turn>",
                "<|end|>",
                "<|user|>",
                "<|assistant|>",
                "<|system|>",
            ]
        }
    )
    return tok


@pytest.mark.parametrize("name", list(REAL_TEMPLATES))
def test_assistant_mask_on_real_templates(multi_tok, name):
    msgs = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi, how are you?"},
        {"role": "user", "content": "fine"},
        {"role": "assistant", "content": "good to hear."},
    ]
    ex = encode_messages(multi_tok, msgs, template=REAL_TEMPLATES[name])
    end = END[name]
    got = sup(multi_tok, ex)
    assert got == f"hi, how are you?{end}good to hear.{end}", got
    rendered = multi_tok.decode(ex.input_ids)
    assert "hello there" in rendered and "fine" in rendered


@pytest.mark.parametrize("name", ["llama-3", "phi-3", "qwen2.5"])
def test_real_templates_with_a_system_message(multi_tok, name):
    msgs = [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi, how are you?"},
    ]
    ex = encode_messages(multi_tok, msgs, template=REAL_TEMPLATES[name])
    assert sup(multi_tok, ex) == f"hi, how are you?{END[name]}"
    rendered = multi_tok.decode(ex.input_ids)
    assert rendered.count("answer briefly") == 1 and "You are Qwen" not in rendered
