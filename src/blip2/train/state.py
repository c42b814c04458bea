"""Training state on disk and in memory: the output folder, atomic checkpoint files, picking the checkpoint to
resume from (verified, with fall-back to the newest valid one), and every RNG state a run draws from."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blip2.checkpoints import CheckpointError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_POINTER = "latest"
CHECKPOINT_FORMAT = 1
_REQUIRED_KEYS = ("step", "model", "optimizer", "scheduler", "scaler", "data", "rng", "elapsed_s")


class OutputDirError(OSError):
    """``output_dir`` cannot hold this run (a file in the way, not writable, or another run's checkpoints)."""


# ------------------------------------------------------------------------------------ output folder


def prepare_output_dir(output_dir: str | os.PathLike[str], resume: bool | str) -> Path:
    """Create ``output_dir`` and check it can be written, before any model is built.

    A fresh run (``resume=False``) refuses a folder that already holds checkpoints: it would mix two runs.
    """
    out = Path(output_dir)
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == out else f"lies inside the file {parent}"
                raise OutputDirError(f"output_dir {out} {where}, not a folder: choose another output_dir")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"output_dir {out} is not writable ({e.strerror or e}): choose a folder you can write to"
        ) from None
    if resume is False and any((out / CHECKPOINT_DIR).glob("step_*.pt")):
        raise OutputDirError(
            f"{out} already holds checkpoints of another run: pass resume=true to continue it, "
            "or choose a new output_dir"
        )
    return out


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
        raise CheckpointError(
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


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write to a temp file beside ``path``, fsync, rename over ``path``: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def checkpoint_path(output_dir: str | os.PathLike[str], step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def save_checkpoint(state: Mapping[str, Any], path: Path, keep_last: int = 0) -> None:
    """Atomically write ``state``, point ``latest`` at it, then prune to the newest ``keep_last`` files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(dict(state), f))
    atomic_write(path.parent / LATEST_POINTER, lambda f: f.write(path.name + "\n"), mode="w")
    if keep_last > 0:
        for old in sorted(path.parent.glob("step_*.pt"))[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a training checkpoint (``weights_only=True``: tensors and plain types only).

    Raises `CheckpointError` naming the file when it is truncated, corrupt or not a training checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"training checkpoint {path} is unreadable (truncated or corrupt: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a blip2 training checkpoint")
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"training checkpoint {path} is incomplete (no {', '.join(missing)})")
    return state


def _candidates(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, newest first: the one ``latest`` names, then by step."""
    found = sorted(directory.glob("step_*.pt"), reverse=True)
    pointer = directory / LATEST_POINTER
    if pointer.is_file():
        target = directory / pointer.read_text().strip()
        if target in found:
            found.remove(target)
            found.insert(0, target)
    return found


def resume_checkpoint(resume: bool | str, output_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``resume`` refers to, loaded and verified; None to start fresh.

    ``resume=True`` or a directory: the newest checkpoint that loads, with a warning naming each damaged
    newer one it passes over; a `CheckpointError` when there are checkpoints but none loads. A file named
    explicitly is used as it is (an error if it is damaged).
    """
    if resume is False or resume is None:
        return None
    if resume is True:
        directories = [Path(output_dir) / CHECKPOINT_DIR]
    else:
        path = Path(resume)
        if path.is_file():
            return path, load_checkpoint(path)
        directories = [path, path / CHECKPOINT_DIR] if path.is_dir() else []
        if not any(_candidates(d) for d in directories if d.is_dir()):
            raise CheckpointError(
                f"resume={resume!r}: no checkpoint there (expected a step_*.pt file or a directory holding one)"
            )
    for directory in directories:
        if not directory.is_dir() or not (candidates := _candidates(directory)):
            continue
        damaged: list[str] = []
        for candidate in candidates:
            try:
                state = load_checkpoint(candidate)
            except CheckpointError as e:
                logger.warning("%s; trying an older checkpoint", e)
                damaged.append(candidate.name)
                continue
            if damaged:
                logger.warning("resuming from %s: skipped the damaged %s", candidate.name, ", ".join(damaged))
            return candidate, state
        raise CheckpointError(
            f"no valid checkpoint to resume from in {directory} (all {len(damaged)} damaged: {', '.join(damaged)}); "
            "point resume= at a good checkpoint, or move them away and start fresh"
        )
    return None
