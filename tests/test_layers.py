"""The package's layers (../shared/DESIGN.md): nothing imports a module above it, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lora_tune

ROOT = Path(lora_tune.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every lora_tune module `path` imports, at any depth of the file (`from a import b` counts `a` and `a.b`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m == "lora_tune" or m.startswith("lora_tune.")}


GRAPH = {module_name(p): imports_of(p) for p in ROOT.rglob("*.py")}


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def offenders(importers: tuple[str, ...], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for mod, deps in GRAPH.items():
        if within(mod, *importers):
            hits = sorted(d for d in deps if within(d, *forbidden) and not within(d, *importers))
            if hits:
                bad[mod] = hits
    return bad


RULES = [
    # (who, must not import)
    (("lora_tune.runtime",), ("lora_tune",)),  # the bottom layer: errors only (checked below)
    (
        ("lora_tune.losses", "lora_tune.chunked_ce"),
        ("lora_tune.data", "lora_tune.models", "lora_tune.train", "lora_tune.evaluate", "lora_tune.bench"),
    ),
    (
        (
            "lora_tune.models",
            "lora_tune.data",
            "lora_tune.evaluate",
            "lora_tune.merge",
            "lora_tune.combine",
            "lora_tune.export_gguf",
        ),
        ("lora_tune.train", "lora_tune.finetune", "lora_tune.recipes", "lora_tune.cli"),
    ),
    (
        ("lora_tune.train",),
        ("lora_tune.evaluate", "lora_tune.bench", "lora_tune.finetune", "lora_tune.recipes", "lora_tune.cli"),
    ),
    (("lora_tune.data", "lora_tune.recipes.sources"), ("lora_tune.models",)),
    (("lora_tune.config", "lora_tune.errors", "lora_tune.atomic"), ("lora_tune",)),
    # the server is a shell like the CLI: only the CLI starts it; it reimplements no training
    (tuple(m for m in GRAPH if not within(m, "lora_tune.server", "lora_tune.cli")), ("lora_tune.server",)),
]


@pytest.mark.parametrize("importers, forbidden", RULES, ids=[r[0][0] if len(r[0]) < 8 else "not-server" for r in RULES])
def test_no_module_imports_a_layer_above_it(importers, forbidden):
    # errors is below everything; a bare `lora_tune` is the package (`from lora_tune import config` is
    # checked as `lora_tune.config`)
    bad = {m: [d for d in ds if d != "lora_tune" and not within(d, "lora_tune.errors")] for m, ds in
           offenders(importers, forbidden).items()}  # fmt: skip
    assert not {m: ds for m, ds in bad.items() if ds}


def test_the_scan_sees_imports():
    """Guard against a vacuous pass: known imports of several kinds are found."""
    assert "lora_tune.train.step.optimizer_step" in GRAPH["lora_tune.train.loop"]
    assert "lora_tune.runtime" in GRAPH["lora_tune.losses"]
    assert "lora_tune.evaluate.run" in GRAPH["lora_tune.finetune"]  # a function-level import
    assert len(GRAPH) > 40


def test_a_violation_is_reported(monkeypatch):
    monkeypatch.setitem(GRAPH, "lora_tune.data.fake", {"lora_tune.train.loop"})
    assert offenders(("lora_tune.data",), ("lora_tune.train",)) == {"lora_tune.data.fake": ["lora_tune.train.loop"]}
