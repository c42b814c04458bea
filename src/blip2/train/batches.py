"""The stream of micro-batches a run draws from, across epochs, and where it stands (for exact resume)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from blip2.distributed import DistInfo, ShardedBatchSampler
from blip2.train.config import TrainConfig


class BatchStream:
    """Endless micro-batches across epochs, remembering (epoch, global samples consumed in the epoch)."""

    def __init__(
        self,
        dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any] | None,
        cfg: TrainConfig,
        info: DistInfo,
        epoch: int = 0,
        samples_in_epoch: int = 0,
    ) -> None:
        self.dataset, self.collate_fn, self.cfg, self.info = dataset, collate_fn, cfg, info
        self.epoch, self.samples_in_epoch = epoch, samples_in_epoch
        self.global_batch = cfg.batch_size * info.world_size
        self._iterator: Iterator[Any] | None = None

    def steps_per_epoch(self) -> int | None:
        """Optimiser steps in one pass over a map-style dataset (the sampler drops the tail); None when
        the dataset streams."""
        if isinstance(self.dataset, IterableDataset):
            return None
        return len(self.dataset) // (self.global_batch * self.cfg.grad_accum_steps)  # type: ignore[arg-type]

    def _loader(self) -> DataLoader:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        # A dedicated generator: creating an iterator must not draw from the global torch RNG (which would
        # shift dropout masks between an uninterrupted run and a resumed one); it also seeds the workers.
        loader_generator = torch.Generator().manual_seed(
            self.cfg.seed + 7919 * self.epoch + 104729 * self.info.rank + 1
        )
        common: dict[str, Any] = {
            "collate_fn": self.collate_fn,
            "num_workers": self.cfg.num_workers,
            "pin_memory": self.info.device.type == "cuda",
            "generator": loader_generator,
        }
        if isinstance(self.dataset, IterableDataset):
            return DataLoader(self.dataset, batch_size=self.cfg.batch_size, drop_last=True, **common)
        sampler = ShardedBatchSampler(
            len(self.dataset),  # type: ignore[arg-type]
            self.cfg.batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
            accum_steps=self.cfg.grad_accum_steps,
            shuffle=self.cfg.shuffle,
            seed=self.cfg.seed,
            epoch=self.epoch,
            start=self.samples_in_epoch,
        )
        return DataLoader(self.dataset, batch_sampler=sampler, **common)

    def next(self) -> Any:
        for _ in range(2):  # at most one epoch change per batch
            if self._iterator is None:
                self._iterator = iter(self._loader())
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch, self.samples_in_epoch = self.epoch + 1, 0
                continue
            self.samples_in_epoch += self.global_batch
            return batch
        raise RuntimeError("the training dataset yielded no batch for a whole epoch (is it empty?)")

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch}


def batch_rows(batch: Any) -> int:
    """Samples in a collated batch: the leading size of its first tensor (0 when the collator dropped all)."""
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    return 1  # no tensor to tell by: let forward() see it


def to_device(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"collate_fn must return a dict of tensors, got {type(batch).__name__}")
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
