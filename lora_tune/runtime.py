"""Where and how tensors compute: device, precision, the dtype table, memory readings, cache paths.

The bottom layer of the package: models, data, training, evaluation, merging and benchmarks all use it,
and it imports none of them.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_tune.errors import LoraTuneError

# The one table from our dtype names (config values, precision names) to torch dtypes.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bf16" (the inverse of `DTYPES`)."""
    return {v: k for k, v in DTYPES.items()}[dtype]


def cache_dir() -> Path:
    """Where converted builtin models, tokenized data and pinned sources are kept ($LORA_TUNE_CACHE)."""
    return Path(os.environ.get("LORA_TUNE_CACHE", Path.home() / ".cache" / "lora_tune"))


# ----------------------------------------------------------------------------------------------------
# Device and precision


@dataclass(frozen=True)
class Precision:
    """How a run computes: device, autocast dtype, whether fp16 loss scaling is on, and why."""

    device: torch.device
    dtype: torch.dtype
    reason: str

    @property
    def use_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none.
        return self.dtype is torch.float16

    @property
    def name(self) -> str:
        return dtype_name(self.dtype)

    def autocast(self) -> AbstractContextManager:
        if self.dtype is torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def choose_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LoraTuneError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    return torch.device(name)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 and AMX; Arm's BF16 extension

# The seam for what varies between the machines we run on. Tests and benchmarks set these to stand in
# for another kind of CPU; ATEN_CPU_CAPABILITY=avx2 (read by torch at start-up) limits the real kernels.
CPU_FLAGS_ENV = "LORA_TUNE_CPU_FLAGS"  # the CPU's feature flags, space- or comma-separated
CPU_KERNELS_ENV = "LORA_TUNE_CPU_KERNELS"  # torch's kernel level: AVX512, AVX2, DEFAULT, ...
# The flags an AVX2-only x86 CPU lists (the kind without AVX-512 and bf16 instructions).
AVX2_FLAGS = "sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2"


@dataclass(frozen=True)
class CpuKind:
    """What this CPU can do, as far as choosing a precision and reading benchmarks goes."""

    flags: frozenset[str]  # from /proc/cpuinfo (x86 "flags", Arm "Features"); empty when unknown
    kernels: str  # torch's ATen CPU capability: "AVX512", "AVX2", "DEFAULT", ...

    @property
    def bf16_flag(self) -> str | None | bool:
        """The bf16 instruction set listed ("avx512_bf16", ...), False when the features are listed without
        one, None when they are unknown."""
        if not self.flags:
            return None
        return next((f for f in BF16_CPU_FLAGS if f in self.flags), False)

    @property
    def bf16_fast(self) -> bool | None:
        """Whether bf16 matmuls run at least as fast as fp32 here; None when only a measurement can say.

        x86 bf16 instructions help only where torch's kernels use them: not when they are held to AVX2 or
        less (ATEN_CPU_CAPABILITY, or a build without AVX-512), where bf16 runs ~20-100x slower than fp32.
        Arm's bf16 flag needs no such check.
        """
        flag = self.bf16_flag
        if flag is None:
            return None
        return bool(flag) and x86_kernels_use_bf16(flag, self.kernels)


def cpu_kind(environ: Mapping[str, str] | None = None, cpuinfo: str | None = None) -> CpuKind:
    """This machine's `CpuKind`, or the one LORA_TUNE_CPU_FLAGS / LORA_TUNE_CPU_KERNELS describe."""
    env = os.environ if environ is None else environ
    given = env.get(CPU_FLAGS_ENV)
    flags = frozenset(given.replace(",", " ").split()) if given is not None else frozenset(cpu_flags(cpuinfo))
    kernels = env.get(CPU_KERNELS_ENV) or torch.backends.cpu.get_cpu_capability()
    return CpuKind(flags, kernels.upper())


def avx2_kind_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment in which a process on this machine sees the AVX2 kind: torch's and oneDNN's
    kernels held to AVX2 and the seam's flags those of an AVX2-only CPU. Inductor's kernel cache is not
    keyed by the ISA (kernels built for one kind crash or compute garbage under the other): its own."""
    import tempfile

    return {
        **environ,
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        CPU_FLAGS_ENV: AVX2_FLAGS,
        CPU_KERNELS_ENV: "AVX2",
        "TORCHINDUCTOR_CACHE_DIR": str(Path(tempfile.gettempdir()) / "lora_tune-inductor-avx2"),
    }


def cpu_bf16_flag(cpuinfo: str | None = None) -> str | None | bool:
    """The bf16 instruction set this CPU lists (see `CpuKind.bf16_flag`); from `cpuinfo` when given,
    else as the seam says."""
    return CpuKind(frozenset(cpu_flags(cpuinfo)), "").bf16_flag if cpuinfo is not None else cpu_kind().bf16_flag


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags the CPU lists in /proc/cpuinfo (x86 "flags", Arm "Features"); empty if unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    return flags


def x86_kernels_use_bf16(flag: str, kernels: str) -> bool:
    """Whether torch's CPU kernels can use an x86 CPU's bf16 instructions: not when they are limited to
    AVX2 or less (by ATEN_CPU_CAPABILITY, or a build without AVX-512). Arm's bf16 flag needs no such check."""
    return not flag.endswith("_bf16") or kernels.upper().startswith(("AVX512", "AMX"))


