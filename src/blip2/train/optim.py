"""Optimiser and learning-rate schedule: AdamW over the trainable parameters, grouped by weight decay and lr
multiplier, and the two schedules (``cosine_per_step``, LAVIS's ``lavis_epoch_cosine``)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from blip2.train.config import LrSchedule, TrainConfig, TrainConfigError, WeightDecayRule


def _is_no_decay(name: str, param: nn.Parameter, embedding_ids: set[int], rule: WeightDecayRule) -> bool:
    """Whether parameter ``name`` is exempt from weight decay under ``rule``.

    ``lavis`` is the authors' rule (blip2.py ``get_optimizer_params``): exempt exactly the 1-d parameters and
    names ending in ``.bias``. So LayerNorm weights are exempt, but the 0-d temperature ``temp``, embedding
    tables and ``query_tokens`` are decayed. ``no_decay_norm_bias`` (this project's default) also exempts
    every parameter of fewer than 2 dimensions (``temp``), any ``norm`` / ``ln`` / ``bn`` module, embedding
    tables and ``query_tokens``.
    """
    if rule == "lavis":
        return param.ndim == 1 or name.endswith(".bias")
    if param.ndim < 2:
        return True
    parts = name.split(".")
    if "bias" in parts or any("norm" in p.lower() or re.fullmatch(r"(ln|bn)(_.*|\d*)", p) for p in parts):
        return True
    return id(param) in embedding_ids or parts[-1] == "query_tokens"


def split_decay_params(model: nn.Module, rule: WeightDecayRule = "no_decay_norm_bias") -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay, and those that do not."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            bucket = no_decay if _is_no_decay(name, param, embedding_ids, rule) else decay
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
    decay, no_decay = split_decay_params(model, cfg.weight_decay_rule)
    if not decay and not no_decay:
        raise ValueError("model has no parameters with requires_grad=True: nothing to train")
    params = dict(model.named_parameters())
    unused = [prefix for prefix in cfg.lr_multipliers if not any(_under(n, prefix) for n in decay + no_decay)]
    if unused:
        raise TrainConfigError(f"lr_multipliers: no trainable parameter name starts with {unused[0]!r}")
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


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    max_steps: int,
    warmup_start_lr: float = 0.0,
    schedule: LrSchedule = "cosine_per_step",
    steps_per_epoch: int = 0,
) -> float:
    """Learning rate of the update that follows ``step`` completed updates (``step`` = 0 is the first).

    ``cosine_per_step``: linear warm-up ``start + (lr - start) * (step + 1) / warmup_steps`` (so with
    ``start = 0`` the first update is not wasted at 0), then a half-cosine from ``lr`` at ``step =
    warmup_steps`` to ``min_lr`` at ``step = max_steps``.

    ``lavis_epoch_cosine`` (LAVIS ``LinearWarmupCosineLRScheduler`` with ``warmup_lr_schedule`` /
    ``cosine_lr_schedule``, optims.py): in epoch 0, ``min(lr, start + (lr - start) * step / warmup_steps)``;
    in epoch ``e >= 1``, ``min_lr + (lr - min_lr) * (1 + cos(pi * e / max_epochs)) / 2`` for the whole epoch,
    where ``max_epochs = ceil(max_steps / steps_per_epoch)``. (LAVIS counts its warm-up in micro-steps; here
    it counts optimiser steps, the same thing without gradient accumulation.)
    """
    if schedule == "lavis_epoch_cosine":
        if steps_per_epoch < 1:
            raise ValueError("lavis_epoch_cosine needs steps_per_epoch >= 1")
        epoch = step // steps_per_epoch
        if epoch == 0:
            return min(lr, warmup_start_lr + (lr - warmup_start_lr) * step / max(warmup_steps, 1))
        max_epochs = math.ceil(max_steps / steps_per_epoch)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epochs))
    if step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int | None = None) -> LambdaLR:
    """``lr_at`` as a LambdaLR (every group's base lr is ``cfg.lr`` times its multiplier).

    ``steps_per_epoch`` (optimiser steps in one pass over the data) is needed by ``lavis_epoch_cosine``
    only; ``cfg.steps_per_epoch`` takes precedence over it.
    """
    per_epoch = cfg.steps_per_epoch or steps_per_epoch or 0
    if cfg.lr_schedule == "lavis_epoch_cosine" and per_epoch < 1:
        raise TrainConfigError(
            "lr_schedule=lavis_epoch_cosine needs the epoch length: set steps_per_epoch (streamed data has no length)"
        )

    def factor(step: int) -> float:
        return (
            lr_at(
                step,
                lr=cfg.lr,
                min_lr=cfg.min_lr,
                warmup_steps=cfg.warmup_steps,
                max_steps=cfg.max_steps,
                warmup_start_lr=cfg.warmup_start_lr,
                schedule=cfg.lr_schedule,
                steps_per_epoch=per_epoch,
            )
            / cfg.lr
        )

    return LambdaLR(optimizer, factor)
