"""More than one process: who this process is, the collectives the loop needs, and the DDP/FSDP wrapping.

Processes are started by torchrun (`lora-tune train --nproc N` runs it; `accelerate launch` sets the same
variables). Each process reads `RANK`, `WORLD_SIZE` and `LOCAL_RANK` from its environment; a single
process has a `Dist` of one and every collective is a no-op, so the loop has one code path.

What the loop relies on:
- every rank sees the same global stream of micro-batches and trains on its share of their rows
  (`BatchStream(shard=...)`), so the stream's position is one number for all ranks;
- each step's normaliser (supervised tokens for SFT) is summed over ranks before any backward, so N ranks
  with micro-batch m make the update of one process with micro-batch N*m;
- gradients are averaged by DDP in the step's last backward only (`no_sync` before it);
- rank 0 alone writes files; the other ranks only read them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from lora_tune.errors import LoraTuneError

# how long a rank waits in a collective for one that is gone before giving up (torchrun stops the job
# sooner: it ends every rank as soon as one exits)
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (the training device)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints and the adapter."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float]) -> list[float]:
        """`values` summed over ranks (one all-reduce in float64, exact for counts below 2**53)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def max(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return int(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (small Python values between our own processes)."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order, on every rank: as tensors, so nothing is unpickled."""
        if not self.enabled:
            return [data]
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        tdist.all_gather(sizes, size)
        width = int(max(s.item() for s in sizes))
        mine = torch.zeros(width, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        mine = mine.to(self.device)
        out = [torch.zeros_like(mine) for _ in range(self.world)]
        tdist.all_gather(out, mine)
        return [bytes(t[: int(n.item())].cpu().numpy()) for t, n in zip(out, sizes, strict=True)]

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def from_env(env: dict[str, str] | None = None) -> Dist:
    """The rank, world size and local rank torchrun (or accelerate) put in the environment."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise LoraTuneError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e}); start with torchrun") from None
    if world < 1 or not 0 <= rank < world:
        raise LoraTuneError(f"RANK={rank} does not fit WORLD_SIZE={world}; start the processes with torchrun")
    return Dist(rank, world, local)


def torchrun_command(nproc: int, args: list[str], python: str = sys.executable) -> list[str]:
    """The torchrun command line that starts `lora-tune ARGS` as `nproc` processes on this machine.

    `--standalone` runs the rendezvous on this machine at a free port; torchrun ends every process when
    one of them fails, so a killed rank stops the job (resume it with --resume).
    """
    run = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*run, "-m", "lora_tune.cli", *args]


def start(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun; returns this rank's Dist and training device.

    CUDA ranks talk over NCCL, each on GPU `LOCAL_RANK`; CPU ranks over gloo.
    """
    from lora_tune.runtime import choose_device

    d = from_env()
    device = choose_device(device_name)
    if not d.enabled:
        return Dist(device=device), device
    if device.type == "cuda":
        if d.local_rank >= torch.cuda.device_count():
            raise LoraTuneError(
                f"rank {d.rank} wants GPU {d.local_rank}, but {torch.cuda.device_count()} are visible; "
                "start no more processes per machine than it has GPUs"
            )
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        tdist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    return Dist(d.rank, d.world, d.local_rank, device), device


def stop(d: Dist) -> None:
    """Leave the process group (at the end of training, or on its way out after an error).

    The DDP/FSDP wrappers hold the group: they are collected first, while it is alive, rather than at
    interpreter exit (see `leave`)."""
    if d.enabled and tdist.is_initialized():
        import gc

        gc.collect()
        tdist.destroy_process_group()


def leave(code: int = 0) -> None:
    """End a training process of several without the interpreter's teardown.

    Seen once in CI-like runs (not reproduced in dozens here): a gloo rank that had finished, flushed and
    left its group aborted in C++ teardown ("terminate called without an active exception"), and torchrun
    then failed the whole finished job. Everything a rank writes is written and closed before this (atomic
    files, trackers closed by their hooks), so skipping teardown loses nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wrap_ddp(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """`model` in DistributedDataParallel over its trainable parameters only.

    The frozen base is loaded identically by every rank, so it is neither broadcast at the start (an 8B
    base would be 16 GB over the wire; a 4-bit one cannot be) nor given gradient buckets. The LoRA weights
    are broadcast from rank 0 once, so all ranks start equal whatever their seeds.
    """
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def wrap_fsdp(root: torch.nn.Module, model: torch.nn.Module, d: Dist, compute: torch.dtype) -> torch.nn.Module:
    """Shard `root` (the `LossOf` module around `model`) with FSDP2 over all ranks: each decoder layer is one
    unit, gathered for its forward and backward and freed after; the rest (embeddings, norm, head) is the
    root's unit, gathered for the whole forward. Frozen and 4-bit base weights are sharded too: that is
    the memory FSDP saves. Weights are gathered in `compute` dtype (all of a unit's weights share one
    dtype; 4-bit ones are packed in it, see `models.quantization_config`); gradients reduce in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lora_tune.train.compile import decoder_layers

    layers = decoder_layers(model)  # the units FSDP shards and gathers one by one
    if not layers:
        raise LoraTuneError(f"train.distributed=fsdp: no decoder layers found in {type(model).__name__}; use ddp")
    mesh = init_device_mesh(d.device.type, (d.world,))
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(root, mesh=mesh, mp_policy=policy)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole on every rank; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights by name, whole and on the CPU, gathered from FSDP's shards: a
    collective, so every rank calls it (the frozen base is never gathered)."""
    return {n: full_tensor(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state of FSDP-sharded parameters, whole, on rank 0 (empty elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(root, optimizer, options=options)


def load_full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put a whole optimizer state (`full_optimizer_state`, read from a checkpoint) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def no_sync(model: torch.nn.Module | None, skip: bool) -> Iterator[None]:
    """When `skip`, a backward that must not reduce gradients yet: DDP's `no_sync`; FSDP keeps them
    unsharded and whole until the step's last backward reduce-scatters them (LoRA gradients are small)."""
    if not skip or model is None:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield
