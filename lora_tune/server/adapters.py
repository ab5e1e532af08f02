"""Which adapters the server knows, and which of them are loaded on the one base model in memory.

Adapters come from `--adapter NAME=DIR` and from the folders of `--adapters-dir` (an adapter folder, or a
run folder with `adapter/` inside), which is listed again on every lookup: a new folder is served without a
restart, and a folder whose weights changed is loaded again. At most `max_loaded` adapters stay in memory;
the least recently used one that no running sequence needs is unloaded to make room.

Tokenizers are read per adapter (the chat template an adapter was trained with wins) and may be used from
any thread; loading and unloading weights happens only on the engine's thread, between forward passes.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.config import ModelCfg
from lora_tune.errors import LoraTuneError
from lora_tune.models import adapter_meta, load_tokenizer

BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
MIXED = "__mixed__"  # rows name their adapters (peft's `adapter_names=`)


def weights_kind(quantization: str) -> str:
    """The values an adapter saw as its base: a 4-bit or 8-bit grid, or the original 16/32-bit weights."""
    return quantization if quantization in ("nf4", "fp4", "int8") else "original"


@dataclass
class Served:
    """How the base is held in memory, for the /v1/models report."""

    quantization: str  # what was loaded: nf4, int8, bf16, fp32, ...
    weights: str  # weights_kind of the values the model computes with (nf4 when de-quantized from nf4)
    label: str  # e.g. "nf4 (4-bit)", "bf16 weights de-quantized from nf4"


@dataclass
class Loaded:
    path: Path
    stamp: float  # mtime of the weights file when loaded
    users: int = 0  # running sequences that use it


class AdapterBusy(Exception):
    """Every loaded adapter is in use and no more may be loaded: the request waits."""


def find_adapter_folders(folder: Path) -> dict[str, Path]:
    """name -> adapter folder for each child of `folder` that is one (or is a run with `adapter/`)."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):  # a folder still being written (atomic saves use .name.XXXX)
            continue
        for cand in (child, child / "adapter"):
            if (cand / "adapter_config.json").is_file():
                found[child.name] = cand
                break
    return found


