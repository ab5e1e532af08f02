"""The serving engine in-process: continuous batching, mixed adapters, sampling, stops, LRU, deadlines."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from serve_helpers import random_adapter

from lora_tune.config import ModelCfg
from lora_tune.errors import LoraTuneError
from lora_tune.evaluate.generate import stop_ids
from lora_tune.models import load_tokenizer
from lora_tune.server.adapters import AdapterBusy, AdapterSet, Served, find_adapter_folders, parse_adapter_args
from lora_tune.server.decode import RowSampling, TextTracker, held_back
from lora_tune.server.inference import Engine, Failed, Finished, Job, Piece, QueueFull

PROMPTS = ["the quick brown fox", "hello world, how are", "answer the question about", "0123 + 45 ="]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, load_tokenizer(str(tiny_model_dir), ModelCfg(source=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: random_adapter(tiny_model_dir, root / name, seed) for seed, name in enumerate(["a", "b", "c"])}


def fresh_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def reference(model, tok, prompt: str, n: int, adapter_dir=None) -> list[int]:
    """Greedy tokens from transformers' own generate (with the adapter loaded alone)."""
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


class Collector:
    def __init__(self):
        self.pieces, self.end, self.done = [], None, threading.Event()
        self.tokens = []

    def __call__(self, ev):
        if isinstance(ev, Piece):
            self.pieces.append(ev.text)
        else:
            self.end = ev
            self.done.set()


def job(tok, model_id, prompt, n, emit, sampling=None, stops=(), deadline=float("inf")):
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    text = TextTracker(tok, stops)
    return Job(model_id, ids, n, sampling or RowSampling(), frozenset(), text, emit, deadline=deadline)


def make_engine(model, tok, named=None, max_loaded=4, **kw):
    served = Served("fp32", "original", "fp32")
    return Engine(AdapterSet(model, "base", tok, served, named or {}, None, max_loaded), **kw)


def test_rows_joining_mid_flight_and_mixed_adapters_match_solo_generate(tiny_model_dir, base, adapter_dirs):
    """Each row, whatever joined the batch before or after it and whichever adapter its neighbours use,
    gets exactly the tokens transformers' generate gives it alone (fp32)."""
    _, tok = base
    n = 16
    plan = [("base", PROMPTS[0]), ("a", PROMPTS[1]), ("b", PROMPTS[2]), ("a", PROMPTS[3])]
    expected = [
        reference(fresh_model(tiny_model_dir), tok, p, n, None if m == "base" else adapter_dirs[m]) for m, p in plan
    ]
    assert expected[1] != reference(fresh_model(tiny_model_dir), tok, PROMPTS[1], n)  # the adapter matters
    eng = make_engine(fresh_model(tiny_model_dir), tok, {k: adapter_dirs[k] for k in "ab"})
    outs = [Collector() for _ in plan]
    tracked = []

    def emit_then_join(i):
        def emit(ev):  # when row i has produced 2 tokens, the next request arrives (joins mid-flight)
            outs[i](ev)
            if i + 1 < len(plan) and len(tracked[i].text.ids) >= 2 and len(tracked) == i + 1:
                tracked.append(job(tok, *plan[i + 1], n, emit_then_join(i + 1)))
                eng.submit([tracked[-1]])

        return emit

    tracked.append(job(tok, *plan[0], n, emit_then_join(0)))
    eng.submit([tracked[0]])
    for _ in range(200):  # bounded: 4 rows of 16 tokens need about 25 steps
        if len(tracked) == len(plan) and all(o.done.is_set() for o in outs):
            break
        eng.step()
    for t, want in zip(tracked, expected, strict=True):
        assert t.text.ids == want
    assert eng.stats.max_models_in_a_step == 3 and eng.stats.max_batch_seen == 4
    assert "".join(outs[1].pieces) == tok.decode(expected[1], skip_special_tokens=True)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny_model_dir, base):
    _, tok = base
    eng = make_engine(fresh_model(tiny_model_dir), tok)

    def sampled(companions: int) -> list[int]:
        rows = [job(tok, "base", PROMPTS[0], 10, Collector(), RowSampling.make(0.9, 0.9, 7, torch.device("cpu")))]
        cpu = torch.device("cpu")
        rows += [job(tok, "base", PROMPTS[k % 4], 10, Collector(), RowSampling.make(1.0, 1.0, None, cpu))
                 for k in range(companions)]  # fmt: skip
        eng.submit(rows)
        while any(not r.done for r in rows):
            eng.step()
        return rows[0].text.ids

    alone = sampled(0)
    assert sampled(3) == alone and sampled(1) == alone
    other = job(tok, "base", PROMPTS[0], 10, Collector(), RowSampling.make(0.9, 0.9, 8, torch.device("cpu")))
    eng.submit([other])
    while not other.done:
        eng.step()
    assert other.text.ids != alone  # another seed, another sample


