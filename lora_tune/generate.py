"""Greedy or sampled generation for a chat prompt, with the tokenizer's (training) chat template."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_reply(model, tok, messages: list[dict], max_new_tokens: int = 64, temperature: float = 0.0) -> str:
    """The assistant's reply to `messages`; greedy when temperature is 0. Stops at end-of-turn/EOS."""
    device = next(model.parameters()).device
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(device) for k, v in enc.items()}
    was_training = model.training
    model.eval()
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        use_cache=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model.train(was_training)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
