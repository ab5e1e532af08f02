"""Finding and validating recipes: `recipes/<name>/recipe.yaml` beside a normal `config.yaml`.

`recipe.yaml` says how to build the data and how to evaluate; `config.yaml` is an ordinary run config
(checked by the same code as `lora-tune train`), whose data paths point at the built files.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_tune.errors import ConfigError, LoraTuneError
from lora_tune.evaluate.run import METRICS, EvalSettings


@dataclass
class Recipe:
    name: str
    dir: Path
    title: str
    summary: str
    builder: str
    metric: str  # the headline metric in reports
    params: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)  # EvalSettings fields; data/text are files in data/

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"


EVAL_KEYS = {f.name for f in dataclasses.fields(EvalSettings)} - {"sampling"} | {"max_new_tokens"}
REQUIRED = ("title", "summary", "builder", "metric", "eval")


def recipes_root(explicit: str | Path | None = None) -> Path:
    """Where recipes live: an explicit folder, $LORA_TUNE_RECIPES, ./recipes, or the source checkout's."""
    if explicit:
        return Path(explicit)
    if os.environ.get("LORA_TUNE_RECIPES"):
        return Path(os.environ["LORA_TUNE_RECIPES"])
    here = Path.cwd() / "recipes"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "recipes"


def load_recipe(folder: Path) -> Recipe:
    """Read and check `folder/recipe.yaml`; every problem is reported at once with the file name."""
    from lora_tune.recipes.builders import BUILDERS

    path = folder / "recipe.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LoraTuneError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of recipe settings"])
    problems = [f"{path}: `{k}` is missing" for k in REQUIRED if k not in data]
    known = {f.name for f in dataclasses.fields(Recipe)} - {"name", "dir"}
    problems += [f"{path}: unknown key `{k}`; known: {', '.join(sorted(known))}" for k in data if k not in known]
    if "builder" in data and data["builder"] not in BUILDERS:
        problems.append(f"{path}: unknown builder `{data['builder']}`; choose from {', '.join(BUILDERS)}")
    ev = data.get("eval") or {}
    problems += [
        f"{path}: unknown eval key `{k}`; known: {', '.join(sorted(EVAL_KEYS))}" for k in ev if k not in EVAL_KEYS
    ]
    bad = [m for m in ev.get("metrics", []) if m not in METRICS]
    if bad:
        problems.append(f"{path}: unknown eval metric(s) {bad}; choose from {', '.join(METRICS)}")
    if not (ev.get("data") or ev.get("text")):
        problems.append(f"{path}: eval needs `data` (records) or `text` (raw text) - a file the builder writes")
    if not (folder / "config.yaml").is_file():
        problems.append(f"{folder / 'config.yaml'}: missing; every recipe has a run config beside recipe.yaml")
    if problems:
        raise ConfigError(problems)
    return Recipe(name=folder.name, dir=folder, **{k: v for k, v in data.items() if k in known})


def find_recipes(root: Path | None = None) -> dict[str, Recipe]:
    """Every recipe under `root` (searched recursively), by name."""
    root = recipes_root(root)
    if not root.is_dir():
        raise LoraTuneError(
            f"no recipes folder at {root}; run from a lora_tune checkout or set LORA_TUNE_RECIPES=/path/to/recipes"
        )
    found = {}
    for spec in sorted(root.rglob("recipe.yaml")):
        r = load_recipe(spec.parent)
        if r.name in found:
            raise LoraTuneError(f"two recipes named {r.name}: {found[r.name].dir} and {r.dir}")
        found[r.name] = r
    return found


def get_recipe(name: str, root: Path | None = None) -> Recipe:
    recipes = find_recipes(root)
    if name not in recipes:
        from lora_tune.config import _closest

        raise LoraTuneError(f"no recipe named {name!r}{_closest(name, recipes)}; `lora-tune recipes list` shows them")
    return recipes[name]