def cpu_bf16_speedup(size: int = 512, rounds: int = 5) -> float:
    """Measured fp32-time / bf16-time of a matmul on this CPU (>1 means bf16 is faster).

    The two dtypes alternate and each keeps its best round, so a burst of load elsewhere on the machine
    does not decide the answer.
    """
    a = torch.randn(size, size)
    xs = {dtype: a.to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(xs, float("inf"))
    for x in xs.values():
        x @ x  # warm-up: first call pays for kernel selection
    for _ in range(rounds):
        for dtype, x in xs.items():
            t0 = time.perf_counter()
            x @ x
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def choose_precision(
    requested: str,
    device: torch.device,
    weight_dtype: str | None = None,
    saved: str | None = None,
    cpu: CpuKind | None = None,
) -> Precision:
    """Pick the compute dtype.

    `weight_dtype` is the dtype of unquantized base weights (bf16/fp16), which fixes the compute dtype.
    `saved` is the precision a resumed run chose when it started: `auto` keeps it, so a resume never
    changes precision. GPU: bf16 where supported, else fp16 with a GradScaler. CPU: bf16 autocast where
    the CPU has bf16 instructions, fp32 where it lists its features without them, and where they are
    unknown, whichever a matmul measurement says is faster. `cpu`: the CPU kind (default `cpu_kind()`).
    """
    if weight_dtype in ("bf16", "fp16"):
        if requested not in ("auto", weight_dtype):
            raise LoraTuneError(
                f"train.precision={requested} does not match model.quantization={weight_dtype}; "
                f"use train.precision=auto or {weight_dtype}"
            )
        requested = weight_dtype
    if device.type == "cpu" and requested == "fp16":
        raise LoraTuneError("fp16 training is not supported on the CPU; use bf16 or fp32 (train.precision=auto)")
    if requested == "auto" and saved in DTYPES:
        return Precision(device, DTYPES[saved], f"{saved} (chosen when the run started; kept on resume)")
    if requested != "auto":
        dtype = DTYPES[requested]
        if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise LoraTuneError("this GPU has no bf16 support; use train.precision=fp16 (or auto)")
        why = "set by model.quantization" if weight_dtype == requested else "set by train.precision"
        return Precision(device, dtype, f"{requested} ({why})")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(device, torch.bfloat16, "bf16 autocast: this GPU supports bf16")
        return Precision(device, torch.float16, "fp16 autocast + GradScaler: this GPU has no bf16")
    kind = cpu or cpu_kind()
    flag = kind.bf16_flag
    if flag and not kind.bf16_fast:
        why = f"fp32: this CPU has {flag}, but torch runs {kind.kernels} kernels here (ATEN_CPU_CAPABILITY)"
        return Precision(device, torch.float32, why)
    if flag:
        return Precision(device, torch.bfloat16, f"bf16 autocast: this CPU has bf16 instructions ({flag})")
    if flag is False:
        return Precision(device, torch.float32, "fp32: this CPU has no bf16 instructions (bf16 would be slower)")
    speedup = cpu_bf16_speedup()
    if speedup > 1.1:
        return Precision(device, torch.bfloat16, f"bf16 autocast: measured {speedup:.1f}x faster than fp32 here")
    return Precision(device, torch.float32, f"fp32: bf16 measured only {speedup:.2f}x fp32's speed on this CPU")


@contextmanager
def evaluating(model):
    """`model.eval()` for the duration, then back to the mode it was in.

    While training is under way, bitsandbytes 4-bit layers are kept in training mode: on CPUs with
    AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight into an inference-only layout the first
    time the layer runs in eval mode without gradients, and never unpacks it; the matmul used from
    then on has no backward, so training after a validation pass would silently lose every gradient
    that flows through the quantized layers. The 4-bit layers have no dropout or other train/eval
    difference of their own, so keeping them in training mode changes no result.
    """
    was_training = model.training
    model.eval()
    if was_training:
        for _, _, layer in bnb_4bit_layers(model):
            layer.train()
    # Layers compiled for training (train.compile) run eagerly here: their graphs are for training's
    # grad mode, and generation's growing KV cache would compile a new graph every few tokens.
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    kept = [m._compiled_call_impl for m in compiled]
    for m in compiled:
        m._compiled_call_impl = None
    try:
        yield model
    finally:
        for m, impl in zip(compiled, kept, strict=True):
            m._compiled_call_impl = impl
        model.train(was_training)


def bnb_4bit_layers(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute name, layer) of every bitsandbytes 4-bit linear layer of `model`."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, bnb.nn.Linear4bit)
    ]


# ----------------------------------------------------------------------------------------------------
# Memory


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocated bytes on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()
