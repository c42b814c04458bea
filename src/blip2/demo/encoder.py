"""The demo's frozen image encoder: a small CNN (`blip2.vision.SmallCNN`) pretrained in its own stage, supervised
by the scene descriptions of training-split scenes only, then frozen; and the linear probe that measures it.

No pretrained vision weights install offline, and BLIP-2's premise is a *competent* frozen image encoder, so
the demo makes one. Every step renders fresh training-split scenes (`blip2.data.scenes.make_example`, split
"train": never a held-out colour-shape pair), their grey background redrawn from a wider range (the
photometric augmentation any pretrained encoder has seen), and a linear head on the flattened token features
predicts, for each of the five named grid cells, the colour, shape and size of the object there or "empty".
After training the head is dropped and the CNN frozen.

Its quality is measured alone, before BLIP-2 touches it (`linear_probe`): a fresh linear classifier on the
frozen features of the training images, scored per object on another split.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from blip2.data.scenes import COLORS, POSITIONS, SHAPES, SIZES, Scene, make_example, render

# Per named cell: class 0 = empty, then the attribute values in their module order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}


def _field(obj: Any, name: str) -> Any:
    """An attribute of a `SceneObject` or a key of its dict (as in a split's captions.jsonl)."""
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def _classes(obj: Any) -> list[int]:
    """The object's (color, shape, size) classes: 1 + the value's index in `ATTRIBUTES` (0 means empty)."""
    return [values.index(_field(obj, name)) + 1 for name, values in ATTRIBUTES.items()]


def cell_labels(objects: Sequence[Any]) -> torch.Tensor:
    """(len(POSITIONS), 3) long: per named cell, the (color, shape, size) class of its object, 0 when empty.

    ``objects`` are `SceneObject`s or their dicts (as in a split's captions.jsonl)."""
    labels = torch.zeros(len(POSITIONS), len(ATTRIBUTES), dtype=torch.long)
    for obj in objects:
        labels[POSITIONS.index(_field(obj, "position"))] = torch.tensor(_classes(obj))
    return labels


def token_labels(objects: Sequence[Any], grid: int, image_size: int) -> torch.Tensor:
    """(grid * grid, 3) long, row-major: per token cell of a ``grid`` x ``grid`` split of the image, the
    (color, shape, size) class of the object whose centre lies in it, 0 when none does. With ``grid`` 3 the cells
    are the scenes' position cells (corner tokens always empty)."""
    labels = torch.zeros(grid * grid, len(ATTRIBUTES), dtype=torch.long)
    for obj in objects:
        x0, y0, x1, y1 = _field(obj, "bbox")
        col = min(int((x0 + x1) / 2 * grid / image_size), grid - 1)
        row = min(int((y0 + y1) / 2 * grid / image_size), grid - 1)
        labels[row * grid + col] = torch.tensor(_classes(obj))
    return labels


class TokenHead(nn.Module):
    """One linear head shared by every token: (B, P, D) -> per token and attribute logits. Trained with it, a
    token's features name the object centred in its cell in the same code wherever the cell is, which is what
    the Q-Former's cross-attention (one key/value projection for all tokens) can read."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.sizes = [1 + len(v) for v in ATTRIBUTES.values()]
        self.linear = nn.Linear(in_features, sum(self.sizes))

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return list(self.linear(tokens).split(self.sizes, dim=-1))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over tokens and attributes; ``labels`` (B, P, 3)."""
        parts = [F.cross_entropy(lg.flatten(0, 1), labels[..., a].flatten()) for a, lg in enumerate(self(tokens))]
        return torch.stack(parts).mean()


class CellHead(nn.Module):
    """Flattened tokens (B, P * D) -> per cell and attribute logits, [(B, cells, 1 + n_values)] per attribute."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.sizes = [1 + len(v) for v in ATTRIBUTES.values()]
        self.linear = nn.Linear(in_features, len(POSITIONS) * sum(self.sizes))

    def forward(self, flat: torch.Tensor) -> list[torch.Tensor]:
        logits = self.linear(flat).view(flat.shape[0], len(POSITIONS), sum(self.sizes))
        return list(logits.split(self.sizes, dim=-1))

    def loss(self, flat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over cells and attributes; ``labels`` (B, cells, 3)."""
        parts = [F.cross_entropy(lg.flatten(0, 1), labels[..., a].flatten()) for a, lg in enumerate(self(flat))]
        return torch.stack(parts).mean()


def scene_batch(
    indices: Sequence[int],
    seed: int,
    render_size: int,
    preprocess: Callable[[list[Any]], torch.Tensor],
    backgrounds: tuple[int, int] | None = None,
    token_grid: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-split scenes ``indices`` rendered and preprocessed: pixels (B, 3, H, W), labels (B, cells, 3)
    (`cell_labels`), or with ``token_grid`` > 0 (B, token_grid**2, 3) (`token_labels`).

    ``backgrounds`` (lo, hi): redraw each scene's grey background level uniformly in [lo, hi] (seeded by the
    scene index), the photometric augmentation of the encoder's pretraining."""
    scenes: list[Scene] = [make_example("train", i, seed, render_size).scene for i in indices]
    if backgrounds is not None:
        lo, hi = backgrounds
        levels = [random.Random(f"background/{seed}/{i}").randint(lo, hi) for i in indices]
        scenes = [dataclasses.replace(s, background=(g, g, g)) for s, g in zip(scenes, levels, strict=True)]
    pixels = preprocess([render(scene) for scene in scenes])
    if token_grid:
        return pixels, torch.stack([token_labels(scene.objects, token_grid, render_size) for scene in scenes])
    return pixels, torch.stack([cell_labels(scene.objects) for scene in scenes])


def pretrain_encoder(
    encoder: nn.Module,
    preprocess: Callable[[list[Any]], torch.Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    render_size: int,
    backgrounds: tuple[int, int] | None = None,
    weight_decay: float = 0.01,
    objective: str = "cells",
) -> list[float]:
    """Train ``encoder`` in place on fresh training-split scenes (AdamW, one-cycle schedule); return the loss per
    step. Step ``t`` uses scenes ``t * batch_size ...`` of the split, so the run is a pure function of its
    arguments. The encoder is left frozen (eval mode, ``requires_grad=False``).

    ``objective``: "cells", a linear head on the flattened tokens names each position cell's object
    (`CellHead`); "tokens", one head shared by all tokens names the object centred in each token's cell
    (`TokenHead`, `token_labels`)."""
    if objective not in ("cells", "tokens"):
        raise ValueError(f"unknown encoder objective {objective!r}; expected 'cells' or 'tokens'")
    torch.manual_seed(seed)
    encoder.requires_grad_(True)
    encoder.train()
    with torch.no_grad():
        probe_tokens = encoder(scene_batch([0], seed, render_size, preprocess)[0])  # (1, P, D)
    n_tokens, grid = probe_tokens.shape[1], 0  # grid 0: the "cells" objective
    if objective == "tokens":
        grid = math.isqrt(n_tokens)
        if grid * grid != n_tokens:
            raise ValueError(f"the 'tokens' objective needs a square token grid, got {n_tokens} tokens")
    head: CellHead | TokenHead = TokenHead(probe_tokens.shape[2]) if grid else CellHead(probe_tokens[0].numel())
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    losses = []
    for step in tqdm(range(steps), desc="image encoder", leave=False):
        indices = range(step * batch_size, (step + 1) * batch_size)
        pixels, labels = scene_batch(indices, seed, render_size, preprocess, backgrounds, grid)
        tokens = encoder(pixels)  # (B, P, D)
        loss = head.loss(tokens if grid else tokens.flatten(1), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(round(float(loss.detach()), 4))
    encoder.eval()
    encoder.requires_grad_(False)
    return losses


def linear_probe(
    train_features: torch.Tensor,  # (N, P, D) frozen features of the probe's training images
    train_labels: torch.Tensor,  # (N, cells, 3)
    test_features: torch.Tensor,  # (M, P, D)
    test_labels: torch.Tensor,  # (M, cells, 3)
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> dict[str, float]:
    """A fresh linear classifier on the flattened frozen features (full-batch AdamW on standardised features),
    scored on the test images.

    Returns per-object accuracies: ``color``, ``shape``, ``size`` (the class predicted for the object's cell),
    ``position`` (of every (image, named cell), occupied vs empty decided right: each object is found in its cell
    and no object is seen where there is none), and ``object`` (all three attributes right)."""
    torch.manual_seed(seed)
    x = train_features.flatten(1)
    # Standardised per feature; the floor keeps a feature (nearly) constant in the probe's training images from
    # blowing up on a test image where it is not.
    mean, std = x.mean(0), x.std(0)
    std = std + 0.1 * std.mean() + 1e-6
    x = (x - mean) / std
    head = CellHead(x.shape[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(steps):
        loss = head.loss(x, train_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        preds = torch.stack([lg.argmax(-1) for lg in head((test_features.flatten(1) - mean) / std)], dim=-1)
    occupied = test_labels[..., 0] > 0  # (M, cells)
    right = preds == test_labels  # (M, cells, 3)
    out = {name: float(right[..., a][occupied].float().mean()) for a, name in enumerate(ATTRIBUTES)}
    out["position"] = float(((preds[..., 0] > 0) == occupied).float().mean())
    out["object"] = float(right.all(-1)[occupied].float().mean())
    return {k: round(v, 4) for k, v in out.items()}
