"""`train.compile`: torch.compile each decoder layer (regional compilation), or not, and why.

Compiling the repeated block rather than the whole model compiles one graph that every layer reuses
(their parameters are graph inputs), so compile time does not grow with depth. `dynamic=True` keeps
one graph for every sequence length that length-grouped batches bring. Gradient checkpointing wraps
the compiled layer, so recomputation runs compiled code too; bitsandbytes 4-bit layers trace through
their registered torch ops.

Measured (benchmarks/RESULTS.md, ablation, SmolLM2-135M on 2 cores): 1.22x the tokens/s of eager
layers in bf16, 1.18x in fp32 (1.09x with AVX2 kernels, where the matmuls dominate more), about 1.2x
for NF4 in a probe; the one-off compile takes 20-30 s (a few seconds once inductor's cache holds it).
Inductor's cache is not keyed by ATEN_CPU_CAPABILITY: whoever switches it needs a TORCHINDUCTOR_CACHE_DIR
per setting.

`auto` compiles where that is repaid and measured: on the CPU (Linux, with a C++ compiler for
inductor), for runs of at least AUTO_MIN_STEPS steps. On CUDA it is not measured yet, so `auto` leaves
it off there.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import torch

from lora_tune.errors import LoraTuneError

AUTO_MIN_STEPS = 100  # at 1-10 s a step and 10-27% saved, the compile time is repaid well before this


@dataclass(frozen=True)
class CompileChoice:
    on: bool
    reason: str


def cxx_compiler() -> str | None:
    """The C++ compiler inductor's CPU backend would use ($CXX, else g++/c++/clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def choose_compile(setting: bool | str, device: torch.device, total_steps: int) -> CompileChoice:
    """Whether to compile, for `train.compile` = True, False or "auto"."""
    if setting is False:
        return CompileChoice(False, "off (train.compile: false)")
    cpu_ready = device.type != "cpu" or (sys.platform.startswith("linux") and cxx_compiler() is not None)
    if setting is True:
        if not cpu_ready:
            raise LoraTuneError(
                "train.compile: true needs a C++ compiler for torch inductor's CPU code (apt-get install g++, "
                "or set CXX); or use train.compile: auto"
            )
        return CompileChoice(True, "decoder layers compiled (train.compile: true); the first steps include compiling")
    if device.type != "cpu":
        return CompileChoice(False, "off (auto: not measured on GPUs yet; train.compile: true turns it on)")
    if not cpu_ready:
        return CompileChoice(False, "off (auto: no C++ compiler for inductor on this machine)")
    if total_steps < AUTO_MIN_STEPS:
        return CompileChoice(
            False, f"off (auto: {total_steps} steps are too few to repay compiling; on from {AUTO_MIN_STEPS})"
        )
    return CompileChoice(True, f"decoder layers compiled (auto: {total_steps} steps on the CPU); step 1 compiles")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated transformer blocks (transformers' GradientCheckpointingLayer subclasses)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model: torch.nn.Module) -> int:
    """Compile each decoder layer in place (state-dict keys unchanged); returns how many."""
    layers = decoder_layers(model)
    if not layers:
        raise LoraTuneError(
            f"train.compile: found no decoder layers to compile in {type(model).__name__}; set train.compile: false"
        )
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
