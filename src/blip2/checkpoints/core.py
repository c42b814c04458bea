"""Loading and saving: this project's format, transformers' BLIP-2 format and LAVIS checkpoints.

One explicit key map per source format (``hf_to_ours``, ``lavis_to_ours`` and its inverse
``ours_to_lavis``). Weights are read with safetensors or ``torch.load(weights_only=True)`` only.

This project's format: a directory with ``config.json`` (``{"format": "blip2", "vision": ..., "qformer":
..., "llm": ...}``), ``model.safetensors`` and the tokenizer files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------
# Key maps
# ----------------------------------------------------------------------------------------------------------

# Q-Former layer internals: (transformers / BERT name, our name). LAVIS uses ".self." where HF has ".attention."
_LAYER_PARTS = [
    (r"attention\.attention\.(query|key|value)", r"self_attn.\1"),
    (r"attention\.output\.dense", "self_attn.dense"),
    (r"attention\.output\.LayerNorm", "self_attn.norm"),
    (r"crossattention\.attention\.(query|key|value)", r"cross_attn.\1"),
    (r"crossattention\.output\.dense", "cross_attn.dense"),
    (r"crossattention\.output\.LayerNorm", "cross_attn.norm"),
    (r"intermediate_query\.dense", "ffn_query.fc1"),
    (r"output_query\.dense", "ffn_query.fc2"),
    (r"output_query\.LayerNorm", "ffn_query.norm"),
    (r"intermediate\.dense", "ffn_text.fc1"),
    (r"output\.dense", "ffn_text.fc2"),
    (r"output\.LayerNorm", "ffn_text.norm"),
]


def _map_layer_part(rest: str) -> str | None:
    """BERT-style layer-internal name (``attention.output.dense.weight``) → ours (``self_attn.dense.weight``)."""
    for pattern, repl in _LAYER_PARTS:
        new, n = re.subn("^" + pattern + r"(?=\.(weight|bias)$)", repl, rest)
        if n:
            return new
    return None


def hf_to_ours(state: StateDict) -> StateDict:
    """transformers' ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` → ours."""
    out: StateDict = {}
    for key, value in state.items():
        new = _hf_key(key)
        if new is not None:
            out[new] = value
    return out


def _hf_key(key: str) -> str | None:
    if key.startswith("vision_model.post_layernorm."):
        return "ln_vision." + key.split(".")[-1]
    if key.startswith(("vision_model.", "language_model.", "language_projection.", "query_tokens")):
        return key
    if key.startswith(("vision_projection.", "text_projection.", "itm_head.")) or key == "temp":
        return key
    if key.startswith("embeddings.") and "position_ids" not in key:  # retrieval model's text embeddings
        return "qformer." + key
    if key.startswith("qformer.layernorm."):
        return key
    m = re.fullmatch(r"qformer\.encoder\.layer\.(\d+)\.(.+)", key)
    if m:
        part = _map_layer_part(m.group(2))
        if part is None:
            raise CheckpointError(f"unrecognised Q-Former weight {key!r}")
        return f"qformer.layers.{m.group(1)}.{part}"
    if "position_ids" in key:
        return None
    raise CheckpointError(f"unrecognised weight {key!r} in a transformers BLIP-2 checkpoint")


_LAVIS_VIT = [
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"blocks\.(\d+)\.mlp\.fc(\d)\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"cls_token$", "embeddings.class_embedding"),
    (r"pos_embed$", "embeddings.position_embedding"),
]


