"""transformers' BLIP-2 port (``Blip2ForConditionalGeneration``, ``Blip2ForImageTextRetrieval``): names and config.

Our attribute names follow the port (``vision_model``, ``query_tokens``, ``qformer``, ``language_projection``,
``language_model``), so most names pass through; the Q-Former layers use BERT's names with
``attention.attention`` for BERT's ``attention.self`` (see `blip2.checkpoints.bert.LAYER_PARTS`). The port's
``post_layernorm`` is BLIP-2's ``ln_vision``; its eps is the vision config's ``layer_norm_eps`` (1e-6 in
the port), unlike LAVIS's 1e-5 (see `blip2.checkpoints.lavis`).
"""

from __future__ import annotations

import re
from typing import Any

from blip2.checkpoints.bert import layer_part_from_bert
from blip2.checkpoints.state import CheckpointError, StateDict
from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig

# The port's names for BERT's attention blocks.
_PORT_ATTENTION = re.compile(r"^(cross)?attention\.attention\.")


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
        part = layer_part_from_bert(_PORT_ATTENTION.sub(r"\1attention.self.", m.group(2)))
        if part is None:
            raise CheckpointError(f"unrecognised Q-Former weight {key!r}")
        return f"qformer.layers.{m.group(1)}.{part}"
    if "position_ids" in key:
        return None
    raise CheckpointError(f"unrecognised weight {key!r} in a transformers BLIP-2 checkpoint")


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
