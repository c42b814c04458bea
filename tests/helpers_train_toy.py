"""A tiny model and dataset for the training-loop tests, also runnable as a script (for subprocess tests).

    python tests/helpers_train_toy.py --out DIR [--steps N] [--batch-size B] [--accum A] [--save-every S]
        [--dropout P] [--augment] [--resume] [--kill-after-step M]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers_train_toy.py --out DIR ...

The model mimics the real contract: a frozen "encoder" (requires_grad False, eval) feeding a trainable head,
``forward(**batch)`` returning ``.loss`` plus named ``.losses``. On exit, rank 0 writes the full
``state_dict`` to ``DIR/final_state.pt``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

IN_DIM = 8


@dataclass
class ToyOutput:
    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


class ToyRegressor(nn.Module):
    def __init__(self, dropout: float = 0.0, hidden: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Linear(IN_DIM, IN_DIM)  # frozen, like the image encoder / LLM
        self.encoder.requires_grad_(False)
        self.fc1 = nn.Linear(IN_DIM, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 1)

    def train(self, mode: bool = True) -> ToyRegressor:
        super().train(mode)
        self.encoder.eval()  # frozen parts stay in eval mode, as the contract asks
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> ToyOutput:
        with torch.no_grad():
            features = self.encoder(x)  # (B, IN_DIM)
        pred = self.fc2(self.dropout(torch.relu(self.fc1(features)))).squeeze(-1)  # (B,)
        mse = (pred - y).pow(2).mean()
        return ToyOutput(loss=mse, losses={"loss_mse": mse, "loss_l1": (pred - y).abs().mean().detach()})


class ToyDataset(Dataset):
    """Fixed random regression data; ``augment`` adds noise drawn from ``self.generator`` per item."""

    def __init__(
        self,
        num_samples: int = 36,
        augment: bool = False,
        data_seed: int = 123,
        unreadable: frozenset[int] = frozenset(),
    ) -> None:
        self.unreadable = unreadable  # items that come back as None, like an image that cannot be decoded
        g = torch.Generator().manual_seed(data_seed)
        self.x = torch.randn(num_samples, IN_DIM, generator=g)
        self.y = self.x @ torch.randn(IN_DIM, generator=g) + 0.5
        self.augment = augment
        self.generator = torch.Generator().manual_seed(0)  # re-seeded by run_training

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if index in self.unreadable:
            return None
        x = self.x[index]
        if self.augment:
            x = x + 0.1 * torch.randn(IN_DIM, generator=self.generator)
        return {"x": x, "y": self.y[index], "id": index}


def collate(items: list[Mapping[str, Any] | None]) -> dict[str, Any]:
    items = [it for it in items if it is not None]  # dropped, as the real collator drops unreadable images
    if not items:
        return {"x": torch.zeros(0, IN_DIM), "y": torch.zeros(0), "image_ids": []}
    return {
        "x": torch.stack([it["x"] for it in items]),
        "y": torch.stack([it["y"] for it in items]),
        "image_ids": [it["id"] for it in items],  # a non-tensor entry: must be dropped before forward
    }


def build(dropout: float = 0.0, augment: bool = False, num_samples: int = 36) -> tuple[ToyRegressor, ToyDataset]:
    torch.manual_seed(0)  # identical initial weights in every process
    return ToyRegressor(dropout), ToyDataset(num_samples, augment)


def main(argv: list[str] | None = None) -> None:
    from blip2.train.config import TrainConfig
    from blip2.train.loop import run_training

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-after-step", type=int, default=0)
    parser.add_argument("--unreadable-every", type=int, default=0, help="every k-th item comes back as None")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # same kernels in every process; no oversubscription on small machines
    model, dataset = build(args.dropout, args.augment)
    if args.unreadable_every:
        dataset.unreadable = frozenset(range(0, len(dataset), args.unreadable_every))
    cfg = TrainConfig(
        output_dir=args.out,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum_steps=args.accum,
        lr=args.lr,
        min_lr=args.lr / 10,
        warmup_steps=2,
        save_every=args.save_every,
        log_every=1,
        num_workers=0,
        device="cpu",
        precision="fp32",
        resume=args.resume,
        seed=7,
    )

    def kill_switch(step: int, _metrics: Mapping[str, float]) -> None:
        if step == args.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a hard crash

    run_training(cfg, model, dataset, collate, rng_generators={"augment": dataset.generator}, callbacks=[kill_switch])
    if int(os.environ.get("RANK", 0)) == 0:
        torch.save(model.state_dict(), Path(args.out) / "final_state.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
