"""Loading any supported checkpoint into a model, and converting between formats.

Sources: a directory in this project's format (`blip2.checkpoints.ours`), a transformers BLIP-2 directory
(`blip2.checkpoints.hf`), a hub id (downloaded, then as a directory), or a LAVIS weights file
(`blip2.checkpoints.lavis`, with a config, since LAVIS files carry none).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from blip2.checkpoints.hf import config_from_hf, hf_to_ours
from blip2.checkpoints.lavis import lavis_llm_prefix, load_lavis, looks_lavis, ours_to_lavis
from blip2.checkpoints.ours import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    config_from_dict,
    load_tokenizer,
    read_config,
    read_config_file,
    weights_file,
)
from blip2.checkpoints.state import CheckpointError, check_writable_folder, load_into, read_state_dict, write_file
from blip2.config import Blip2Config

FORMATS = ("blip2", "lavis")


def resolve(path_or_id: str | os.PathLike[str]) -> Path:
    """A local directory/file, or a hub id downloaded with huggingface_hub (needs internet)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(
                f"'{text}' is not a local path and could not be downloaded from the Hugging Face hub ({exc})"
            ) from exc
    raise CheckpointError(f"checkpoint '{text}' does not exist")


def load_model(
    cls: type,
    path_or_id: str | os.PathLike[str],
    config: Blip2Config | None = None,
    map_location: str | torch.device = "cpu",
    vision_weights: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Build ``cls`` (Blip2 or Blip2QFormer) and load weights from any supported format.

    - a directory written by ``save_pretrained`` (ours) or by transformers (``model_type: blip-2``);
    - a hub id (downloaded, then as above);
    - a LAVIS checkpoint file (``.pth`` / ``.safetensors``) together with ``config=`` (LAVIS files carry no
      config; ``blip2.config.from_name`` has the official architectures). The official files lack the frozen
      parts: ``vision_weights`` names LAVIS's ``eva_vit_g.pth``, and the LLM comes from ``config.llm.model_id``
      (see `blip2.checkpoints.lavis.load_lavis`).
    """
    path = resolve(path_or_id)
    source = str(path_or_id)
    if path.is_file():
        if config is None:
            raise CheckpointError(f"'{source}' is a bare weights file: pass config= (e.g. from_name(...))")
        state = read_state_dict(path)
        if looks_lavis(state):
            model, llm_from_id = load_lavis(cls, state, config, source, vision_weights=vision_weights, **kwargs)
            if llm_from_id:
                model.tokenizer = load_tokenizer(None, model)
        else:
            model = cls(config, **kwargs)
            load_into(model, state, source)
        return model.to(map_location)
    raw = read_config(path)
    if raw.get("format") == "blip2":
        config = config or config_from_dict(raw, path / CONFIG_NAME)
        state = read_state_dict(weights_file(path))
    elif raw.get("model_type") == "blip-2":
        config = config or config_from_hf(raw)
        state = hf_to_ours(read_state_dict(weights_file(path)))
    else:
        raise CheckpointError(
            f"'{path / CONFIG_NAME}' is neither a blip2 config nor a transformers BLIP-2 config "
            f"(model_type={raw.get('model_type')!r})"
        )
    model = cls(config, **kwargs)
    if cls.__name__ == "Blip2QFormer" and any(k.startswith("language_") for k in state):
        state = {k: v for k, v in state.items() if not k.startswith("language_")}  # stage-2 ckpt's Q-Former
    load_into(model, state, source)
    model.tokenizer = load_tokenizer(path, model)
    return model.to(map_location)


def load_any(path_or_id: str | os.PathLike[str], config: Blip2Config | None = None, **kwargs: Any) -> Any:
    """`Blip2` when the checkpoint has a language model, `Blip2QFormer` otherwise."""
    from blip2.model import Blip2, Blip2QFormer

    path = resolve(path_or_id)
    has_llm: bool
    if config is not None:
        has_llm = config.llm is not None
    elif path.is_dir():
        raw = read_config(path)
        if raw.get("format") == "blip2":
            has_llm = bool(raw.get("llm"))
        else:
            has_llm = "Blip2ForImageTextRetrieval" not in (raw.get("architectures") or []) and bool(
                raw.get("text_config")
            )
    else:
        raise CheckpointError(
            f"'{path_or_id}' is a single file, not a model directory: give a directory written by save_pretrained "
            "or `blip2 convert`, a transformers BLIP-2 directory or a hub id (convert a LAVIS .pth first: "
            "blip2 convert FILE OUT_DIR --config PRESET)"
        )
    return (Blip2 if has_llm else Blip2QFormer).from_pretrained(path, config=config, **kwargs)


def load_for_inference(path_or_id: str, device: str = "cpu", optimize: bool = False) -> Any:
    """The one loader of the command line, the server and ``blip2 eval``: `load_any`, in eval mode.

    ``optimize`` pre-packs the frozen image encoder and LLM weights on CPU
    (`blip2.inference.optimize_for_cpu_inference`: the same tokens, about 2x faster generation here); the
    model can then no longer be trained or saved. A no-op off CPU.
    """
    loaded = load_any(path_or_id, map_location=device).eval()
    if optimize:
        from blip2.inference.fast import optimize_for_cpu_inference

        optimize_for_cpu_inference(loaded)
    return loaded


def check_destination(destination: Path, to: str) -> None:
    """Refuse, before any conversion work, a destination the result could not be written to."""
    if to not in FORMATS:
        raise CheckpointError(f"unknown target format {to!r}; expected one of {', '.join(FORMATS)}")
    if to == "lavis":
        if destination.is_dir():
            raise CheckpointError(
                f"'{destination}' is a folder, but a LAVIS checkpoint is one file: give a file name such as "
                f"'{destination / 'model.pth'}'"
            )
        if destination.exists():
            raise CheckpointError(f"'{destination}' already exists: delete it or choose another file name")
        check_writable_folder(destination.parent, "the LAVIS checkpoint")
        return
    if destination.exists() and not destination.is_dir():
        raise CheckpointError(f"'{destination}' is a file, but this format is a folder: choose a folder name")
    if (destination / CONFIG_NAME).exists() or (destination / WEIGHTS_NAME).exists():
        raise CheckpointError(f"'{destination}' already holds a checkpoint: delete it or choose another folder")
    check_writable_folder(destination if destination.is_dir() else destination.parent, "the checkpoint")


def convert(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    to: str = "blip2",
    preset: str | None = None,
    llm_prefix: str | None = None,
    vision_weights: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert a checkpoint: any loadable source → this project's directory format (``to="blip2"``), or →
    a LAVIS ``.pth`` file (``{"model": state_dict}`` with LAVIS names, ``to="lavis"``).

    ``preset``: the config of a source that carries none (a LAVIS file): a preset name, or a ``config.json``
    in this project's format (e.g. a preset's with ``llm.model_id`` pointing at a local copy of the LLM).

    ``llm_prefix``: LAVIS's attribute prefix of the LLM (``opt_model`` / ``t5_model``); by default from the
    LLM's model type. ``vision_weights``: LAVIS's ``eva_vit_g.pth``, for a LAVIS source without the image
    encoder (the official files). The destination is checked first, and nothing is left half-written if
    writing fails.
    """
    out = Path(destination)
    check_destination(out, to)
    config = _config_named(preset) if preset else None
    model = load_any(source, config=config, vision_weights=vision_weights)
    if to == "blip2":
        model.save_pretrained(out)
    else:
        llm_prefix = llm_prefix or lavis_llm_prefix(model.config)
        state = ours_to_lavis({k: v.detach().cpu() for k, v in model.state_dict().items()}, llm_prefix=llm_prefix)
        write_file(out, lambda tmp: torch.save({"model": state}, tmp))
    return out


def _config_named(preset: str) -> Blip2Config:
    """A preset name, or the path of a config.json in this project's format."""
    from blip2.config import from_name

    path = Path(preset)
    if path.suffix == ".json" or path.is_file():
        return config_from_dict(read_config_file(path), path)
    return from_name(preset)
