"""The allocator that the commands which train run under (lora_tune.allocator)."""

from __future__ import annotations

import pytest

from lora_tune import allocator
from lora_tune.errors import LoraTuneError


def finder(**found):
    return lambda name: found.get(name)


def test_auto_prefers_tcmalloc_then_mimalloc_then_glibc_and_says_how_to_get_one():
    assert allocator.choose("auto", finder(tcmalloc="/t.so", mimalloc="/m.so")).path == "/t.so"
    assert allocator.choose("auto", finder(mimalloc="/m.so")).name == "mimalloc"
    none = allocator.choose("auto", finder())
    assert none.path is None and "pip install cmeel-mimalloc" in none.reason
    assert allocator.choose("system", finder(tcmalloc="/t.so")).path is None
    assert allocator.choose("mimalloc", finder(tcmalloc="/t.so", mimalloc="/m.so")).path == "/m.so"


def test_asking_for_a_missing_or_unknown_allocator_is_an_error_that_says_what_to_do():
    with pytest.raises(LoraTuneError, match="apt-get install libtcmalloc-minimal4"):
        allocator.choose("tcmalloc", finder(mimalloc="/m.so"))
    with pytest.raises(LoraTuneError, match="choose one of auto, tcmalloc, mimalloc, system"):
        allocator.choose("jemallocc", finder())


def test_preload_env_adds_the_library_once_and_keeps_what_was_preloaded():
    choice = allocator.Choice("mimalloc", "/lib/m.so", "")
    env = allocator.preload_env({"LD_PRELOAD": "/other.so", "X": "1"}, choice)
    assert env == {"LD_PRELOAD": "/lib/m.so /other.so", "X": "1"}
    assert allocator.preload_env(env, choice) is None  # already under it: no second re-exec
    assert allocator.preload_env({}, allocator.Choice("system", None, "")) is None


def test_active_reads_the_mapped_libraries():
    assert allocator.active("7f00 r-xp 00 /usr/lib/libtcmalloc_minimal.so.4\n") == "tcmalloc"
    assert allocator.active("7f00 r-xp 00 /site/cmeel.prefix/lib/libmimalloc.so.3\n") == "mimalloc"
    assert allocator.active("7f00 r-xp 00 /lib/libc.so.6\n") == "system"


def test_mimalloc_comes_with_the_package():
    # cmeel-mimalloc is a dependency on Linux, so a fresh install always has a lean allocator to preload
    path = allocator.find_library("mimalloc")
    assert path is not None and "libmimalloc.so" in path


# `lora-tune train` re-executing itself under the allocator it names: test_faults' chain (mimalloc) and
# test_distributed's runs (LORA_TUNE_ALLOCATOR=system) assert what their processes say.