def parse_adapter_args(items: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """`NAME=DIR` strings -> {name: folder}, with an error that says which item is wrong."""
    named: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LoraTuneError(
                f"--adapter {item!r}: write it as NAME=DIR, e.g. --adapter support=runs/support/adapter"
            )
        if name in named:
            raise LoraTuneError(f"--adapter {name} is given twice; each adapter needs its own name")
        folder = Path(path).expanduser()
        if (folder / "adapter").is_dir() and not (folder / "adapter_config.json").is_file():
            folder = folder / "adapter"  # a run folder
        adapter_meta(folder)  # a clear error now for a folder that is not an adapter
        named[name] = folder
    return named


class AdapterSet:
    """The base model plus the adapters loaded on it (a peft model once the first adapter is loaded)."""

    def __init__(
        self,
        model,
        base_id: str,
        base_tok,
        served: Served,
        named: dict[str, Path],
        folder: Path | None,
        max_loaded: int,
        extra: Callable[[], dict[str, Path]] | None = None,
    ):
        if base_id in named:
            raise LoraTuneError(f"adapter name {base_id!r} is the base model's id; choose another name")
        self.model = model
        self.base_id = base_id
        self.base_tok = base_tok
        self.served = served
        self.named = named
        self.folder = folder
        self.max_loaded = max(1, max_loaded)
        self.extra = extra  # more adapters by name, e.g. the fine-tuning jobs' models and checkpoints
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()  # least recently used first
        self._toks: dict[Path, tuple[float, Any]] = {}
        self._lock = threading.Lock()  # tokenizer cache and `loaded`, read by the HTTP thread
        self._mode: str | None = None  # what the peft model is set up for: BASE, MIXED or one adapter

    # -- any thread --------------------------------------------------------------------------------
    def known(self) -> dict[str, Path]:
        """Every adapter that can be served now: the folder's, the extra ones, the named ones (which win)."""
        found = find_adapter_folders(self.folder) if self.folder else {}
        if self.extra is not None:
            found |= self.extra()
        found.pop(self.base_id, None)
        return {**found, **self.named}

    def loaded_names(self) -> list[str]:
        """The adapters in memory, least recently used first (a snapshot: the engine may change it)."""
        with self._lock:
            return list(self.loaded)

    def path(self, name: str) -> Path | None:
        return self.known().get(name)

    def tokenizer(self, name: str):
        """The tokenizer for a model id (the adapter's own when it saved one, read again when it changes),
        or None when no model has that id."""
        if name == self.base_id:
            return self.base_tok
        path = self.path(name)
        if path is None:
            return None
        if not (path / "tokenizer_config.json").is_file():
            return self.base_tok
        stamp = (path / "tokenizer_config.json").stat().st_mtime
        with self._lock:
            hit = self._toks.get(path)
            if hit is None or hit[0] != stamp:
                hit = (stamp, load_tokenizer(str(path), ModelCfg(source=str(path))))
                self._toks[path] = hit
            return hit[1]

    def describe(self, name: str, path: Path) -> dict[str, Any]:
        """What /v1/models says about one adapter: where it is, what it was trained on, how it is served."""
        try:
            meta = adapter_meta(path)
        except LoraTuneError as e:
            return {"kind": "adapter", "path": str(path), "error": str(e)}
        trained = meta.get("quantization", "unknown")
        return {
            "kind": "adapter",
            "path": str(path),
            "trained_base": meta.get("base_model"),
            "trained_on": trained,
            "served_on": self.served.label,
            "weights_as_trained": weights_kind(trained) == self.served.weights if trained != "unknown" else None,
            "steps": meta.get("steps"),
            "loaded": name in self.loaded,
        }

    # -- the engine's thread only --------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """Make `name` usable in the next forward pass and count one more user of it.

        Raises AdapterBusy when it is not loaded and every loaded adapter is in use, and LoraTuneError
        when it can't be loaded at all.
        """
        if name == self.base_id:
            return
        path = self.path(name)
        if path is None:
            raise LoraTuneError(f"adapter {name!r} is no longer available")
        entry = self.loaded.get(name)
        if entry is not None and entry.users == 0 and (entry.path != path or _stamp(path) != entry.stamp):
            self._unload(name)  # retrained or moved since it was loaded: read it again
            entry = None
        if entry is None:
            spare = [n for n, e in self.loaded.items() if e.users == 0]
            if len(self.loaded) >= self.max_loaded and not spare:
                raise AdapterBusy(name)
            self._load(name, path)
            if len(self.loaded) > self.max_loaded:
                self._unload(spare[0])
            entry = self.loaded[name]
        entry.users += 1
        with self._lock:
            self.loaded.move_to_end(name)

    def release(self, name: str) -> None:
        if name in self.loaded:
            self.loaded[name].users -= 1

    def peft_name(self, name: str) -> str:
        return BASE if name == self.base_id else name

    def prepare(self, names: list[str]) -> bool:
        """Set the model up for one forward pass over rows with these peft names; True when the rows
        must name their adapters (`adapter_names=`).

        peft's mixed-adapter path registers hooks on every LoRA layer for each forward pass, which costs
        about half the step time of a 135M model on a CPU; a batch of one adapter (or of the base alone)
        uses the plain path instead, set up only when the batch's make-up changes.
        """
        if not hasattr(self.model, "peft_config"):
            return False
        kinds = set(names)
        mode = next(iter(kinds)) if len(kinds) == 1 else MIXED
        if mode != self._mode:
            if mode == BASE:
                self.model.base_model.disable_adapter_layers()
            else:
                self.model.base_model.enable_adapter_layers()
                if mode != MIXED:
                    self.model.set_adapter(mode)
            self._mode = mode
        return mode == MIXED

    def _load(self, name: str, path: Path) -> None:
        from peft import PeftModel

        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        except Exception as e:  # shapes of another base, a broken file, ...: the request gets the reason
            meta = _meta_or_empty(path)
            trained = f" (trained on {meta['base_model']})" if meta.get("base_model") else ""
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoraTuneError(f"adapter {name!r} at {path}{trained} can't be loaded on {self.base_id}: {line}") from e
        self.model.eval()
        with self._lock:
            self.loaded[name] = Loaded(path, _stamp(path))
        self._mode = None  # peft changed which adapter is active

    def _unload(self, name: str) -> None:
        with warnings.catch_warnings():  # "active adapter is now X": rows name their adapter, none is active
            warnings.simplefilter("ignore", UserWarning)
            self.model.delete_adapter(name)
        with self._lock:
            del self.loaded[name]
        self._mode = None


def _stamp(path: Path) -> float:
    weights = [path / "adapter_model.safetensors", path / "adapter_model.bin", path / "adapter_config.json"]
    return max((w.stat().st_mtime for w in weights if w.is_file()), default=0.0)


def _meta_or_empty(path: Path) -> dict:
    try:
        return adapter_meta(path)
    except LoraTuneError:
        return {}
