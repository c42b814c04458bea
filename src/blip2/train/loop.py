"""The training loop, shared by stage 1 (Q-Former + frozen image encoder) and stage 2 (+ frozen LLM).

The loop is model-agnostic. What it needs (the whole contract):

- ``model`` is an ``nn.Module``; ``model(**batch)`` returns an object (or a mapping) with ``loss``, a scalar
  tensor that is the **mean over this process's micro-batch**, and optionally ``losses``, a
  ``dict[str, Tensor]`` of scalar parts (``loss_itc``, ``loss_itm``, ...) that are logged one by one.
- Only parameters with ``requires_grad=True`` are optimised; frozen ones are never given to the optimiser,
  never clipped and never saved, so they stay bit-identical. The loop calls ``model.train()`` once; a model
  whose frozen parts must stay in eval mode overrides ``train()`` to keep them there.
- ``train_dataset`` is a map-style dataset (exact resume and sharding) or an ``IterableDataset`` (shards by
  rank itself; its position is not restored on resume). ``collate_fn`` returns a dict; tensor entries are
  moved to the device and passed to ``forward``, anything else (``image_ids``, ``skipped``) is dropped. A
  batch whose tensors hold no rows (the collator dropped every sample as unreadable) is skipped, by every rank
  at once under DDP; ``MAX_EMPTY_BATCHES`` in a row stop the run with an error.
- Randomness: the loop seeds python, numpy and torch (from ``seed`` and the rank) and owns every
  ``torch.Generator`` passed as ``rng_generators`` (e.g. the one a dataset draws its augmentation from):
  it re-seeds them on a fresh run and checkpoints them. Draw augmentation from those (or from the global
  RNGs), not from a private generator the loop does not know about.

Exact resume. A checkpoint (written atomically by rank 0 every ``save_every`` steps and at the end) holds the
trainable state, optimiser, schedule, GradScaler, step, every rank's RNG states (python, numpy, torch CPU,
this rank's CUDA device, the named generators) and the data position: the epoch and the number of global
samples consumed in it. The sampler's order is a pure function of ``(seed, epoch)``, so a resumed run
rebuilds the epoch's permutation and skips what was consumed; DataLoaders draw from their own seeded
generator, never from the global RNG, so creating one mid-epoch does not shift dropout. On CPU with
``num_workers=0``, on one machine and torch build with one thread count (the default is fine), two runs of one
config end bit-identical, and so does a run killed at any point and resumed. ``deterministic=True`` (the
default) runs the loop under ``torch.use_deterministic_algorithms(True, warn_only=True)`` to keep it so for
the kernels torch knows to be non-deterministic (on CUDA, e.g. scatter/index_add); the caller's setting is
restored afterwards. With
``num_workers > 0`` the data order is still exact, but augmentation runs in worker processes whose RNGs are
seeded per epoch, not checkpointed: a resumed epoch draws different augmentation unless the dataset derives
its randomness from the sample index and epoch (``set_epoch(epoch)`` is called when the dataset has it).
Multi-process runs assume ``output_dir`` is on a filesystem every rank can read.

Failures. ``output_dir`` and ``device`` are checked before anything is built (`OutputDirError`,
`TrainConfigError`). ``resume`` verifies the checkpoint it picks and falls back to the newest one that loads
(`CheckpointError` when none does). A non-finite loss stops the run with `TrainingDivergedError` naming the
step and the knobs; no checkpoint is written after it, so the newest one on disk is the last good one. Data
that yields no readable sample for ``MAX_EMPTY_BATCHES`` micro-batches raises `TrainDataError`.

Equivalence notes. Gradients are ``mean over micro-steps of (per-process mean loss)`` averaged over ranks by
DDP. That equals the mean over the global batch (``batch_size * world_size * grad_accum_steps``) only
because every process sees equally sized micro-batches, which the sampler guarantees (``drop_last``). A
model whose loss is a sum, or normalised by a data-dependent count (tokens), is only approximately
equivalent across different splits of the same global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from blip2.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    init_distributed,
    min_over_ranks,
    shutdown,
)
from blip2.train.batches import BatchStream, batch_rows, to_device
from blip2.train.config import TrainConfig, TrainConfigError
from blip2.train.metrics import append_metrics, plot_losses, read_metrics, truncate_metrics
from blip2.train.optim import build_optimizer, build_scheduler
from blip2.train.state import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    checkpoint_path,
    load_trainable_state_dict,
    prepare_output_dir,
    restore_rng_state,
    resume_checkpoint,
    save_checkpoint,
    seed_everything,
    trainable_state_dict,
)

__all__ = ["TrainConfig", "TrainDataError", "TrainingDivergedError", "check_device", "run_training"]

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, Mapping[str, float]], None]

MAX_EMPTY_BATCHES = 100  # consecutive micro-batches with no readable sample before the run gives up


class TrainDataError(ValueError):
    """The training data gives nothing to train on (e.g. every image unreadable)."""


class TrainingDivergedError(ValueError):
    """The loss or the weights became NaN/inf: the run stops, its last good checkpoint kept."""


def check_device(device: str) -> None:
    """Reject a ``device`` setting this machine cannot run, with the fix (before any model is built)."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TrainConfigError(f"device={device!r} is not a device: use auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainConfigError(f"device={device} but this machine has no usable CUDA GPU: use device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainConfigError(f"device={device} but this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise TrainConfigError(f"device={device!r}: training runs on cpu or cuda; use device=auto, cpu or cuda")


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` for the run, the caller's setting after."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cuda":  # cuBLAS needs this for deterministic matmuls (read at its initialisation)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _read_output(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    get = out.get if isinstance(out, Mapping) else lambda k, d=None: getattr(out, k, d)
    loss, losses = get("loss"), get("losses") or {}
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise TypeError(f"model forward must return an object with a scalar tensor `.loss`, got {loss!r}")
    return loss, {k: v for k, v in losses.items() if k != "loss"}


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _derived_seed(seed: int, rank: int, index: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + index) % 2**63


def run_training(
    cfg: TrainConfig,
    model: nn.Module,
    train_dataset: Dataset,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    *,
    rng_generators: Mapping[str, torch.Generator] | None = None,
    callbacks: Sequence[StepCallback] = (),
) -> dict[str, float]:
    """Train ``model`` for ``cfg.max_steps`` optimiser steps; returns the last logged metrics.

    Works as a plain process or under ``torchrun`` (joins/leaves the process group itself unless the
    caller already initialised one). ``callbacks`` run on every rank after each optimiser step (after
    logging and checkpointing) with the step and the most recently logged metrics.
    """
    check_device(cfg.device)
    prepare_output_dir(cfg.output_dir, cfg.resume)
    info = init_distributed(cfg.device)
    try:
        with _deterministic(cfg.deterministic, info.device):
            loop = _Loop(cfg, model, train_dataset, collate_fn, info, dict(rng_generators or {}))
            result = loop.run(callbacks)
    except BaseException:
        shutdown(info, clean=False)
        raise
    shutdown(info)
    return result


@dataclass
class _Window:
    """Loss sums since the last log line (device tensors: no host sync per step), and the first step whose
    loss was not finite (0: none yet; kept on the device too). A non-finite gradient norm alone is not
    divergence: AdamW's update stays finite, and fp16's GradScaler skips such steps by design."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_bad: torch.Tensor | None = None

    def add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def mark(self, finite: torch.Tensor, step: int) -> None:
        first = (
            self.first_bad if self.first_bad is not None else torch.zeros((), dtype=torch.long, device=finite.device)
        )
        self.first_bad = torch.where(finite | (first > 0), first, torch.full_like(first, step))


class _Loop:
    """The state of one run, with one method per phase: set-up/restore, step, log, save."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any] | None,
        info: DistInfo,
        generators: dict[str, torch.Generator],
    ) -> None:
        self.cfg, self.model, self.info, self.generators = cfg, model, info, generators
        self.dataset = dataset
        self.out_dir = Path(cfg.output_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.device = device = info.device
        if device.type != "cuda" and cfg.precision != "fp32":
            logger.info("precision=%s applies on CUDA only; training on %s in fp32", cfg.precision, device)
        if device.type == "cuda" and cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise TrainConfigError("this GPU does not support bf16; set precision=fp16 (or fp32)")

        model.to(device)
        if cfg.grad_checkpointing:
            enable = getattr(model, "gradient_checkpointing_enable", None)
            if enable is None:
                logger.warning(
                    "grad_checkpointing=true but %s has no gradient_checkpointing_enable()", type(model).__name__
                )
            else:
                enable()
        self.stream = BatchStream(dataset, collate_fn, cfg, info)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.stream.steps_per_epoch())
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.precision == "fp16")
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]

        self.step, self.elapsed_before = 0, 0.0
        self.last_saved: Path | None = None
        data_pos, self._rng_state = self._restore(isinstance(dataset, IterableDataset))
        self.stream.epoch, self.stream.samples_in_epoch = data_pos["epoch"], data_pos["samples_in_epoch"]
        self.wrapped: nn.Module = model
        if info.distributed:
            self.wrapped = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        model.train()
        rows = read_metrics(self.metrics_path) if info.is_main else []
        self.metrics: dict[str, float] = rows[-1] if rows else {}
        self.window = _Window()
        self.started = time.perf_counter()

    def _restore(self, iterable_data: bool) -> tuple[dict[str, int], dict[str, Any] | None]:
        """Load the checkpoint ``cfg.resume`` names, or seed a fresh run. Returns the data position and
        this rank's saved RNG state, which ``run()`` applies last, so that nothing in between (DDP set-up,
        DataLoader creation) can draw from the restored generators."""
        cfg, info = self.cfg, self.info
        found = resume_checkpoint(cfg.resume, self.out_dir)
        if info.is_main:
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            truncate_metrics(self.metrics_path, 0 if found is None else found[1]["step"])
        if found is None:
            seed_everything(_derived_seed(cfg.seed, info.rank, 0))
            for i, g in enumerate(self.generators.values()):
                g.manual_seed(_derived_seed(cfg.seed, info.rank, 1 + i))
            return {"epoch": 0, "samples_in_epoch": 0}, None

        self.last_saved, state = found
        load_trainable_state_dict(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed_before = state["step"], state["elapsed_s"]
        if info.is_main:
            logger.info("resumed from %s at step %d", self.last_saved, self.step)
        data_pos = dict(state["data"])
        if iterable_data:
            logger.warning("resuming with an IterableDataset: its data position is not restored")
            data_pos["samples_in_epoch"] = 0
        if len(state["rng"]) == info.world_size:
            return data_pos, state["rng"][info.rank]
        logger.warning(
            "checkpoint was written by %d processes, this run has %d: RNG re-seeded, so the run "
            "continues validly but not bit-exactly",
            len(state["rng"]),
            info.world_size,
        )
        seed_everything(_derived_seed(cfg.seed, info.rank, self.step))
        return data_pos, None

    def run(self, callbacks: Sequence[StepCallback]) -> dict[str, float]:
        cfg = self.cfg
        if self._rng_state is not None:
            restore_rng_state(self._rng_state, self.generators, self.device)
        bar = tqdm(
            total=cfg.max_steps, initial=self.step, disable=not self.info.is_main, desc="train", dynamic_ncols=True
        )
        while self.step < cfg.max_steps:
            lr, grad_norm = self._optimizer_step()
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log(lr, grad_norm)
                bar.set_postfix(loss=f"{self.metrics['loss']:.4f}", lr=f"{lr:.2e}")
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self._save()
            for callback in callbacks:
                callback(self.step, self.metrics)
        bar.close()
        if self.info.is_main:
            plot_losses(self.metrics_path, self.out_dir / "losses.png")
        return self.metrics

    def _optimizer_step(self) -> tuple[float, torch.Tensor]:
        """``grad_accum_steps`` forward/backward passes (DDP all-reduce on the last only), clip, update."""
        cfg, accum = self.cfg, self.cfg.grad_accum_steps
        lr = self.optimizer.param_groups[0]["lr"]  # the lr this update uses
        self.optimizer.zero_grad(set_to_none=True)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        for micro in range(accum):
            batch = self._next_batch()
            last = micro == accum - 1
            no_sync = self.wrapped.no_sync() if self.info.distributed and not last else contextlib.nullcontext()
            with no_sync:
                with _autocast(self.device, cfg.precision):
                    loss, losses = _read_output(self.wrapped(**batch))
                self.scaler.scale(loss / accum).backward()
            finite &= torch.isfinite(loss.detach())
            for key, value in {"loss": loss, **losses}.items():
                self.window.add(key, value.detach().float() / accum)
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.window.mark(finite, self.step)
        self.window.steps += 1
        self.window.samples += cfg.batch_size * self.info.world_size * accum
        return lr, grad_norm

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch that holds samples on every rank. A batch whose every image was unreadable
        (the collator dropped them all) is skipped, by all ranks together when distributed, so that every
        rank stays at the one data position a checkpoint stores (exact resume); one small all-reduce per
        micro-batch buys that agreement."""
        for _ in range(MAX_EMPTY_BATCHES):
            batch = self.stream.next()
            rows = batch_rows(batch)
            if min_over_ranks(rows, self.device) > 0:  # this rank's own count when not distributed
                return to_device(batch, self.device)
            logger.warning(
                "skipping a micro-batch with no readable sample%s at step %d",
                "" if rows == 0 else " on another rank",
                self.step + 1,
            )
        skip_log = getattr(self.dataset, "skip_log", None)
        examples = getattr(skip_log, "examples", None)
        example = f" (first: {examples[0].path}: {examples[0].reason})" if examples else ""
        raise TrainDataError(
            f"{MAX_EMPTY_BATCHES} micro-batches in a row held no readable sample{example}: "
            "check that the training images exist and can be decoded"
        )

    def _diverged(self, what: str) -> TrainingDivergedError:
        """One line: the step, the last good checkpoint, and the knobs that help."""
        cfg = self.cfg
        first = int(self.window.first_bad) if self.window.first_bad is not None else 0  # first non-finite loss
        hints = [f"lower lr (now {cfg.lr:g})", f"lengthen warmup_steps (now {cfg.warmup_steps})"]
        if cfg.grad_clip is None:
            hints.append("set grad_clip (e.g. 1.0)")
        if self.device.type == "cuda" and cfg.precision != "fp32":
            hints.append("use precision=" + ("bf16 or fp32" if cfg.precision == "fp16" else "fp32"))
        kept = f"kept {self.last_saved}" if self.last_saved is not None else "no checkpoint was written yet"
        where = f" (first non-finite loss at step {first})" if first else ""
        return TrainingDivergedError(
            f"training diverged: {what}{where}; {kept}; {', '.join(hints[:-1])} or {hints[-1]}"
        )

    def _log(self, lr: float, grad_norm: torch.Tensor) -> None:
        """Window means, averaged over ranks (a collective: every rank logs at the same steps)."""
        window, now = self.window, time.perf_counter()
        keys = sorted(window.sums)  # the same order on every rank: the model returns the same loss names
        means = all_reduce_mean(torch.stack([window.sums[k] for k in keys])) / window.steps
        metrics = {
            "step": self.step,
            **dict(zip(keys, means.tolist(), strict=True)),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "samples_per_s": window.samples / max(now - window.started, 1e-9),
            "elapsed_s": self.elapsed_before + now - self.started,
        }
        if not math.isfinite(metrics["loss"]):
            raise self._diverged(
                f"the mean loss of steps {self.step - window.steps + 1}-{self.step} is {metrics['loss']}"
            )
        self.metrics, self.window = metrics, _Window()
        if self.info.is_main:
            append_metrics(self.metrics_path, self.metrics)

    def _save(self) -> None:
        """Gather every rank's RNG state (a collective), then rank 0 writes the checkpoint atomically.
        Nothing is saved after a non-finite loss (on any rank: one small all-reduce) or with weights that are
        no longer finite: the last good checkpoint stays the newest."""
        bad_loss = self.window.first_bad is not None and bool(all_reduce_mean((self.window.first_bad > 0).float()) > 0)
        if bad_loss or not all(bool(torch.isfinite(p).all()) for p in self.trainable):  # weights: equal on all ranks
            raise self._diverged(f"not saving step {self.step}: the loss or the weights are NaN/inf")
        rng_states = all_gather_objects(capture_rng_state(self.generators, self.device))
        path = checkpoint_path(self.out_dir, self.step)
        if self.info.is_main:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "step": self.step,
                    "model": trainable_state_dict(self.model),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "data": self.stream.position(),
                    "rng": rng_states,
                    "world_size": self.info.world_size,
                    "elapsed_s": self.elapsed_before + time.perf_counter() - self.started,
                    "config": self.cfg.to_dict(),
                },
                path,
                self.cfg.keep_last,
            )
        self.last_saved = path
        barrier()
