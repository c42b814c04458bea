"""The run's ``metrics.jsonl`` (one line per logged step) and its loss plot."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from blip2.train.state import atomic_write

logger = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (written by a run killed after its last checkpoint)."""
    if path.is_file():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept), mode="w")


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def plot_losses(metrics_jsonl: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path | None:
    """Plot the total and named losses (and the learning rate) against step. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping the loss plot (pip install matplotlib)")
        return None
    rows = read_metrics(Path(metrics_jsonl))
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
