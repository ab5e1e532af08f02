"""Reference log-probabilities computed once before training (`preference.precompute_ref`).

DPO and KTO compare the policy with a reference: the model before this run's training. Computing the
reference's log-probs of every answer in one pass before training removes the second (no-grad) forward
of each step. They are kept beside the run (`reference_logps.safetensors`, so a resume never redoes
them, whatever the model has learnt since) and, with `data.cache`, in the cache keyed by the tokenized
data, the model and its precision, so a re-run with the same data does not redo them either.

When training starts from an adapter (`model.adapter`), the reference is that adapter's model, which is
exactly the model at step 0: this pass is then how the reference is made, with no second adapter.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lora_tune.atomic import sha256_of
from lora_tune.data.batching import BatchStream
from lora_tune.data.pairs import PrefExample, collate_prefs, dump_pairs
from lora_tune.errors import LoraTuneError
from lora_tune.losses import adapter_disabled, answer_logps_of
from lora_tune.runtime import Precision, cache_dir

FILE = "reference_logps.safetensors"


def compute(
    model, examples: list[PrefExample], batch_size: int, pad_id: int, precision: Precision, base: bool = True
) -> torch.Tensor:
    """`[N, A]` summed log-probs of every example's answers under the reference: the model with its adapter
    disabled (`base`), or the model as it is (training starts from an adapter).

    Examples go through sorted by length, so batches hold little padding; rows come back in input order.
    """
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    stream = BatchStream([examples[i] for i in order], batch_size, 0, pad_id, shuffle=False, collate_fn=collate_prefs)
    with adapter_disabled(model) if base else nullcontext():
        logps = answer_logps_of(model, stream, precision.autocast)
    return logps[torch.argsort(torch.tensor(order, dtype=torch.long))]


def fingerprint(examples: dict[str, list[PrefExample]], model_id: dict) -> str:
    """A key for the cache: the tokenized examples of every split and what the reference model is."""
    h = hashlib.sha256(b"reference-v1")
    h.update(repr(sorted(model_id.items())).encode())
    for name in sorted(examples):
        h.update(name.encode() + dump_pairs(examples[name]).encode())
    return h.hexdigest()[:32]


def model_identity(source_path: str, quantization: str, precision: Precision, adapter: str | None) -> dict:
    """What decides the reference's numbers besides the data: weights, their quantization, the precision."""
    ident = {"source": str(Path(source_path).resolve()) if Path(source_path).exists() else source_path}
    weights = sorted(Path(source_path).glob("*.safetensors")) if Path(source_path).is_dir() else []
    ident |= {"weights": [f"{w.name}:{w.stat().st_size}:{int(w.stat().st_mtime)}" for w in weights]}
    ident |= {"quantization": quantization, "precision": precision.name, "device": precision.device.type}
    if adapter:
        ident["adapter"] = sha256_of(Path(adapter) / "adapter_model.safetensors")
    return ident


def _read(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The saved log-probs if `path` holds those of `key`; None when absent, damaged or of other data."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception:  # noqa: BLE001 - a damaged file is recomputed, never trusted
        return None


def _write(path: Path, tensors: dict[str, torch.Tensor], key: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": key})
    tmp.replace(path)


def attach(
    splits: dict[str, list[PrefExample]],
    run_dir: Path,
    key: str,
    compute_fn,
    use_cache: bool,
    resuming: bool,
    note=print,
) -> None:
    """Put reference log-probs into every example (`ex.ref`).

    Resuming from a checkpoint: from the run folder (an error if they are gone: the model has trained
    since, so they can't be made again). Otherwise from the cache, else `compute_fn(examples)` per split;
    then saved in the run folder (and the cache).
    """
    run_file, cache_file = Path(run_dir) / FILE, cache_dir() / "reference" / f"{key}.safetensors"
    if resuming:
        saved = _read(run_file, key)
        if saved is None:
            raise LoraTuneError(
                f"{run_file} is missing, damaged or of other data; the reference log-probs can't be recomputed "
                "once training has started. Start over with --overwrite"
            )
        where = "the run folder"
    else:
        saved, where = (_read(cache_file, key) if use_cache else None), "the cache"
        if saved is None:
            t0 = time.perf_counter()
            saved = {name: compute_fn(ex) for name, ex in splits.items() if ex}
            n = sum(len(ex) for ex in splits.values())
            where = f"computed: {n} examples in {time.perf_counter() - t0:.1f} s"
            if use_cache:
                _write(cache_file, saved, key)
        _write(run_file, saved, key)
    for name, ex in splits.items():
        for e, values in zip(ex, saved[name].tolist() if ex else [], strict=True):
            e.ref = values
    note(f"reference log-probs precomputed ({where}); each step runs one forward")
