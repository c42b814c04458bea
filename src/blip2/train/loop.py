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
``num_workers=0`` a run killed at any point and resumed ends bit-identical to an uninterrupted one. With
``num_workers > 0`` the data order is still exact, but augmentation runs in worker processes whose RNGs are
seeded per epoch, not checkpointed: a resumed epoch draws different augmentation unless the dataset derives
its randomness from the sample index and epoch (``set_epoch(epoch)`` is called when the dataset has it).
Multi-process runs assume ``output_dir`` is on a filesystem every rank can read.

Equivalence notes. Gradients are ``mean over micro-steps of (per-process mean loss)`` averaged over ranks by
DDP. That equals the mean over the global batch (``batch_size * world_size * grad_accum_steps``) only
because every process sees equally sized micro-batches, which the sampler guarantees (``drop_last``). A
model whose loss is a sum, or normalised by a data-dependent count (tokens), is only approximately
equivalent across different splits of the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import time
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from blip2.distributed import (
    DistInfo,
    ShardedBatchSampler,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    init_distributed,
    min_over_ranks,
    shutdown,
)

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
StepCallback = Callable[[int, Mapping[str, float]], None]

CHECKPOINT_DIR = "checkpoints"
LATEST_POINTER = "latest"
CHECKPOINT_FORMAT = 1
MAX_EMPTY_BATCHES = 100  # consecutive micro-batches with no readable sample before the run gives up


