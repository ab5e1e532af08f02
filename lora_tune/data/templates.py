"""Chat templates: the tokenizer's own, or a named fallback for models that ship none."""

from __future__ import annotations

from pathlib import Path

from lora_tune.errors import LoraTuneError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Alpaca has no end-of-turn token: the tokenizer's EOS is added after each response when masking.
ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
FALLBACK_TEMPLATES = {"chatml": CHATML, "llama-3": LLAMA3, "alpaca": ALPACA}

# Tokens that end a turn in common templates (used to supervise the end of each response).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>", "<|eom_id|>")


def resolve_chat_template(tok, fallback: str | None) -> str | None:
    """None to use the tokenizer's own template; else the named fallback or a .jinja file's text."""
    if getattr(tok, "chat_template", None) and fallback is None:
        return None
    if fallback is None:
        return None
    if fallback in FALLBACK_TEMPLATES:
        return FALLBACK_TEMPLATES[fallback]
    path = Path(fallback)
    if not path.is_file():
        names = ", ".join(FALLBACK_TEMPLATES)
        raise LoraTuneError(f"data.chat_template={fallback!r} is neither one of {names} nor an existing .jinja file")
    return path.read_text(encoding="utf-8")


def end_markers(tok) -> list[str]:
    """End-of-turn strings this tokenizer knows, longest first."""
    vocab = tok.get_vocab()
    markers = {tok.eos_token} if tok.eos_token else set()
    markers.update(t for t in END_OF_TURN if t in vocab)
    return sorted(markers, key=len, reverse=True)
