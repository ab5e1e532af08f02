"""Which malloc the process runs under: tcmalloc or mimalloc where one is found, else glibc's.

Training allocates and frees the same few large blocks (activations, recomputed layers, logits
chunks) every step. glibc's malloc serves them from heaps that fragment, and keeps what is freed, so
peak RSS carries about a gigabyte of slack that moves from run to run; sending large blocks to mmap
instead (a low MALLOC_MMAP_THRESHOLD_) removes the slack but pays a page fault for every page of
every block. tcmalloc and mimalloc reuse freed blocks by size class: in the ablation of
benchmarks/RESULTS.md (SmolLM2-135M, 8 x 256 full-length tokens), peak RSS above the import baseline
was 1692 MB with glibc, 1033 MB with tcmalloc and 1069 MB with mimalloc in fp32 (898 / 649 / 677 MB in
bf16); tcmalloc's steps were 2-6% faster than glibc's, mimalloc's 3-4% slower.

An allocator has to be in place before the interpreter starts, so `lora-tune train` (and the other
commands that train) re-executes itself once with LD_PRELOAD naming it, as PyTorch's own CPU
launcher (`python -m torch.backends.xeon.run_cpu`) does. `LORA_TUNE_ALLOCATOR` chooses:
`auto` (default: tcmalloc, then mimalloc), `tcmalloc`, `mimalloc`, or `system` to keep glibc.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lora_tune.errors import LoraTuneError

ENV = "LORA_TUNE_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "mimalloc", "system")
PREFERENCE = ("tcmalloc", "mimalloc")  # by the measurements above: faster and leaner in that order
_LIB_NAMES = {"tcmalloc": ("tcmalloc_minimal", "tcmalloc"), "mimalloc": ("mimalloc",)}
_INSTALL = {
    "tcmalloc": "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu) or your system's gperftools",
    "mimalloc": "pip install cmeel-mimalloc",
}


@dataclass(frozen=True)
class Choice:
    """An allocator to preload (`path` None: keep the system's malloc), and why."""

    name: str
    path: str | None
    reason: str


def find_library(name: str) -> str | None:
    """Where the shared library of allocator `name` is, or None.

    mimalloc is looked for first in the `cmeel-mimalloc` wheel (a pip dependency of ours on Linux),
    then, like tcmalloc, on the dynamic linker's search path.
    """
    if name == "mimalloc":
        try:
            for f in metadata.files("cmeel-mimalloc") or []:
                if f.name.startswith("libmimalloc.so"):
                    path = Path(str(f.locate())).resolve()
                    if path.is_file():
                        return str(path)
        except metadata.PackageNotFoundError:
            pass
    for lib in _LIB_NAMES[name]:
        found = ctypes.util.find_library(lib)
        if found:
            return found
    return None


def choose(requested: str, find=find_library) -> Choice:
    """The allocator `requested` (one of CHOICES) comes to on this machine."""
    if requested not in CHOICES:
        raise LoraTuneError(f"{ENV}={requested!r}: choose one of {', '.join(CHOICES)}")
    if not sys.platform.startswith("linux"):
        return Choice("system", None, f"the system's malloc ({ENV} applies on Linux only)")
    if requested == "system":
        return Choice("system", None, f"glibc malloc ({ENV}=system)")
    for name in PREFERENCE if requested == "auto" else (requested,):
        path = find(name)
        if path:
            return Choice(name, path, f"{name}, preloaded ({path}); {ENV}=system keeps glibc malloc")
    if requested != "auto":
        raise LoraTuneError(f"{ENV}={requested}: no {requested} library found; {_INSTALL[requested]}")
    return Choice(
        "system",
        None,
        "glibc malloc: neither tcmalloc nor mimalloc was found, so peak memory carries allocator slack; "
        f"{_INSTALL['mimalloc']}",
    )


def preload_env(environ: Mapping[str, str], choice: Choice) -> dict[str, str] | None:
    """The environment to run under `choice`, or None when `environ` already has it (or it is glibc)."""
    if choice.path is None:
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if choice.path in preloaded.replace(":", " ").split():
        return None
    return {**environ, "LD_PRELOAD": f"{choice.path} {preloaded}".strip()}


def reexec_under(requested: str | None = None) -> None:
    """Replace this process by the same command under the chosen allocator, if it is not already.

    Call it first thing in a command that trains: nothing is lost, since nothing has run yet. The
    child finds the library in its LD_PRELOAD and goes on; if the dynamic linker could not load it,
    `active()` says glibc and the training log shows it.
    """
    choice = choose(requested or os.environ.get(ENV, "auto"))
    env = preload_env(os.environ, choice)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def active(maps: str | None = None) -> str:
    """The allocator this process runs under: "tcmalloc", "mimalloc" or "system"."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "system"
    for name, libs in _LIB_NAMES.items():
        if any(f"lib{lib}.so" in maps for lib in libs):
            return name
    return "system"


def describe() -> str:
    """One line for the training log: which allocator runs, and how to change it."""
    name = active()
    if name != "system":
        return f"{name} ({ENV}=system keeps glibc malloc)"
    requested = os.environ.get(ENV, "auto")
    if requested == "system":
        return f"glibc malloc ({ENV}=system)"
    return f"glibc malloc (`lora-tune train` preloads tcmalloc or mimalloc where found; {_INSTALL['mimalloc']})"