# --------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """One training run. Defaults follow the paper / LAVIS pre-training recipes where they exist.

    ``batch_size`` is per process and per micro-step: the global batch of one optimiser step is
    ``batch_size * world_size * grad_accum_steps``. ``precision`` applies on CUDA only; CPU runs are fp32.
    ``resume``: ``False`` (fresh), ``True`` (latest checkpoint in ``output_dir`` if any, else fresh), or a path
    to a checkpoint file or a directory holding one. ``model`` / ``data`` are free-form sections read by
    whoever builds the model and dataset (the CLI).
    """

    output_dir: str = "runs/blip2"
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0  # <= 0: no clipping (the norm is still logged)
    decay_embeddings: bool = False  # True: decay nn.Embedding weights and query_tokens, as LAVIS does
    # Parameter-name prefix -> lr multiplier (the longest matching prefix wins), e.g. a newly initialised
    # projection trained faster than a pretrained Q-Former: {"language_projection": 10.0}.
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    precision: Precision = "bf16"
    grad_checkpointing: bool = False
    save_every: int = 1000
    keep_last: int = 3  # checkpoints kept on disk; 0 keeps all
    log_every: int = 10
    seed: int = 42
    num_workers: int = 4
    shuffle: bool = True
    resume: bool | str = False
    device: str = "auto"  # "auto": cuda:<local rank> when available, else cpu
    find_unused_parameters: bool = False  # DDP: needed when some trainable params get no gradient
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0; got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.num_workers < 0 or self.keep_last < 0:
            raise ValueError("warmup_steps, num_workers and keep_last must be >= 0")
        if not isinstance(self.lr_multipliers, dict):
            raise ValueError(f"lr_multipliers must map parameter-name prefixes to numbers, got {self.lr_multipliers!r}")
        for prefix, mult in self.lr_multipliers.items():
            if not isinstance(mult, int | float) or isinstance(mult, bool) or mult <= 0:
                raise ValueError(f"lr_multipliers[{prefix!r}] must be a positive number, got {mult!r}")
        self.lr_multipliers = {str(k): float(v) for k, v in self.lr_multipliers.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe values (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


_FREE_SECTIONS = ("model", "data")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check/convert one YAML value against a field's type (YAML 1.1 reads ``1e-4`` as a string)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{name} must be one of {typing.get_args(hint)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):  # resume: bool | str
        if isinstance(value, bool | str):
            return value
        raise ValueError(f"{name} must be true/false or a path, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(typing.get_args(hint)):
            raise ValueError(f"{name} must be a list of {len(typing.get_args(hint))} numbers, got {value!r}")
        return tuple(_coerce(name, v, t) for v, t in zip(value, typing.get_args(hint), strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def _field_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def config_from_dict(raw: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a TrainConfig from a plain mapping; unknown keys are an error that names them."""
    hints = _field_hints()
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise KeyError(
            f"unknown training option {unknown[0]!r} in {source}; known options: {', '.join(sorted(hints))}"
            + ("" if len(unknown) == 1 else f" (also unknown: {', '.join(unknown[1:])})")
        )
    return TrainConfig(**{k: _coerce(k, v, hints[k]) for k, v in raw.items()})


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``key=value`` / ``section.key=value`` strings (values parsed with ``yaml.safe_load``).

    Top-level keys must be TrainConfig fields. Keys under ``model.`` / ``data.`` are free-form and may
    nest (``model.qformer.num_hidden_layers=2``), creating sub-mappings as needed.
    """
    values = cfg.to_dict()
    hints = _field_hints()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        value = yaml.safe_load(text) if text.strip() else None
        head, *rest = key.split(".")
        if head not in hints:
            raise KeyError(
                f"unknown training option {head!r} in override {item!r}; known options: {', '.join(sorted(hints))}"
            )
        if not rest:
            values[head] = value
            continue
        if head not in _FREE_SECTIONS:
            raise KeyError(f"override {item!r}: {head!r} has no sub-keys (only {_FREE_SECTIONS} do)")
        node = values[head]
        for part in rest[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is {child!r}, not a mapping")
            node = child
        node[rest[-1]] = value
    return config_from_dict(values, source="overrides")


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML run recipe (TrainConfig fields at the top level, plus ``model:`` / ``data:``)."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of training options at the top level")
    return apply_overrides(config_from_dict(raw, source=str(path)), overrides)


# ------------------------------------------------------------------------------- optimiser, schedule


def _is_no_decay(name: str, param: nn.Parameter, embedding_ids: set[int], decay_embeddings: bool) -> bool:
    """Biases, norm weights and other 1-D params (temperature) are never decayed; embeddings optionally.

    LAVIS's rule is ``ndim < 2 or "bias" in name or "ln" in name or "bn" in name``; we match name
    components rather than substrings, and by default also exempt ``nn.Embedding`` weights and the learned
    ``query_tokens`` (``decay_embeddings=True`` decays those, as LAVIS does).
    """
    if param.ndim < 2:
        return True
    parts = name.split(".")
    if "bias" in parts or any("norm" in p.lower() or re.fullmatch(r"(ln|bn)(_.*|\d*)", p) for p in parts):
        return True
    return not decay_embeddings and (id(param) in embedding_ids or parts[-1] == "query_tokens")


def split_decay_params(model: nn.Module, decay_embeddings: bool = False) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay, and those that do not."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            bucket = no_decay if _is_no_decay(name, param, embedding_ids, decay_embeddings) else decay
            bucket.append(name)
    return decay, no_decay


def _under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` is ``prefix`` or inside the module path ``prefix``."""
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def lr_multiplier(name: str, multipliers: Mapping[str, float]) -> float:
    """The lr multiplier of parameter ``name``: that of the longest matching prefix, else 1."""
    matches = [prefix for prefix in multipliers if _under(name, prefix)]
    return multipliers[max(matches, key=len)] if matches else 1.0


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only, grouped by weight decay (decay / no decay) and by lr
    multiplier (`TrainConfig.lr_multipliers`; the schedule scales every group alike)."""
    decay, no_decay = split_decay_params(model, cfg.decay_embeddings)
    if not decay and not no_decay:
        raise ValueError("model has no parameters with requires_grad=True: nothing to train")
    params = dict(model.named_parameters())
    unused = [prefix for prefix in cfg.lr_multipliers if not any(_under(n, prefix) for n in decay + no_decay)]
    if unused:
        raise ValueError(f"lr_multipliers: no trainable parameter name starts with {unused[0]!r}")
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for names, weight_decay in ((decay, cfg.weight_decay), (no_decay, 0.0)):
        for n in names:
            groups.setdefault((lr_multiplier(n, cfg.lr_multipliers), weight_decay), []).append(params[n])
    # the unscaled groups first: the logged lr is param_groups[0]'s
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] != 1.0, item[0][0], -item[0][1]))
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": wd, "lr": cfg.lr * mult} for (mult, wd), ps in ordered],
        lr=cfg.lr,
        betas=cfg.betas,
    )


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate of the update that follows ``step`` completed updates (``step`` = 0 is the first).

    Linear warm-up ``lr * (step + 1) / warmup_steps`` (so the first update is not wasted at 0), then a
    half-cosine from ``lr`` at ``step = warmup_steps`` to ``min_lr`` at ``step = max_steps``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """``lr_at`` as a LambdaLR (every group has base lr ``cfg.lr``)."""

    def factor(step: int) -> float:
        return (
            lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps) / cfg.lr
        )

    return LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    """Seed python, numpy (legacy global) and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(
    generators: Mapping[str, torch.Generator], device: torch.device = torch.device("cpu")
) -> dict[str, Any]:
    """Every RNG state this process uses, as tensors and plain types (loadable with weights_only=True).

    CUDA: only ``device``'s generator (touching every GPU would create a context on each from every rank).
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator], device: torch.device = torch.device("cpu")
) -> None:
    if set(state["generators"]) != set(generators):
        raise ValueError(
            f"checkpoint has RNG generators {sorted(state['generators'])}, this run passes "
            f"{sorted(generators)}; pass the same rng_generators names when resuming"
        )
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        if state["cuda"] is None:
            logger.warning("checkpoint was written by a CPU run: CUDA RNG not restored")
        else:
            torch.cuda.set_rng_state(state["cuda"], device)
    for name, g in generators.items():
        g.set_state(state["generators"][name])


# ------------------------------------------------------------------------------------- checkpoints


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and all persistent buffers (frozen weights are the model builder's job)."""
    keep = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return {k: v.detach() for k, v in model.state_dict().items() if k in keep}


