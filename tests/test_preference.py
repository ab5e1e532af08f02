"""Preference tuning: losses, reference, scoring, accumulation, resume, data formats and their errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_faults import _losses, _run_until
from test_loss import CPU32, NO_SCALER, _lora_model

from lora_tune import config as C
from lora_tune.data.batching import BatchStream
from lora_tune.data.pairs import collate_prefs, encode_prefs, fit_pair, parse_pref_record
from lora_tune.data.readers import load_records, read_records
from lora_tune.errors import ConfigError, DataError, LoraTuneError
from lora_tune.losses import IGNORE, answer_logps
from lora_tune.models import load_model
from lora_tune.train import reference
from lora_tune.train.loop import train
from lora_tune.train.metrics import read_metrics
from lora_tune.train.objectives import (
    DPO,
    KTO,
    ORPO,
    SimPO,
    dpo_losses,
    kto_losses,
    orpo_losses,
    reference_logps,
    simpo_losses,
)
from lora_tune.train.step import StepParts, optimizer_step

from conftest import tiny_config, tiny_overrides, train_in_process, write_jsonl

SYSTEM = {"role": "system", "content": "answer the question"}


def pair(i: int) -> dict:
    """A TRL conversational pair: the right sum, and a wrong, longer one."""
    return {
        "prompt": [SYSTEM, {"role": "user", "content": f"what is {i} plus {i}?"}],
        "chosen": [{"role": "assistant", "content": f"the answer is {2 * i}."}],
        "rejected": [{"role": "assistant", "content": f"hello world, it is {2 * i + 1} today"}],
    }


def kto_record(i: int) -> dict:
    good = i % 3 != 0
    answer = f"the answer is {2 * i}." if good else "hello world, how are you?"
    return {
        "prompt": [SYSTEM, {"role": "user", "content": f"what is {i} plus {i}?"}],
        "completion": answer,
        "label": good,
    }


@pytest.fixture
def pair_files(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [pair(i) for i in range(16)]), write_jsonl(
        tmp_path / "val_pairs.jsonl", [pair(i) for i in range(16, 20)]
    )


def _records(rows, name="mem.jsonl"):
    out = []
    for i, row in enumerate(rows):
        rec, problems = parse_pref_record(row, f"{name}:{i + 1}")
        assert not problems, problems
        out.append(rec)
    return out


def _batch(tok, rows, max_length=64):
    examples, _ = encode_prefs(tok, _records(rows), max_length, max_length // 2)
    return collate_prefs(examples, tok.pad_token_id), examples


def _full_logits_logps(model, batch):
    """Log-prob of each answer from the whole logits (the plain HF path, not ours), `[B, A]`."""
    ids, mask, labels = (batch[k].flatten(0, 1) for k in ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    out = torch.zeros(ids.shape[0])
    for r in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if labels[r, t] != IGNORE:
                out[r] += logp[r, t - 1, labels[r, t]]
    return out.view(batch["input_ids"].shape[0], -1)


# ----------------------------------------------------------------------------------------------------
# Losses


def test_loss_functions_at_hand_computed_points():
    zero = torch.zeros(1)
    # DPO: policy and reference agree -> log 2; ipo: (0 - 1/(2 beta))^2
    assert float(dpo_losses(zero, 0.1)) == pytest.approx(math.log(2))
    assert float(dpo_losses(torch.tensor([2.0]), 0.5)) == pytest.approx(math.log(1 + math.exp(-1)))
    assert float(dpo_losses(torch.tensor([2.0]), 0.5, label_smoothing=0.25)) == pytest.approx(
        0.75 * math.log(1 + math.exp(-1)) + 0.25 * math.log(1 + math.exp(1))
    )
    assert float(dpo_losses(zero, 0.1, "ipo")) == pytest.approx(25.0)
    # ORPO: both answers at mean probability 1/2 -> odds 1, log-odds ratio 0, NLL log 2
    loss, nll, ratio = orpo_losses(torch.full((1, 2), math.log(0.5)), beta=0.1)
    assert float(nll) == pytest.approx(math.log(2)) and float(ratio) == pytest.approx(-math.log(2))
    assert float(loss) == pytest.approx(math.log(2) + 0.1 * math.log(2))
    # chosen p=0.8 (odds 4), rejected p=0.2 (odds 1/4): log-odds ratio log 16
    _, _, ratio = orpo_losses(torch.tensor([[math.log(0.8), math.log(0.2)]]), beta=1.0)
    assert float(ratio) == pytest.approx(-math.log(1 + 1 / 16))
    # SimPO: a margin equal to the target -> log 2
    assert float(simpo_losses(torch.tensor([[-1.0, -1.5]]), beta=2.0, gamma=1.0)) == pytest.approx(math.log(2))
    # KTO at r = kl: every example loses w / 2
    r = torch.tensor([0.3, 0.3])
    got = kto_losses(r, torch.tensor([True, False]), torch.tensor(0.3), 0.1, 2.0, 0.5)
    assert got.tolist() == pytest.approx([1.0, 0.25])


def test_objectives_on_a_tiny_model_equal_the_formulas_on_independent_log_probs(tiny_model_dir):
    pm, tok = _lora_model(tiny_model_dir)  # LoRA B weights random: the policy differs from the base
    pm.eval()
    batch, _ = _batch(tok, [pair(i) for i in range(3)])
    with torch.no_grad():
        pol = _full_logits_logps(pm, batch)
        with pm.disable_adapter():
            ref = _full_logits_logps(pm, batch)
    counts = (batch["labels"][:, :, 1:] != IGNORE).sum(-1).float()
    beta = 0.2
    with torch.no_grad():
        dpo = DPO(beta).loss_sum(pm, batch)
        ipo = DPO(beta, loss_type="ipo").loss_sum(pm, batch)
        orpo = ORPO(beta).loss_sum(pm, batch)
        simpo = SimPO(beta, gamma=0.5).loss_sum(pm, batch)
    expected = 0.0
    for (pc, pr), (rc, rr) in zip(pol.tolist(), ref.tolist(), strict=True):
        expected += math.log1p(math.exp(-beta * ((pc - pr) - (rc - rr))))
    assert float(dpo.loss) == pytest.approx(expected, rel=1e-4)
    assert float(dpo.figures["rewards/accuracies"]) == sum(
        (pc - rc) > (pr - rr) for (pc, pr), (rc, rr) in zip(pol.tolist(), ref.tolist(), strict=True)
    )
    avg, ravg = pol / counts, ref / counts
    ipo_expected = sum(
        (((a[0] - a[1]) - (b[0] - b[1])) - 1 / (2 * beta)) ** 2
        for a, b in zip(avg.tolist(), ravg.tolist(), strict=True)
    )
    assert float(ipo.loss) == pytest.approx(ipo_expected, rel=1e-4)
    orpo_expected = 0.0
    for c, r in avg.tolist():
        odds = (c - math.log1p(-math.exp(c))) - (r - math.log1p(-math.exp(r)))
        orpo_expected += -c + beta * math.log1p(math.exp(-odds))
    assert float(orpo.loss) == pytest.approx(orpo_expected, rel=1e-4)
    simpo_expected = sum(math.log1p(math.exp(-(beta * (c - r) - 0.5))) for c, r in avg.tolist())
    assert float(simpo.loss) == pytest.approx(simpo_expected, rel=1e-4)
    assert float(dpo.figures["logps/chosen"]) == pytest.approx(float(pol[:, 0].sum()), rel=1e-4)


def test_kto_loss_and_kl_on_a_tiny_model(tiny_model_dir):
    pm, tok = _lora_model(tiny_model_dir)
    pm.eval()
    examples, _ = encode_prefs(tok, _records([kto_record(i) for i in range(4)]), 64, 32)
    batch = collate_prefs(examples, tok.pad_token_id)
    with torch.no_grad():
        pol = _full_logits_logps(pm, batch)
        with pm.disable_adapter():
            ref = _full_logits_logps(pm, batch)
        kto = KTO(beta=0.5, desirable_weight=1.5, undesirable_weight=0.7)
        kto.begin_step(pm, [batch])
        out = kto.loss_sum(pm, batch)
    kl = max(float((pol[:, 1] - ref[:, 1]).mean()), 0.0)
    assert float(kto.kl) == pytest.approx(kl, rel=1e-4, abs=1e-6)
    expected = 0.0
    for (p, _), (r, _), good in zip(pol.tolist(), ref.tolist(), batch["desirable"].tolist(), strict=True):
        z = 0.5 * ((p - r) - kl) if good else 0.5 * (kl - (p - r))
        expected += (1.5 if good else 0.7) * (1 - 1 / (1 + math.exp(-z)))
    assert float(out.loss) == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------------------------------
# Reference and scoring


def test_reference_through_the_disabled_adapter_equals_a_separately_loaded_base(tiny_model_dir):
    pm, tok = _lora_model(tiny_model_dir)
    batch, examples = _batch(tok, [pair(i) for i in (12, 1, 100005, 3)])  # of unsorted lengths
    assert sorted(e.length for e in examples) != [e.length for e in examples]
    base, _ = load_model(C.ModelCfg(source=str(tiny_model_dir), quantization="fp32"), CPU32)
    base.eval()
    with torch.no_grad():
        alone = answer_logps(base, batch)[0]
        policy = answer_logps(pm, batch)[0]
    on_the_fly = reference_logps(pm, batch)
    torch.testing.assert_close(on_the_fly, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy, alone)  # the adapter does change the model
    pre = reference.compute(pm, examples, 3, tok.pad_token_id, CPU32)
    torch.testing.assert_close(pre, on_the_fly, rtol=1e-5, atol=1e-5)
    for e, row in zip(examples, pre.tolist(), strict=True):
        e.ref = row
    batch_with_ref = collate_prefs(examples, tok.pad_token_id)
    torch.testing.assert_close(reference_logps(pm, batch_with_ref), on_the_fly, rtol=1e-5, atol=1e-5)


def test_only_answer_tokens_are_scored(tiny_model_dir):
    pm, tok = _lora_model(tiny_model_dir)
    pm.eval()
    batch, examples = _batch(tok, [pair(1), pair(2)])
    for i, e in enumerate(examples):
        for j, answer in enumerate(e.answers):
            labelled = batch["labels"][i, j][batch["labels"][i, j] != IGNORE].tolist()
            assert labelled == answer  # exactly the answer's tokens, its end-of-turn token included
            assert tok.decode(answer).endswith("<|im_end|>")
    with torch.no_grad():
        torch.testing.assert_close(answer_logps(pm, batch)[0], _full_logits_logps(pm, batch), rtol=1e-4, atol=1e-4)


def test_pair_accumulation_equals_one_big_batch(tiny_model_dir):
    """k micro-batches of pairs (and a batch cut into pieces) give the gradients of one k-times-larger batch."""
    pm, tok = _lora_model(tiny_model_dir)
    examples, _ = encode_prefs(tok, _records([pair(i) for i in range(8)]), 64, 32)
    kto_examples, _ = encode_prefs(tok, _records([kto_record(i) for i in range(8)]), 64, 32)
    for objective, data in ((DPO(0.3), examples), (ORPO(0.3), examples), (KTO(0.3), kto_examples)):
        updates, losses = [], []
        for mb, accum, split in ((8, 1, 1), (4, 2, 1), (2, 4, 1), (8, 1, 4)):
            model = copy.deepcopy(pm)
            params = [p for p in model.parameters() if p.requires_grad]
            before = [p.detach().clone() for p in params]
            parts = StepParts(model, objective, torch.optim.SGD(params, lr=1.0), NO_SCALER, params, CPU32, 0.0)
            stream = BatchStream(data, mb, 0, tok.pad_token_id, shuffle=False, collate_fn=collate_prefs)
            out = optimizer_step(parts, [stream.next() for _ in range(accum)], split=split)
            assert out.units == 8
            updates.append([b - p.detach() for b, p in zip(before, params, strict=True)])
            losses.append(out.loss)
        for other in updates[1:]:
            for a, b in zip(updates[0], other, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert losses == pytest.approx([losses[0]] * 4, rel=1e-5), objective.name


# ----------------------------------------------------------------------------------------------------
# Runs


def test_dpo_run_improves_reward_accuracy_and_precompute_matches_on_the_fly(tiny_model_dir, pair_files, tmp_path):
    train_file, val_file = pair_files
    over = {"train.objective": "dpo", "train.max_steps": 8, "train.eval_every": 4, "lora.dropout": 0.0}
    runs = {}
    for pre in (False, True):
        cfg = tiny_config(tiny_model_dir, train_file, val_file, tmp_path / f"pre-{pre}", **over)
        cfg.preference.precompute_ref = pre
        train(cfg)
        runs[pre] = read_metrics(tmp_path / f"pre-{pre}" / "metrics.jsonl")
    assert (tmp_path / "pre-True" / reference.FILE).is_file() and not (tmp_path / "pre-False" / reference.FILE).exists()
    for a, b in zip(runs[False], runs[True], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-3, abs=1e-5)
    val = [r for r in runs[True] if r.get("split") == "val"]
    assert val[0]["loss"] == pytest.approx(math.log(2)) and val[0]["rewards/margins"] == 0.0
    assert val[-1]["loss"] < val[0]["loss"] and val[-1]["rewards/margins"] > 0
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"}
    assert keys <= set(runs[True][1]) and runs[True][1]["pairs"] == 4 and "ppl" not in val[0]


def test_sft_then_dpo_starts_from_the_adapter_and_its_reference_is_the_sft_model(
    tiny_model_dir, chat_files, pair_files, tmp_path
):
    sft = train(tiny_config(tiny_model_dir, *chat_files, tmp_path / "sft", **{"train.max_steps": 4}))
    over = {"train.objective": "dpo", "train.max_steps": 2, "model.adapter": str(sft.adapter_dir)}
    result = train(tiny_config(tiny_model_dir, *pair_files, tmp_path / "dpo", **over))
    first = read_metrics(tmp_path / "dpo" / "metrics.jsonl")[0]
    # at step 0 the policy is the SFT model; were the reference the bare base, the margin would not be 0
    assert first["split"] == "val" and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    meta = json.loads((result.adapter_dir / "lora_tune.json").read_text())
    assert meta["objective"] == "dpo" and meta["started_from"] == str(sft.adapter_dir)
    from lora_tune.evaluate.run import EvalSettings, ModelSpec, run_eval

    spec = ModelSpec(str(tiny_model_dir), str(result.adapter_dir), "fp32")
    rep = run_eval(spec, EvalSettings(data=str(pair_files[1]), metrics=["preference_accuracy"]), compare=True)
    assert set(rep["results"]["tuned"]["metrics"]) >= {"preference_accuracy", "reward_accuracy"}
    assert rep["results"]["base"]["details"]["pairs"] == 4
    # a preference-tuned adapter merges like any other; the fidelity check reads the run's pairs
    from lora_tune.merge import merge_adapter

    merged = merge_adapter(result.adapter_dir, tmp_path / "merged", dtype="fp16", log=lambda *_: None)
    assert merged.fidelity[0].mean_kl < 2e-3 and merged.fidelity[0].tokens > 0


@pytest.mark.slow
def test_sigkill_of_a_dpo_run_resumes_to_the_uninterrupted_run(tiny_model_dir, pair_files, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    more = {"train.objective": "dpo", "train.max_steps": 10, "train.save_every": 1, "train.eval_every": 3}
    more |= {"train.grad_accum": 2, "train.micro_batch_size": 2, "preference.precompute_ref": True}

    def args(out, *flags):
        return ["train", str(empty), *tiny_overrides(tiny_model_dir, *pair_files, out, **more), *flags]

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train_in_process(args(ref))
    _run_until(args(cut), cut, kill_after=5)  # killing again and again is test_faults' chain's part
    _run_until(args(cut, "--resume"), cut, None)
    assert _losses(cut) == _losses(ref)


# ----------------------------------------------------------------------------------------------------
# Data


def test_every_preference_format_reads_to_the_same_batch(tmp_path, tiny_tokenizer):
    msgs = [SYSTEM, {"role": "user", "content": "what is 2 plus 2?"}]
    good, bad = "the answer is 4.", "hello world"
    forms = {
        "openai": {
            "input": {"messages": msgs},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}],
        },
        "trl": {
            "prompt": msgs,
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        },
        "implicit": {
            "chosen": [*msgs, {"role": "assistant", "content": good}],
            "rejected": [*msgs, {"role": "assistant", "content": bad}],
        },
    }
    batches = {}
    for name, row in forms.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        records = load_records(path, parse=parse_pref_record)
        examples, _ = encode_prefs(tiny_tokenizer, records, 64, 32)
        batches[name] = collate_prefs(examples, 0)
    for name in ("trl", "implicit"):
        for k in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(batches[name][k], batches["openai"][k]), (name, k)
    assert batches["openai"]["input_ids"].shape[:2] == (1, 2)
    # strings: the prompt keeps BOS, answers get EOS; implicit string prompt = the shared start
    strings = write_jsonl(
        tmp_path / "strings.jsonl",
        [
            {"prompt": "what is 2 plus 2?", "chosen": " 4", "rejected": " 5"},
            {"chosen": "hi there 4", "rejected": "hi there 5"},
        ],
    )
    recs = load_records(strings, parse=parse_pref_record)
    assert recs[1].prompt == "hi there " and recs[1].answers == ("4", "5")
    ex, _ = encode_prefs(tiny_tokenizer, recs, 64, 32)
    assert all(a[-1] == tiny_tokenizer.eos_token_id for e in ex for a in e.answers)
    # KTO
    kto = write_jsonl(tmp_path / "kto.jsonl", [kto_record(1), {"prompt": "q?", "completion": " no", "label": False}])
    recs = load_records(kto, parse=parse_pref_record)
    assert [r.label for r in recs] == [True, False]
    ex, _ = encode_prefs(tiny_tokenizer, recs, 64, 32)
    batch = collate_prefs(ex, 0)
    assert batch["desirable"].tolist() == [True, False] and batch["input_ids"].shape[1] == 2  # answer + KL partner


BAD_PAIRS = [
    ('{"prompt": "q", "chosen": "a"}', "missing `rejected`"),
    ('{"prompt": "q", "chosen": "", "rejected": "b"}', "`chosen` is empty"),
    ('{"prompt": "q", "chosen": "same", "rejected": "same"}', "identical"),
    (
        json.dumps(
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
            }
        ),
        "differ before their last turn",
    ),
    (
        json.dumps(
            {
                "input": {"messages": [{"role": "user", "content": "q"}]},
                "preferred_output": [{"role": "assistant", "content": "a"}],
            }
        ),
        "missing `non_preferred_output`",
    ),
    (
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": " "}],
                "rejected": [{"role": "assistant", "content": "b"}],
            }
        ),
        "`chosen` is empty",
    ),
    ('{"prompt": "q", "completion": "a", "label": "yes"}', "`label` must be true"),
    ('{"text": "just text"}', "not a preference record"),
]


def test_each_bad_pair_is_reported_with_its_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", ['{"prompt": "ok", "chosen": "a", "rejected": "b"}'] + [b for b, _ in BAD_PAIRS]
    )
    records, problems = read_records(path, parse=parse_pref_record)
    assert len(records) == 1
    for line, (_, message) in enumerate(BAD_PAIRS, start=2):
        assert any(p.startswith(f"{path}:{line}:") and message in p for p in problems), (line, message, problems)
    with pytest.raises(DataError):
        load_records(path, parse=parse_pref_record)


def test_truncation_keeps_the_prompt_end_and_the_answer_start_and_drops_pairs_made_identical(tiny_tokenizer):
    recs = _records([{"prompt": "a b c d e f g h i j", "chosen": " x y z 1", "rejected": " x y z 2"}])
    ex, _ = encode_prefs(tiny_tokenizer, recs, 1000, 500)
    fitted, cut_p, cut_a = fit_pair(ex[0], max_length=len(ex[0].answers[0]) + 3, max_prompt_length=3)
    assert cut_p and fitted.prompt == ex[0].prompt[-3:]
    assert not cut_a and fitted.answers == ex[0].answers
    fitted, _, cut_a = fit_pair(ex[0], max_length=5, max_prompt_length=3)
    assert cut_a and fitted.answers == tuple(a[:2] for a in ex[0].answers)
    # answers that differ only in their last words become identical when cut: dropped and counted
    kept, stats = encode_prefs(tiny_tokenizer, recs, 6, 3)
    assert not kept and stats.dropped_identical == 1 and "identical after truncation" in stats.dropped_where[0]
    kept, stats = encode_prefs(tiny_tokenizer, recs, 1000, 500)
    assert len(kept) == 1 and stats.truncated_prompts == stats.truncated_answers == 0


def test_a_training_run_names_the_bad_pair_and_the_wrong_kind(tiny_model_dir, pair_files, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [pair(1), {"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match=rf"{bad}:2: chosen and rejected answers are identical"):
        train(tiny_config(tiny_model_dir, bad, None, tmp_path / "run", **{"train.objective": "dpo"}))
    with pytest.raises(LoraTuneError, match=r"pairs.jsonl:1: train.objective=kto needs KTO records"):
        train(tiny_config(tiny_model_dir, pair_files[0], None, tmp_path / "run", **{"train.objective": "kto"}))
    assert not (tmp_path / "run").exists()


def test_preference_settings_that_do_not_apply_are_errors():
    base = {"data": {"train_file": "x.jsonl"}}
    with pytest.raises(ConfigError, match=r"preference.loss_type` does not apply to train.objective=orpo"):
        C.from_dict({**base, "train": {"objective": "orpo"}, "preference": {"loss_type": "ipo"}})
    with pytest.raises(ConfigError, match=r"preference.beta` does not apply to train.objective=sft"):
        C.from_dict({**base, "preference": {"beta": 0.1}})
    with pytest.raises(ConfigError, match=r"max_prompt_length` must be > 0 and below data.max_length"):
        C.from_dict({**base, "train": {"objective": "dpo"}, "preference": {"max_prompt_length": 2048}})
    with pytest.raises(ConfigError, match=r"data.packing` does not apply"):
        C.from_dict({**base, "train": {"objective": "simpo"}, "data": {"train_file": "x", "packing": True}})
    cfg = C.from_dict({**base, "train": {"objective": "kto"}, "preference": {"desirable_weight": 1.3}})
    assert cfg.preference.desirable_weight == 1.3
    assert C.from_dict(C.to_dict(cfg)) == cfg  # a saved run config reads back (its defaults are not "set")


def test_data_inspect_shows_pair_statistics_and_names_bad_pairs(tiny_model_dir, pair_files, tmp_path):
    from click.testing import CliRunner

    from lora_tune.cli import main

    def inspect(path, *more):
        result = CliRunner().invoke(main, ["data", "inspect", str(path), "--model", str(tiny_model_dir), *more])
        return result.exit_code, result.output

    code, out = inspect(pair_files[0], "--max-length", "24", "--max-prompt-length", "12")
    assert code == 0, out
    assert "16 pairs" in out and "chosen tokens" in out and "rejected tokens" in out
    assert "16 prompts cut to their end" in out and "chosen:" in out and "⟦" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", [pair(1), {"prompt": "q", "chosen": "a", "rejected": "a"}])
    code, out = inspect(bad)
    assert code == 1 and f"{bad}:2: chosen and rejected answers are identical" in out


def test_continued_sft_starts_from_the_adapters_weights(tiny_model_dir, chat_files, tmp_path):
    first = train(tiny_config(tiny_model_dir, *chat_files, tmp_path / "a", **{"train.max_steps": 4}))
    again = tiny_config(tiny_model_dir, *chat_files, tmp_path / "b", **{"train.max_steps": 2})
    again.model.adapter = str(first.adapter_dir)
    train(again)
    before, after = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert after[0]["split"] == "val" and after[0]["loss"] == pytest.approx(before[-1]["loss"], rel=1e-5)
    assert after[0]["loss"] < before[0]["loss"]  # not the untrained model's loss
