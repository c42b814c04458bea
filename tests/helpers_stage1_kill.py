"""Subprocess script for the kill-and-resume test: tiny stage-1 BLIP-2 on synthetic scenes.

usage: python helpers_stage1_kill.py OUT_DIR MAX_STEPS [KILL_AFTER_STEP]
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from blip2.testing import make_tiny_model
from blip2.train.config import TrainConfig
from blip2.train.loop import run_training
from blip2.train.recipes import build_collate, build_dataset


def main() -> None:
    out, max_steps = Path(sys.argv[1]), int(sys.argv[2])
    kill_after = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    # default threads, as `blip2 train` runs: the claim under test is equality without pinning them
    model = make_tiny_model(None, llm=None, seed=0)
    data = {"kind": "scenes", "n": 24, "seed": 0, "max_length": 16, "augment": True, "hflip": False}
    cfg = TrainConfig(
        output_dir=str(out),
        max_steps=max_steps,
        batch_size=4,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=2,
        save_every=2,
        log_every=1,
        num_workers=0,
        precision="fp32",
        device="cpu",
        seed=0,
        resume=True,
        model={"stage": 1},
        data=data,
    )
    dataset, generators = build_dataset(data, model, out)
    collate = build_collate(data, model)

    def maybe_kill(step: int, _metrics: object) -> None:
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    run_training(cfg, model, dataset, collate, rng_generators=generators, callbacks=[maybe_kill])
    torch.save({k: v for k, v in model.state_dict().items()}, out / "final.pt")


if __name__ == "__main__":
    main()