def load_trainable_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    expected = trainable_state_dict(model).keys()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "was it written for a different model config or different frozen/trainable split?"
        )
    model.load_state_dict(dict(state), strict=False)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform / filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write to a temp file beside ``path``, fsync, rename over ``path``: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_path(output_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def save_checkpoint(state: Mapping[str, Any], path: Path, keep_last: int = 0) -> None:
    """Atomically write ``state``, point ``latest`` at it, then prune to the newest ``keep_last`` files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: torch.save(dict(state), f))
    _atomic_write(path.parent / LATEST_POINTER, lambda f: f.write(path.name + "\n"), mode="w")
    if keep_last > 0:
        for old in sorted(path.parent.glob("step_*.pt"))[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)


def _latest_in(directory: Path) -> Path | None:
    pointer = directory / LATEST_POINTER
    if pointer.is_file():
        target = directory / pointer.read_text().strip()
        if target.is_file():
            return target
    found = sorted(directory.glob("step_*.pt"))
    return found[-1] if found else None


def find_checkpoint(resume: bool | str, output_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint ``resume`` refers to: None to start fresh."""
    if resume is False or resume is None:
        return None
    if resume is True:
        directory = Path(output_dir) / CHECKPOINT_DIR
        return _latest_in(directory) if directory.is_dir() else None
    path = Path(resume)
    if path.is_file():
        return path
    if path.is_dir():
        for directory in (path, path / CHECKPOINT_DIR):
            if directory.is_dir() and (found := _latest_in(directory)):
                return found
    raise FileNotFoundError(
        f"resume={resume!r}: no checkpoint file there (expected a step_*.pt file or a directory holding one)"
    )


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True`` (tensors and plain types only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a blip2 training checkpoint (format {state.get('format')!r})")
    return state


# ------------------------------------------------------------------------------------------- data


class _BatchStream:
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
            len(self.dataset),
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


def _batch_rows(batch: Any) -> int:
    """Samples in a collated batch: the leading size of its first tensor (0 when the collator dropped all)."""
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    return 1  # no tensor to tell by: let forward() see it


def _to_device(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"collate_fn must return a dict of tensors, got {type(batch).__name__}")
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _read_output(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    get = out.get if isinstance(out, Mapping) else lambda k, d=None: getattr(out, k, d)
    loss, losses = get("loss"), get("losses") or {}
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise TypeError(f"model forward must return an object with a scalar tensor `.loss`, got {loss!r}")
    return loss, {k: v for k, v in losses.items() if k != "loss"}


# ------------------------------------------------------------------------------------------ metrics


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (written by a run killed after its last checkpoint)."""
    if path.is_file():
        kept = [r for r in _read_metrics(path) if r.get("step", 0) <= step]
        _atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept), mode="w")


def plot_losses(metrics_jsonl: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path | None:
    """Plot the total and named losses (and the learning rate) against step. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the loss plot (pip install matplotlib)")
        return None
    rows = _read_metrics(Path(metrics_jsonl))
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    loss_keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss_")})
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for key in loss_keys:
        ax_loss.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------ the loop


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
    info = init_distributed(cfg.device)
    try:
        loop = _Loop(cfg, model, train_dataset, collate_fn, info, dict(rng_generators or {}))
        result = loop.run(callbacks)
    except BaseException:
        shutdown(info, clean=False)
        raise
    shutdown(info)
    return result


@dataclass
class _Window:
    """Loss sums since the last log line (device tensors: no host sync per step)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, key: str, value: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value


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
        self.out_dir = Path(cfg.output_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.device = device = info.device
        if device.type != "cuda" and cfg.precision != "fp32":
            logger.info("precision=%s applies on CUDA only; training on %s in fp32", cfg.precision, device)
        if device.type == "cuda" and cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise RuntimeError("this GPU does not support bf16; set precision=fp16 (or fp32)")

        model.to(device)
        if cfg.grad_checkpointing:
            enable = getattr(model, "gradient_checkpointing_enable", None)
            if enable is None:
                logger.warning(
                    "grad_checkpointing=true but %s has no gradient_checkpointing_enable()", type(model).__name__
                )
            else:
                enable()
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.precision == "fp16")
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]

        self.step, self.elapsed_before = 0, 0.0
        data_pos, self._rng_state = self._restore(isinstance(dataset, IterableDataset))
        self.wrapped: nn.Module = model
        if info.distributed:
            self.wrapped = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        model.train()
        self.stream = _BatchStream(dataset, collate_fn, cfg, info, **data_pos)
        rows = _read_metrics(self.metrics_path) if info.is_main else []
        self.metrics: dict[str, float] = rows[-1] if rows else {}
        self.window = _Window()
        self.started = time.perf_counter()

    def _restore(self, iterable_data: bool) -> tuple[dict[str, int], dict[str, Any] | None]:
        """Load the checkpoint ``cfg.resume`` names, or seed a fresh run. Returns the data position and
        this rank's saved RNG state, which ``run()`` applies last, so that nothing in between (DDP set-up,
        DataLoader creation) can draw from the restored generators."""
        cfg, info = self.cfg, self.info
        ckpt_path = find_checkpoint(cfg.resume, self.out_dir)
        if ckpt_path is None and any((self.out_dir / CHECKPOINT_DIR).glob("step_*.pt")):
            raise FileExistsError(
                f"{self.out_dir} already holds checkpoints of another run: pass resume=true to "
                "continue it, or choose a new output_dir"
            )
        state = load_checkpoint(ckpt_path) if ckpt_path is not None else None
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            _truncate_metrics(self.metrics_path, 0 if state is None else state["step"])
        if state is None:
            seed_everything(_derived_seed(cfg.seed, info.rank, 0))
            for i, g in enumerate(self.generators.values()):
                g.manual_seed(_derived_seed(cfg.seed, info.rank, 1 + i))
            return {"epoch": 0, "samples_in_epoch": 0}, None

        load_trainable_state_dict(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.elapsed_before = state["step"], state["elapsed_s"]
        if info.is_main:
            logger.info("resumed from %s at step %d", ckpt_path, self.step)
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
        for micro in range(accum):
            batch = self._next_batch()
            last = micro == accum - 1
            no_sync = self.wrapped.no_sync() if self.info.distributed and not last else contextlib.nullcontext()
            with no_sync:
                with _autocast(self.device, cfg.precision):
                    loss, losses = _read_output(self.wrapped(**batch))
                self.scaler.scale(loss / accum).backward()
            for key, value in {"loss": loss, **losses}.items():
                self.window.add(key, value.detach().float() / accum)
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
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
            rows = _batch_rows(batch)
            if min_over_ranks(rows, self.device) > 0:  # this rank's own count when not distributed
                return _to_device(batch, self.device)
            logger.warning(
                "skipping a micro-batch with no readable sample%s at step %d",
                "" if rows == 0 else " on another rank",
                self.step + 1,
            )
        raise RuntimeError(
            f"{MAX_EMPTY_BATCHES} micro-batches in a row held no readable sample: check that "
            "the training images can be decoded"
        )

    def _log(self, lr: float, grad_norm: torch.Tensor) -> None:
        """Window means, averaged over ranks (a collective: every rank logs at the same steps)."""
        window, now = self.window, time.perf_counter()
        keys = sorted(window.sums)  # the same order on every rank: the model returns the same loss names
        means = all_reduce_mean(torch.stack([window.sums[k] for k in keys])) / window.steps
        self.metrics = {
            "step": self.step,
            **dict(zip(keys, means.tolist(), strict=True)),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "samples_per_s": window.samples / max(now - window.started, 1e-9),
            "elapsed_s": self.elapsed_before + now - self.started,
        }
        self.window = _Window()
        if not math.isfinite(self.metrics["loss"]):
            raise FloatingPointError(
                f"loss is {self.metrics['loss']} at step {self.step}; lower lr or use "
                f"precision=bf16/fp32 (metrics so far in {self.metrics_path})"
            )
        if self.info.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(self.metrics) + "\n")

    def _save(self) -> None:
        """Gather every rank's RNG state (a collective), then rank 0 writes the checkpoint atomically."""
        rng_states = all_gather_objects(capture_rng_state(self.generators, self.device))
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
                checkpoint_path(self.out_dir, self.step),
                self.cfg.keep_last,
            )
        barrier()
