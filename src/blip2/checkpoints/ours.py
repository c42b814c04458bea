"""This project's format: a directory with ``config.json`` (``{"format": "blip2", "vision": ..., "qformer": ...,
"llm": ...}``), ``model.safetensors`` and the tokenizer files.

Also the pieces a transformers checkpoint directory shares with it: reading ``config.json``, finding the
weights file, loading the tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from blip2.checkpoints.state import CheckpointError, StateDict, check_writable_folder, first_line, write_file
from blip2.config import Blip2Config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "tokenizer.model")
_WEIGHTS_FILES = (WEIGHTS_NAME, "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(directory: Path) -> dict[str, Any]:
    """``directory/config.json`` as a dict; a missing, malformed or non-object file is a `CheckpointError`."""
    if not (directory / CONFIG_NAME).exists():
        raise CheckpointError(f"'{directory}' is not a checkpoint directory: it has no {CONFIG_NAME}")
    return read_config_file(directory / CONFIG_NAME)


def read_config_file(cfg_file: Path) -> dict[str, Any]:
    """A config JSON file as a dict; a missing, malformed or non-object file is a `CheckpointError`."""
    if not cfg_file.is_file():
        raise CheckpointError(f"config file '{cfg_file}' does not exist")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"'{cfg_file}' is not valid JSON ({exc}): restore it from the original") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"'{cfg_file}' holds a JSON {type(raw).__name__}, not an object of config sections: restore it "
            "from the original"
        )
    return raw


def config_from_dict(raw: dict[str, Any], cfg_file: Path) -> Blip2Config:
    """Our `Blip2Config` from a config.json's contents; a malformed section names the file."""
    try:
        return Blip2Config.from_dict(raw)
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"'{cfg_file}' is not a valid blip2 config ({exc}): restore it from the original"
        ) from exc


def weights_file(directory: Path) -> Path:
    for name in _WEIGHTS_FILES:
        if (directory / name).exists():
            return directory / name
    raise CheckpointError(f"'{directory}' holds no weights (model.safetensors, a sharded index or pytorch_model.bin)")


def load_tokenizer(directory: Path | None, model: Any) -> Any:
    """The tokenizer saved in ``directory``; else, for a stage-2 model, its LLM's (``llm.model_id``); else None."""
    from transformers import AutoTokenizer

    if directory is not None and any((directory / n).exists() for n in TOKENIZER_FILES):
        try:
            return AutoTokenizer.from_pretrained(directory, **_mistral_regex_kwargs(model))
        except Exception as exc:  # noqa: BLE001 - tokenizers fail with many types; name the file either way
            raise CheckpointError(_tokenizer_problem(directory, exc)) from exc
    llm = model.config.llm
    if llm is not None and llm.model_id and model.__class__.__name__ == "Blip2":
        try:
            return AutoTokenizer.from_pretrained(llm.model_id)
        except Exception:  # noqa: BLE001 - no tokenizer is not fatal for tensor-level use
            return None
    return None


# The tokenizer families transformers' Mistral pre-tokenizer fix is meant for (its `_patch_mistral_regex`).
_MISTRAL_TYPES = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})


def _mistral_regex_kwargs(model: Any) -> dict[str, bool]:
    """Tell transformers whether the saved tokenizer is a Mistral one.

    Recent transformers check any tokenizer with a vocabulary over 100k loaded from a local folder: when the
    folder's config.json has no ``model_type`` it assumes an old Mistral save and warns "... incorrect regex
    pattern ... will lead to incorrect tokenization". Our config.json describes the whole BLIP-2, so every
    stage-2 model with a large-vocabulary LLM (Gemma: 262k) got that warning. It is a false alarm: the saved
    tokenizer is the LLM's own, and its ids equal those of the tokenizer loaded from the LLM's folder
    (`tests/test_pretrained.py::test_saved_gemma_tokenizer_gives_the_llm_tokenizer_ids`). Applying the "fix"
    would swap Gemma's pre-tokenizer for Mistral's, so we say from the LLM's type which case it is.
    """
    import transformers

    backends = [getattr(transformers, name, None) for name in ("TokenizersBackend", "PreTrainedTokenizerFast")]
    if not any(hasattr(backend, "_patch_mistral_regex") for backend in backends):
        return {}  # an older transformers without the check
    llm = model.config.llm
    model_type = llm.hf_config.get("model_type") if llm is not None else None
    return {"fix_mistral_regex": model_type in _MISTRAL_TYPES}


def _tokenizer_problem(directory: Path, exc: Exception) -> str:
    """One line naming the tokenizer file that failed (the loaders' own messages do not name it)."""
    for name in TOKENIZER_FILES + ("special_tokens_map.json", "added_tokens.json"):
        path = directory / name
        if name.endswith(".json") and path.exists():
            try:
                json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as bad:
                return f"tokenizer file '{path}' is not valid JSON ({bad}): restore it from the original checkpoint"
    return (
        f"the tokenizer files in '{directory}' could not be loaded ({first_line(exc)}): restore them from the "
        "original checkpoint"
    )


def save_model(model: Any, directory: str | os.PathLike[str]) -> None:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files) into ``directory``.

    Each file is written to a temporary name and moved into place, with the ordinary umask-derived mode.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    check_writable_folder(out, "the model")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # tied weights (e.g. an LLM's lm_head sharing the embeddings) are stored once by safetensors rules
    state = _dedupe_shared(state)
    write_file(out / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    config_text = json.dumps(model.config.to_dict(), indent=2)
    write_file(out / CONFIG_NAME, lambda tmp: tmp.write_text(config_text))
    if getattr(model, "tokenizer", None) is not None:
        model.tokenizer.save_pretrained(out)


def _dedupe_shared(state: StateDict) -> StateDict:
    seen: dict[int, str] = {}
    out: StateDict = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel() > 0:
            continue
        seen[ptr] = k
        out[k] = v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
    return out
