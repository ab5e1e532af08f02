"""The preference-docs recipe: real preference pairs from NetworkX docstrings, in TRL's conversational format.

The builder reads the pinned networkx wheel (fetched once into the cache, checked by SHA-256), like the
other recipes' builders. The recipe is read as plain YAML here: `load_recipe` also checks the eval metric
`preference_accuracy`, which the evaluation gains with preference tuning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lora_tune.evaluate.run import METRICS
from lora_tune.recipes.builders import BUILDERS, _norm, build_preference_docs
from lora_tune.recipes.run import SMOKE_DATA

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "preference-docs"
SPEC = yaml.safe_load((RECIPE / "recipe.yaml").read_text(encoding="utf-8"))
PARTS = ("train", "val", "test")
FILES = ["manifest.json", "test.jsonl", "train.jsonl", "val.jsonl"]


def quiet(*_):
    pass


def read(folder: Path, part: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{part}.jsonl").read_text(encoding="utf-8").splitlines()]


def function_of(record: dict) -> str:
    """The bare function name of a pair (ids are `package.module.function[~k]:parameter`)."""
    return record["id"].rsplit(":", 1)[0].split("~")[0].rsplit(".", 1)[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preference") / "data"
    build_preference_docs(out, SPEC["params"], log=quiet)
    return out


def test_recipe_files_name_the_builder_metric_and_data():
    assert BUILDERS[SPEC["builder"]] is build_preference_docs
    assert SPEC["builder"] == "preference_docs" and SPEC["metric"] == "preference_accuracy"
    assert SPEC["eval"]["data"] == "test.jsonl" and SPEC["eval"]["metrics"] == ["preference_accuracy"]
    assert "## Results here" in (RECIPE / "README.md").read_text(encoding="utf-8")


@pytest.mark.skipif("preference_accuracy" not in METRICS, reason="the evaluation has no preference_accuracy yet")
def test_recipe_validates_once_the_metric_exists():
    from lora_tune.recipes.registry import load_recipe

    recipe = load_recipe(RECIPE)
    assert recipe.builder == "preference_docs" and recipe.metric == "preference_accuracy"


def test_building_twice_gives_the_same_bytes(built, tmp_path):
    again = tmp_path / "again"
    build_preference_docs(again, SPEC["params"], log=quiet)
    assert sorted(p.name for p in built.iterdir()) == FILES
    for f in FILES:
        assert (built / f).read_bytes() == (again / f).read_bytes(), f
    manifest = json.loads((built / "manifest.json").read_text())
    assert {f: v["records"] for f, v in manifest["files"].items()} == {
        "train.jsonl": 400,
        "val.jsonl": 50,
        "test.jsonl": 100,
    }
    assert any("networkx==3.4.2" in s and "BSD-3-Clause" in s for s in manifest["sources"])


def test_splits_share_no_function(built):
    functions = {part: {function_of(r) for r in read(built, part)} for part in PARTS}
    assert all(functions.values())
    assert not functions["test"] & functions["train"], "a held-out function is also in training"
    assert not functions["val"] & functions["train"]
    assert not functions["test"] & functions["val"]
    prompts = {part: {json.dumps(r["prompt"], sort_keys=True) for r in read(built, part)} for part in PARTS}
    assert not prompts["test"] & prompts["train"]


def check_records(rows: list[dict], max_words: int = 60) -> None:
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "ids are unique"
    for r in rows:
        assert set(r) == {"id", "prompt", "chosen", "rejected"}, r
        assert [m["role"] for m in r["prompt"]] == ["system", "user"]
        assert [m["role"] for m in r["chosen"]] == ["assistant"] == [m["role"] for m in r["rejected"]]
        for m in (*r["prompt"], *r["chosen"], *r["rejected"]):
            assert set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip()
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert chosen != rejected and _norm(chosen) != _norm(rejected), r["id"]
        assert 2 <= len(chosen.split()) <= max_words and 2 <= len(rejected.split()) <= max_words
        name = r["id"].rsplit(":", 1)[1]
        assert f"the `{name}` parameter of `{function_of(r)}`" in r["prompt"][1]["content"]


def test_every_record_is_a_conversational_preference_pair(built):
    for part in PARTS:
        check_records(read(built, part), SPEC["params"]["max_answer_words"])


def test_chosen_is_the_parameters_own_description_and_rejected_a_real_wrong_one(built):
    from lora_tune.recipes.builders import _docstrings, numpydoc_entries, numpydoc_sections
    from lora_tune.recipes.sources import fetch

    documented: dict[str, list[dict[str, str]]] = {}  # package.module.function -> its Parameters entries
    everywhere: set[str] = set()
    for module, func, doc in _docstrings(fetch("networkx", log=quiet)):
        entries = dict(numpydoc_entries(numpydoc_sections(doc).get("Parameters", [])))
        entries = {n: " ".join(d.split()) for n, d in entries.items()}
        documented.setdefault(module.removesuffix(".py").replace("/", ".") + "." + func, []).append(entries)
        everywhere |= set(entries.values())
    max_words = SPEC["params"]["max_answer_words"]
    siblings = 0
    for part in PARTS:
        for r in read(built, part):
            qualified, name = r["id"].rsplit(":", 1)
            chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
            matches = [e for e in documented[qualified.split("~")[0]] if e.get(name) == chosen]
            assert matches, f"{r['id']}: chosen is not that parameter's description"
            others = {
                d
                for e in matches
                for n, d in e.items()
                if n not in (name, "G") and len(d.split()) <= max_words and _norm(d) != _norm(chosen)
            }
            if others:  # another parameter of the same function
                assert rejected in others, r["id"]
                siblings += 1
            else:  # a function with one such parameter: another function's real description
                assert rejected in everywhere, r["id"]
    assert siblings > 0.7 * sum(len(read(built, part)) for part in PARTS)


@pytest.mark.slow
def test_the_smoke_subset_is_small_and_well_formed(tmp_path):
    out = tmp_path / "smoke"
    built = build_preference_docs(out, {**SPEC["params"], **SMOKE_DATA}, log=quiet)
    assert built.files == {"train.jsonl": 16, "val.jsonl": 4, "test.jsonl": 4}
    for part in PARTS:
        check_records(read(out, part))
    assert not {function_of(r) for r in read(out, "test")} & {function_of(r) for r in read(out, "train")}


@pytest.mark.slow
def test_params_change_the_pairs_deterministically(tmp_path):
    params = {**SPEC["params"], **SMOKE_DATA, "context": "none", "seed": 1}
    a, b = tmp_path / "a", tmp_path / "b"
    build_preference_docs(a, params, log=quiet)
    build_preference_docs(b, params, log=quiet)
    assert (a / "train.jsonl").read_bytes() == (b / "train.jsonl").read_bytes()
    for r in read(a, "train"):
        assert r["prompt"][1]["content"].startswith("In networkx, what does the `")  # no summary line
