"""Process-group helpers for training under ``torchrun``, and deterministic data sharding.

Single-process runs never touch ``torch.distributed``: every helper here degrades to a no-op when no process
group is initialised, so the training loop has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``owns_group``: we initialised the group, so we destroy it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU when CUDA is available, otherwise the CPU."""
    if requested == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    NCCL on CUDA, gloo on CPU. Without those variables (a plain ``python`` run) this is a single process.
    A group the caller already initialised is reused and left for the caller to destroy.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dev = pick_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistInfo(device=pick_device(device, 0))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl", device_id=dev)
    else:
        dist.init_process_group(backend="gloo")
    return DistInfo(rank, world_size, local_rank, dev, owns_group=True)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown(info: DistInfo, *, clean: bool = True) -> None:
    """Leave the process group we created.

    ``clean=False`` (after an exception) skips the barrier: the other ranks may never reach it, and a
    barrier there would turn one rank's crash into a job-wide hang.
    """
    if not (info.owns_group and dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (returns a new tensor; identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's ``value`` (a collective; ``value`` itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    out = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return int(out.item())


def all_gather_objects(obj: Any) -> list[Any]:
    """One small picklable object from every rank, in rank order (used for per-rank RNG states).

    This pickles in memory between our own processes; nothing read from disk is unpickled.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ShardedBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices for one rank: a seeded per-epoch permutation, resumable mid-epoch.

    Every rank draws the same permutation (``seed + epoch``), drops the tail that does not fill a whole
    optimiser step (``batch_size * world_size * accum_steps`` samples: no step straddles two epochs, and
    accumulation sees exactly the samples one big batch would), skips the first ``start`` samples already
    consumed, and takes every ``world_size``-th index starting at its rank. So the union of the ranks' i-th
    micro-batches is exactly the i-th ``batch_size * world_size`` slice of the permutation: one process with
    batch ``B * W`` sees the same global batches as ``W`` processes with batch ``B``, and because ``start``
    counts global samples, a run can resume mid-epoch (even with another world size, when ``start``
    divides).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
    ) -> None:
        global_batch = batch_size * world_size
        if num_samples < global_batch * accum_steps:
            raise ValueError(
                f"dataset has {num_samples} samples, fewer than one optimiser step's batch "
                f"({batch_size} per process x {world_size} processes x {accum_steps} accumulation steps); "
                "lower batch_size or grad_accum_steps"
            )
        if start % global_batch:
            raise ValueError(
                f"data position {start} is not a multiple of the global batch {global_batch}; "
                "resume with the batch size and world size the checkpoint was written with"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.accum_steps = accum_steps
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.start = start

    @property
    def samples_per_epoch(self) -> int:
        """Global samples one epoch yields (the tail short of a whole optimiser step is dropped)."""
        step_batch = self.batch_size * self.world_size * self.accum_steps
        return self.num_samples // step_batch * step_batch

    def __len__(self) -> int:
        return (self.samples_per_epoch - self.start) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        mine = order[self.start : self.samples_per_epoch][self.rank :: self.world_size]
        for i in range(0, len(mine), self.batch_size):
            yield mine[i : i + self.batch_size]