def test_end_tokens_stop_strings_and_lengths(tiny_model_dir, base):
    model, tok = base
    eng = make_engine(model, tok)
    free = job(tok, "base", PROMPTS[1], 16, Collector())
    eng.submit([free])
    while not free.done:
        eng.step()
    text = free.text.sent
    assert isinstance(free.emit.end, Finished) and free.emit.end.reason == "length" and free.generated == 16
    # an end token: the first generated token, declared an end token, stops at once and is not shown
    ended = job(tok, "base", PROMPTS[1], 16, Collector())
    ended.stop_ids = frozenset({free.text.ids[0]})
    eng.submit([ended])
    while not ended.done:
        eng.step()
    assert ended.emit.end.reason == "stop" and ended.generated == 1 and ended.emit.pieces == []
    # a stop string in the middle of the text: cut there, never sent past it
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = job(tok, "base", PROMPTS[1], 16, Collector(), stops=(stop,))
    eng.submit([cut])
    while not cut.done:
        eng.step()
    assert cut.emit.end.reason == "stop" and "".join(cut.emit.pieces) == text[: text.index(stop)]


def test_text_tracker_holds_back_what_may_be_a_stop_string(tiny_tokenizer):
    assert held_back("hello wor", ("world",)) == 3 and held_back("hello", ("xyz",)) == 0
    ids = tiny_tokenizer("the quick brown fox jumps", add_special_tokens=False)["input_ids"]
    t = TextTracker(tiny_tokenizer, ("fox",))
    pieces = []
    for i in ids:
        piece, stopped = t.add(i)
        pieces.append(piece)
        assert "f" not in "".join(pieces)[-1:] or stopped  # 'f' (maybe 'fox') is never sent early
        if stopped:
            break
    assert stopped and "".join(pieces) == "the quick brown "


def test_cancel_and_deadline_free_the_batch(tiny_model_dir, base):
    model, tok = base
    eng = make_engine(model, tok)
    long = job(tok, "base", PROMPTS[0], 200, Collector())
    late = job(tok, "base", PROMPTS[1], 200, Collector(), deadline=time.monotonic() + 3600)
    eng.submit([long, late])
    eng.step()
    long.cancelled.set()
    late.deadline = time.monotonic() - 1  # its deadline passes while it runs (no sleeping on a clock)
    eng.step()
    assert len(eng._batch) == 0 and eng.stats.cancelled == 1 and eng.stats.timed_out == 1
    assert isinstance(late.emit.end, Failed) and late.emit.end.status == 504 and long.emit.end is None


def test_queue_bound(tiny_model_dir, base):
    model, tok = base
    eng = make_engine(model, tok, max_queue=2)
    eng.submit([job(tok, "base", PROMPTS[0], 4, Collector()) for _ in range(3)])  # an empty queue takes it
    with pytest.raises(QueueFull):
        eng.submit([job(tok, "base", PROMPTS[0], 4, Collector())])
    eng.step()  # all three start
    eng.submit([job(tok, "base", PROMPTS[0], 4, Collector()) for _ in range(2)])
    with pytest.raises(QueueFull):
        eng.submit([job(tok, "base", PROMPTS[0], 4, Collector())])


