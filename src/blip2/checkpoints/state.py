"""State dicts: reading them safely, copying them into a model after checking every name and shape, and
writing files atomically.

Weights are only ever read with safetensors or ``torch.load(weights_only=True)``: a checkpoint cannot run code.
Every format module (`ours`, `hf`, `lavis`, `bert`) builds on this one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or written: the message names the file, the problem and the fix."""


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``: library errors (transformers, tokenizers) run to many lines."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def read_state_dict(path: Path) -> StateDict:
    """Weights from a safetensors file, a sharded safetensors index, or a torch file (weights_only).

    A torch file may hold the state dict itself or, as LAVIS writes it, ``{"model": state_dict, ...}``.
    """
    from safetensors.torch import load_file

    name = str(path)
    try:
        if name.endswith(".safetensors"):
            return load_file(name)
        if name.endswith(".index.json"):
            index = json.loads(path.read_text())
            state: StateDict = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(read_state_dict(path.parent / shard))
            return state
        obj = torch.load(name, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure is reported with the file name
        raise CheckpointError(f"checkpoint file '{path}' could not be read ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):  # LAVIS {"model": ...}
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint file '{path}' does not hold a state dict of tensors")
    return obj


# Parts a checkpoint may lack; they keep their initialisation (transformers' retrieval model has no ITG head,
# and no temperature).
OPTIONAL = ("qformer.lm_head.", "temp")


def load_into(model: nn.Module, state: StateDict, source: str, optional: tuple[str, ...] = OPTIONAL) -> list[str]:
    """Copy ``state`` into ``model`` after checking every name and shape. Returns the optional keys missing.

    Names starting with an entry of ``optional`` may be absent (they keep what the model holds). Nothing is
    copied unless everything matches, so a bad checkpoint leaves the model untouched.
    """
    own = model.state_dict()
    _check_layer_count(own, state, source)
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs config {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint '{source}' does not match its config: "
            + "; ".join(mismatched[:5])
            + (f" (and {len(mismatched) - 5} more)" if len(mismatched) > 5 else "")
        )
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"checkpoint '{source}' has weights the model does not: {unexpected[:5]}")
    missing = sorted(set(own) - set(state) - _tied_aliases(model, set(state)))
    missing_optional = [k for k in missing if k.startswith(optional)]
    required = [k for k in missing if not k.startswith(optional)]
    if required:
        raise CheckpointError(
            f"checkpoint '{source}' lacks weights: {required[:5]}"
            + (f" (and {len(required) - 5} more)" if len(required) > 5 else "")
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return missing_optional


def _tied_aliases(model: nn.Module, present: set[str]) -> set[str]:
    """Names whose tensor shares storage with a present name (tied embeddings are saved once)."""
    by_ptr: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    aliases: set[str] = set()
    for names in by_ptr.values():
        if len(names) > 1 and any(n in present for n in names):
            aliases.update(n for n in names if n not in present)
    return aliases


def _check_layer_count(own: StateDict, state: StateDict, source: str) -> None:
    def count(keys: Any, pattern: str) -> int:
        found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
        return max(found) + 1 if found else 0

    for pattern, what in (
        (r"qformer\.layers\.(\d+)\.", "Q-Former layers"),
        (r"vision_model\.encoder\.layers\.(\d+)\.", "vision encoder layers"),
    ):
        have, want = count(state, pattern), count(own, pattern)
        if have and want and have != want:
            raise CheckpointError(f"checkpoint '{source}' has {have} {what}, config says {want}")


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def check_writable_folder(folder: Path, what: str) -> None:
    """Fail early, in one line, when ``folder`` cannot be created or written (before any expensive work).

    Writes and removes a probe file: permission bits alone do not tell (root, read-only mounts, ACLs).
    """
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot write {what}: '{folder}' is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".blip2-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write {what} into '{folder}' ({exc.strerror or exc}): choose a writable folder"
        ) from exc


def _default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives: 0o666 minus the process umask (0o644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path`` in one step.

    On any failure the temporary file is removed, so nothing half-written is left, and an OSError or a
    writer's RuntimeError (torch reports a failed write so) becomes a one-line `CheckpointError`. The file
    gets the ordinary umask-derived mode: temporary-file writers (safetensors) create files as 0600, which
    would hide a shared model from the other users of a machine.
    """
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"could not write '{path}' ({type(exc).__name__}: {exc}); nothing was written") from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_file(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then move the result to ``path`` atomically (see `atomic_write`)."""
    with atomic_write(path) as tmp:
        write(tmp)