def lavis_to_ours(state: StateDict) -> StateDict:
    """A LAVIS BLIP-2 state dict (``visual_encoder.*``, ``ln_vision.*``, ``Qformer.bert.*`` ...) → ours."""
    out: StateDict = {}
    q_bias: dict[str, torch.Tensor] = {}
    v_bias: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("visual_encoder."):
            rest = key[len("visual_encoder.") :]
            m = re.fullmatch(r"blocks\.(\d+)\.attn\.(q|v)_bias", rest)
            if m:
                (q_bias if m.group(2) == "q" else v_bias)[m.group(1)] = value
                continue
            for pattern, repl in _LAVIS_VIT:
                if re.match(pattern, rest):
                    out["vision_model." + re.sub(pattern, repl, rest)] = value
                    break
            else:
                if rest.startswith(("norm.", "head.", "fc_norm.")):  # the dropped last layer's head
                    continue
                raise CheckpointError(f"unrecognised EVA ViT weight {key!r} in a LAVIS checkpoint")
        elif key.startswith("ln_vision.") or key == "query_tokens" or key.startswith("itm_head.") or key == "temp":
            out[key] = value
        elif key.startswith(("vision_proj.", "text_proj.")):
            name, param = key.split(".")
            out[{"vision_proj": "vision_projection", "text_proj": "text_projection"}[name] + "." + param] = value
        elif key.startswith(("opt_proj.", "t5_proj.", "llm_proj.")):
            out["language_projection." + key.split(".")[-1]] = value
        elif key.startswith(("opt_model.", "t5_model.", "llm_model.")):
            out["language_model." + key.split(".", 1)[1]] = value
        elif key.startswith("Qformer."):
            new = _lavis_qformer_key(key)
            if new is not None:
                out[new] = value
        else:
            raise CheckpointError(f"unrecognised weight {key!r} in a LAVIS checkpoint")
    for layer, q in q_bias.items():
        v = v_bias[layer]
        out[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def _lavis_qformer_key(key: str) -> str | None:
    rest = key[len("Qformer.") :]
    simple = {
        "bert.embeddings.word_embeddings.weight": "qformer.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight": "qformer.embeddings.position_embeddings.weight",
        "bert.embeddings.LayerNorm.weight": "qformer.layernorm.weight",
        "bert.embeddings.LayerNorm.bias": "qformer.layernorm.bias",
        "cls.predictions.transform.dense.weight": "qformer.lm_head.dense.weight",
        "cls.predictions.transform.dense.bias": "qformer.lm_head.dense.bias",
        "cls.predictions.transform.LayerNorm.weight": "qformer.lm_head.norm.weight",
        "cls.predictions.transform.LayerNorm.bias": "qformer.lm_head.norm.bias",
        "cls.predictions.bias": "qformer.lm_head.bias",
    }
    if rest in simple:
        return simple[rest]
    if rest in ("bert.embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
        return None  # a buffer; the decoder is tied to the word embeddings (and its bias is predictions.bias)
    m = re.fullmatch(r"bert\.encoder\.layer\.(\d+)\.(.+)", rest)
    if m:
        part = _map_layer_part(
            m.group(2)
            .replace("attention.self.", "attention.attention.")
            .replace("crossattention.self.", "crossattention.attention.")
        )
        if part is not None:
            return f"qformer.layers.{m.group(1)}.{part}"
    raise CheckpointError(f"unrecognised Q-Former weight {key!r} in a LAVIS checkpoint")


_LAVIS_LAYER = {
    "self_attn.query": "attention.self.query",
    "self_attn.key": "attention.self.key",
    "self_attn.value": "attention.self.value",
    "self_attn.dense": "attention.output.dense",
    "self_attn.norm": "attention.output.LayerNorm",
    "cross_attn.query": "crossattention.self.query",
    "cross_attn.key": "crossattention.self.key",
    "cross_attn.value": "crossattention.self.value",
    "cross_attn.dense": "crossattention.output.dense",
    "cross_attn.norm": "crossattention.output.LayerNorm",
    "ffn_query.fc1": "intermediate_query.dense",
    "ffn_query.fc2": "output_query.dense",
    "ffn_query.norm": "output_query.LayerNorm",
    "ffn_text.fc1": "intermediate.dense",
    "ffn_text.fc2": "output.dense",
    "ffn_text.norm": "output.LayerNorm",
}
_LAVIS_QFORMER = {
    "qformer.embeddings.word_embeddings.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    "qformer.embeddings.position_embeddings.weight": "Qformer.bert.embeddings.position_embeddings.weight",
    "qformer.layernorm.weight": "Qformer.bert.embeddings.LayerNorm.weight",
    "qformer.layernorm.bias": "Qformer.bert.embeddings.LayerNorm.bias",
    "qformer.lm_head.dense.weight": "Qformer.cls.predictions.transform.dense.weight",
    "qformer.lm_head.dense.bias": "Qformer.cls.predictions.transform.dense.bias",
    "qformer.lm_head.norm.weight": "Qformer.cls.predictions.transform.LayerNorm.weight",
    "qformer.lm_head.norm.bias": "Qformer.cls.predictions.transform.LayerNorm.bias",
    "qformer.lm_head.bias": "Qformer.cls.predictions.bias",
}
_LAVIS_VIT_INVERSE = [
    (r"encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
    (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"embeddings\.class_embedding$", "cls_token"),
    (r"embeddings\.position_embedding$", "pos_embed"),
]


def ours_to_lavis(state: StateDict, llm_prefix: str = "opt") -> StateDict:
    """Our state dict → LAVIS names (the inverse of `lavis_to_ours`). ``llm_prefix``: "opt" or "t5"."""
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("vision_model."):
            rest = key[len("vision_model.") :]
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.qkv\.bias", rest)
            if m:
                d = value.shape[0] // 3
                if bool(value[d : 2 * d].abs().max() > 0):
                    raise CheckpointError(f"{key}: EVA ViT has no key bias but this one is non-zero")
                out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = value[:d]
                out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = value[2 * d :]
                continue
            for pattern, repl in _LAVIS_VIT_INVERSE:
                new, n = re.subn("^" + pattern, repl, rest)
                if n:
                    out["visual_encoder." + new] = value
                    break
            else:
                raise CheckpointError(f"cannot express {key!r} in LAVIS's EVA ViT names")
        elif key.startswith("qformer.layers."):
            m = re.fullmatch(r"qformer\.layers\.(\d+)\.(\w+\.\w+)\.(weight|bias)", key)
            if not m or m.group(2) not in _LAVIS_LAYER:
                raise CheckpointError(f"cannot express {key!r} in LAVIS's Q-Former names")
            out[f"Qformer.bert.encoder.layer.{m.group(1)}.{_LAVIS_LAYER[m.group(2)]}.{m.group(3)}"] = value
        elif key in _LAVIS_QFORMER:
            out[_LAVIS_QFORMER[key]] = value
            if key == "qformer.embeddings.word_embeddings.weight" and "qformer.lm_head.bias" in state:
                out["Qformer.cls.predictions.decoder.weight"] = value  # tied, as LAVIS saves it
        elif key.startswith("vision_projection."):
            out["vision_proj." + key.split(".")[-1]] = value
        elif key.startswith("text_projection."):
            out["text_proj." + key.split(".")[-1]] = value
        elif key.startswith("language_projection."):
            out[f"{llm_prefix}_proj." + key.split(".")[-1]] = value
        elif key.startswith("language_model."):
            out[f"{llm_prefix}_model." + key.split(".", 1)[1]] = value
        elif key.startswith(("ln_vision.", "itm_head.")) or key in ("query_tokens", "temp"):
            out[key] = value
        else:
            raise CheckpointError(f"cannot express {key!r} in LAVIS names")
    return out


# ----------------------------------------------------------------------------------------------------------
# Configs from transformers' BLIP-2 configs
# ----------------------------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any]) -> Blip2Config:
    """A transformers ``Blip2Config`` dict (config.json of a hub checkpoint) → ours."""
    v = dict(hf.get("vision_config") or {})
    vision_fields = {
        k: v[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "hidden_act",
            "layer_norm_eps",
            "qkv_bias",
        )
        if k in v
    }
    base = {
        "hidden_size": 1408,
        "intermediate_size": 6144,
        "num_hidden_layers": 39,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
    }
    base.update(vision_fields)
    vision = VisionConfig(
        kind="blip2", hf_config=base, image_size=int(base["image_size"]), hidden_size=int(base["hidden_size"])
    )
    qf = dict(hf.get("qformer_config") or {})
    architectures = hf.get("architectures") or []
    use_text = bool(qf.get("use_qformer_text_input", False)) or "Blip2ForImageTextRetrieval" in architectures
    qformer = QFormerConfig(
        vocab_size=int(qf.get("vocab_size", 30522)),
        hidden_size=int(qf.get("hidden_size", 768)),
        num_hidden_layers=int(qf.get("num_hidden_layers", 12)),
        num_attention_heads=int(qf.get("num_attention_heads", 12)),
        intermediate_size=int(qf.get("intermediate_size", 3072)),
        hidden_act=qf.get("hidden_act", "gelu"),
        hidden_dropout_prob=float(qf.get("hidden_dropout_prob", 0.1)),
        attention_probs_dropout_prob=float(qf.get("attention_probs_dropout_prob", 0.1)),
        max_position_embeddings=int(qf.get("max_position_embeddings", 512)),
        layer_norm_eps=float(qf.get("layer_norm_eps", 1e-12)),
        pad_token_id=int(qf.get("pad_token_id") or 0),
        cross_attention_frequency=int(qf.get("cross_attention_frequency", 2)),
        encoder_hidden_size=vision.hidden_size,
        num_query_tokens=int(hf.get("num_query_tokens", 32)),
        use_text=use_text,
        embed_dim=int(hf.get("image_text_hidden_size", 256)),
        bos_token_id=int(qf.get("bos_token_id") or qf.get("vocab_size", 30523) - 1),
    )
    llm = None
    text = hf.get("text_config")
    if text and "Blip2ForImageTextRetrieval" not in architectures:
        text = {k: v for k, v in text.items() if not k.startswith("_")}
        kind = "encoder_decoder" if text.get("is_encoder_decoder") or text.get("model_type") == "t5" else "decoder"
        llm = LLMConfig(kind=kind, hf_config=text, image_token_index=hf.get("image_token_index"))
    return Blip2Config(vision=vision, qformer=qformer, llm=llm)


# ----------------------------------------------------------------------------------------------------------
# Reading weights
# ----------------------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> StateDict:
    """Weights from a safetensors file, a sharded safetensors index, or a torch file (weights_only)."""
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


def _weights_file(directory: Path) -> Path:
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        if (directory / name).exists():
            return directory / name
    raise CheckpointError(f"'{directory}' holds no weights (model.safetensors, a sharded index or pytorch_model.bin)")


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


# ----------------------------------------------------------------------------------------------------------
# Loading into a model
# ----------------------------------------------------------------------------------------------------------

# Parts a checkpoint may lack; they keep their initialisation (transformers' retrieval model has no ITG head,
# and no temperature).
_OPTIONAL = ("qformer.lm_head.", "temp")


def load_into(model: nn.Module, state: StateDict, source: str, optional: tuple[str, ...] = _OPTIONAL) -> list[str]:
    """Copy ``state`` into ``model`` after checking every name and shape. Returns the optional keys missing.

    Nothing is copied unless everything matches, so a bad checkpoint leaves the model untouched.
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


def load_model(
    cls: type,
    path_or_id: str | os.PathLike[str],
    config: Blip2Config | None = None,
    map_location: str | torch.device = "cpu",
    **kwargs: Any,
) -> Any:
    """Build ``cls`` (Blip2 or Blip2QFormer) and load weights from any supported format.

    - a directory written by ``save_pretrained`` (ours) or by transformers (``model_type: blip-2``);
    - a hub id (downloaded, then as above);
    - a LAVIS checkpoint file (``.pth`` / ``.safetensors``) together with ``config=`` (LAVIS files carry no
      config; ``blip2.config.from_name`` has the official architectures).
    """
    path = resolve(path_or_id)
    source = str(path_or_id)
    if path.is_file():
        state = read_state_dict(path)
        if config is None:
            raise CheckpointError(f"'{source}' is a bare weights file: pass config= (e.g. from_name(...))")
        state = lavis_to_ours(state) if _looks_lavis(state) else state
        model = cls(config, **kwargs)
        load_into(model, state, source)
        return model.to(map_location)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise CheckpointError(f"'{source}' is not a checkpoint directory: it has no {CONFIG_NAME}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"'{cfg_file}' is not valid JSON ({exc})") from exc
    if raw.get("format") == "blip2":
        config = config or Blip2Config.from_dict(raw)
        convert: Callable[[StateDict], StateDict] = lambda s: s  # noqa: E731
    elif raw.get("model_type") == "blip-2":
        config = config or config_from_hf(raw)
        convert = hf_to_ours
    else:
        raise CheckpointError(
            f"'{cfg_file}' is neither a blip2 config nor a transformers BLIP-2 config "
            f"(model_type={raw.get('model_type')!r})"
        )
    model = cls(config, **kwargs)
    state = convert(read_state_dict(_weights_file(path)))
    if cls.__name__ == "Blip2QFormer" and any(k.startswith("language_") for k in state):
        state = {k: v for k, v in state.items() if not k.startswith("language_")}  # stage-2 ckpt's Q-Former
    load_into(model, state, source)
    model.tokenizer = _load_tokenizer(path, model)
    return model.to(map_location)


def _looks_lavis(state: StateDict) -> bool:
    return any(k.startswith(("Qformer.", "visual_encoder.", "ln_vision.")) for k in state)


def _load_tokenizer(path: Path, model: Any) -> Any:
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "tokenizer.model")
    if any((path / n).exists() for n in names):
        return AutoTokenizer.from_pretrained(path)
    llm = model.config.llm
    if llm is not None and llm.model_id and model.__class__.__name__ == "Blip2":
        try:
            return AutoTokenizer.from_pretrained(llm.model_id)
        except Exception:  # noqa: BLE001 - no tokenizer is not fatal for tensor-level use
            return None
    return None


def save_model(model: Any, directory: str | os.PathLike[str]) -> None:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files) into ``directory``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # tied weights (e.g. an LLM's lm_head sharing the embeddings) are stored once by safetensors rules
    state = _dedupe_shared(state)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2))
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


def load_any(path_or_id: str | os.PathLike[str], config: Blip2Config | None = None, **kwargs: Any) -> Any:
    """`Blip2` when the checkpoint has a language model, `Blip2QFormer` otherwise."""
    from blip2.model import Blip2, Blip2QFormer

    path = resolve(path_or_id)
    has_llm: bool
    if config is not None:
        has_llm = config.llm is not None
    elif path.is_dir() and (path / CONFIG_NAME).exists():
        try:
            raw = json.loads((path / CONFIG_NAME).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"'{path / CONFIG_NAME}' is not valid JSON ({exc})") from exc
        if raw.get("format") == "blip2":
            has_llm = bool(raw.get("llm"))
        else:
            has_llm = "Blip2ForImageTextRetrieval" not in (raw.get("architectures") or []) and bool(
                raw.get("text_config")
            )
    elif path.is_dir():
        raise CheckpointError(f"'{path_or_id}' is not a checkpoint directory: it has no {CONFIG_NAME}")
    else:
        raise CheckpointError(f"'{path_or_id}' is a bare weights file: pass a config (a preset name)")
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


def convert(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    to: str = "blip2",
    preset: str | None = None,
    llm_prefix: str = "opt",
) -> Path:
    """Convert a checkpoint: any loadable source → this project's directory format (``to="blip2"``), or →
    a LAVIS ``.pth`` file (``{"model": state_dict}`` with LAVIS names, ``to="lavis"``)."""
    from blip2.config import from_name

    config = from_name(preset) if preset else None
    model = load_any(source, config=config)
    out = Path(destination)
    if to == "blip2":
        model.save_pretrained(out)
        return out
    if to == "lavis":
        out.parent.mkdir(parents=True, exist_ok=True)
        state = ours_to_lavis({k: v.detach().cpu() for k, v in model.state_dict().items()}, llm_prefix=llm_prefix)
        tmp = out.with_name(out.name + ".tmp")
        torch.save({"model": state}, tmp)
        os.replace(tmp, out)
        return out
    raise ValueError(f"unknown target format {to!r}; expected 'blip2' or 'lavis'")


# ----------------------------------------------------------------------------------------------------------
# Q-Former initialisation from a pretrained BERT (the paper's starting point)
# ----------------------------------------------------------------------------------------------------------


def init_qformer_from_bert(qformer: nn.Module, bert_state: StateDict) -> list[str]:
    """Copy a pretrained BERT (Hugging Face ``BertModel`` names, optionally ``bert.``-prefixed) into a Q-Former.

    - self-attention and embeddings come from BERT; both feed-forward blocks (query and text) start from
      BERT's feed-forward weights; cross-attention stays randomly initialised (as in the paper);
    - the extra ``[DEC]`` row(s) of the word embeddings keep their random init;
    - BERT's token-type embedding 0 (added to every token in BERT) is folded into the position embeddings,
      so the text side computes exactly what the pretrained BERT computed;
    - the MLM head (``cls.predictions.*``) initialises the ITG LM head when present.

    Returns the names of Q-Former parameters that were *not* initialised from BERT.
    """
    state = {k.removeprefix("bert."): v for k, v in bert_state.items()}
    own = qformer.state_dict()
    mapped: StateDict = {}
    for key, value in state.items():
        if key.startswith("embeddings.word_embeddings."):
            row = own["embeddings.word_embeddings.weight"].clone()
            n = min(row.shape[0], value.shape[0])
            row[:n] = value[:n]
            mapped["embeddings.word_embeddings.weight"] = row
        elif key == "embeddings.position_embeddings.weight":
            token_type = state.get("embeddings.token_type_embeddings.weight")
            mapped["embeddings.position_embeddings.weight"] = value + (token_type[0] if token_type is not None else 0)
        elif key.startswith("embeddings.LayerNorm."):
            mapped["layernorm." + key.split(".")[-1]] = value
        elif key.startswith("cls.predictions."):
            rest = key[len("cls.predictions.") :]
            names = {
                "transform.dense.weight": "lm_head.dense.weight",
                "transform.dense.bias": "lm_head.dense.bias",
                "transform.LayerNorm.weight": "lm_head.norm.weight",
                "transform.LayerNorm.bias": "lm_head.norm.bias",
            }
            if rest in names:
                mapped[names[rest]] = value
            elif rest == "bias":
                bias = own["lm_head.bias"].clone()
                bias[: value.shape[0]] = value
                mapped["lm_head.bias"] = bias
        else:
            m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
            if not m:
                continue  # pooler, token types, position_ids buffer
            part = _map_layer_part(m.group(2).replace("attention.self.", "attention.attention."))
            if part is None:
                continue
            mapped[f"layers.{m.group(1)}.{part}"] = value
            if part.startswith("ffn_text."):
                mapped[f"layers.{m.group(1)}.{part.replace('ffn_text.', 'ffn_query.')}"] = value
    mapped = {k: v for k, v in mapped.items() if k in own}
    bad = [
        f"{k}: BERT {tuple(v.shape)} vs Q-Former {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if v.shape != own[k].shape
    ]
    if bad:
        raise CheckpointError("BERT weights do not fit this Q-Former config: " + "; ".join(bad[:5]))
    with torch.no_grad():
        for k, v in mapped.items():
            own[k].copy_(v)
    return sorted(set(own) - set(mapped))