def test_least_recently_used_adapter_is_unloaded_and_a_busy_set_waits(tiny_model_dir, base, adapter_dirs):
    _, tok = base
    aset = AdapterSet(
        fresh_model(tiny_model_dir), "base", tok, Served("fp32", "original", "fp32"), {}, adapter_dirs["a"].parent, 2
    )
    assert set(aset.known()) == {"a", "b", "c"}
    aset.acquire("a"), aset.release("a")
    aset.acquire("b"), aset.release("b")
    aset.acquire("a"), aset.release("a")  # b is now the least recently used
    aset.acquire("c")
    assert list(aset.loaded) == ["a", "c"] and set(aset.model.peft_config) == {"a", "c"}
    aset.acquire("a")  # both loaded adapters in use: a third must wait
    with pytest.raises(AdapterBusy):
        aset.acquire("b")
    aset.release("c")
    aset.acquire("b")
    assert list(aset.loaded) == ["a", "b"]


def test_an_engine_request_for_a_busy_adapter_waits_for_a_slot(tiny_model_dir, base, adapter_dirs):
    _, tok = base
    eng = make_engine(fresh_model(tiny_model_dir), tok, {k: adapter_dirs[k] for k in "ab"}, max_loaded=1)
    first, second = job(tok, "a", PROMPTS[0], 6, Collector()), job(tok, "b", PROMPTS[0], 6, Collector())
    eng.submit([first, second])
    eng.step()
    assert len(eng._batch) == 1 and eng.load()["waiting"] == 1  # b waits while a runs
    while not second.done:
        eng.step()
    assert isinstance(second.emit.end, Finished) and list(eng.adapters.loaded) == ["b"]


def test_adapter_folders_and_arguments(tmp_path, tiny_model_dir):
    a = random_adapter(tiny_model_dir, tmp_path / "runs" / "one" / "adapter", 0)
    random_adapter(tiny_model_dir, tmp_path / "runs" / "two", 1)
    (tmp_path / "runs" / ".three.tmp").mkdir()  # an atomic save in progress: not an adapter yet
    (tmp_path / "runs" / "notes").mkdir()
    assert find_adapter_folders(tmp_path / "runs") == {"one": a, "two": tmp_path / "runs" / "two"}
    assert parse_adapter_args([f"x={a.parent}"]) == {"x": a}  # a run folder means its adapter/
    for bad, says in [("nonsense", "NAME=DIR"), (f"x={tmp_path}", "not an adapter folder")]:
        with pytest.raises(LoraTuneError, match=says):
            parse_adapter_args([bad])
    with pytest.raises(LoraTuneError, match="twice"):
        parse_adapter_args([f"x={a}", f"x={a}"])


def test_an_adapter_of_another_base_is_refused_with_the_reason(tmp_path, tiny_model_dir, base):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(other)
    wrong = random_adapter(other, tmp_path / "wrong", 0, base_name="some/other-model")
    _, tok = base
    aset = AdapterSet(
        fresh_model(tiny_model_dir), "base", tok, Served("fp32", "original", "fp32"), {"w": wrong}, None, 2
    )
    with pytest.raises(LoraTuneError, match="trained on some/other-model.*can't be loaded on base"):
        aset.acquire("w")


def test_stop_ids_cover_the_chat_end_token(base):
    _, tok = base
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_ids(tok)


def test_dequantized_base_has_the_weights_a_4bit_load_computes_with(tiny_model_dir):
    """--base-weights dequantized: each linear weight equals what bitsandbytes' 4-bit layer dequantizes."""
    import bitsandbytes.functional as bf

    from lora_tune.models import load_model
    from lora_tune.runtime import Precision
    from lora_tune.server.serve import roundtrip_linear_weights

    fp32 = Precision(torch.device("cpu"), torch.float32, "test")
    four_bit, _ = load_model(ModelCfg(source=str(tiny_model_dir), quantization="nf4", cpu_dequantize=False), fp32)
    rounded = fresh_model(tiny_model_dir)
    assert roundtrip_linear_weights(rounded, "nf4", True) == 14  # 7 linear layers x 2 blocks, not the head
    q = dict(four_bit.named_modules())
    for name, module in rounded.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w4 = q[name].weight
            assert torch.equal(module.weight, bf.dequantize_4bit(w4.data, w4.quant_state).to(torch.float32)), name
    assert torch.equal(rounded.lm_head.weight, fresh_model(tiny_model_dir).lm_head.weight)
