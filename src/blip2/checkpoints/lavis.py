"""LAVIS (salesforce/LAVIS, the authors' code): one key table, read in both directions, and its checkpoints.

What LAVIS's files hold (``runners/runner_base.py`` ``_save_checkpoint``): only parameters with
``requires_grad=True`` (plus buffers), under the key ``"model"``. So the official files lack the frozen parts:

- ``blip2_pretrained.pth`` (stage 1) has no ``visual_encoder.*``: LAVIS builds the EVA ViT-g from its own file
  ``eva_vit_g.pth`` (`EVA_VIT_G_URL`, ``eva_vit.py`` ``create_eva_vit_g``: the first 39 of its blocks, loaded
  with ``strict=False``);
- the stage-2 files (``blip2_opt`` / ``blip2_t5``) also have no ``opt_model.*`` / ``t5_model.*``: LAVIS loads
  the LLM from its Hugging Face id (our ``LLMConfig.model_id``), and no Q-Former text parts (word / position
  embeddings, text feed-forward blocks, the ``cls`` head), which LAVIS's stage-2 models delete.

`load_lavis` supplies the frozen parts from those same sources and says in one line which one is missing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from blip2.checkpoints.bert import LAYER_PARTS
from blip2.checkpoints.state import OPTIONAL, CheckpointError, StateDict, first_line, load_into, read_state_dict
from blip2.config import Blip2Config

EVA_VIT_G_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
# LAVIS's ln_vision is a plain nn.LayerNorm (``blip2.py`` ``init_vision_encoder``): eps 1e-5, where
# transformers' port uses the vision config's 1e-6.
LN_VISION_EPS = 1e-5

# The one table: (our name, LAVIS's name). Placeholders: {n} a layer index, {p} weight|bias, {rest} any tail,
# {llm} the LLM's attribute prefix in LAVIS (opt, t5; llm in its newer models).
_TABLE: list[tuple[str, str]] = [
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.embeddings.patch_embedding.{p}", "visual_encoder.patch_embed.proj.{p}"),
    ("vision_model.encoder.layers.{n}.layer_norm1.{p}", "visual_encoder.blocks.{n}.norm1.{p}"),
    ("vision_model.encoder.layers.{n}.layer_norm2.{p}", "visual_encoder.blocks.{n}.norm2.{p}"),
    ("vision_model.encoder.layers.{n}.self_attn.qkv.weight", "visual_encoder.blocks.{n}.attn.qkv.weight"),
    ("vision_model.encoder.layers.{n}.self_attn.projection.{p}", "visual_encoder.blocks.{n}.attn.proj.{p}"),
    ("vision_model.encoder.layers.{n}.mlp.fc1.{p}", "visual_encoder.blocks.{n}.mlp.fc1.{p}"),
    ("vision_model.encoder.layers.{n}.mlp.fc2.{p}", "visual_encoder.blocks.{n}.mlp.fc2.{p}"),
    ("ln_vision.{p}", "ln_vision.{p}"),
    ("query_tokens", "query_tokens"),
    ("temp", "temp"),
    ("itm_head.{p}", "itm_head.{p}"),
    ("vision_projection.{p}", "vision_proj.{p}"),
    ("text_projection.{p}", "text_proj.{p}"),
    ("language_projection.{p}", "{llm}_proj.{p}"),
    ("language_model.{rest}", "{llm}_model.{rest}"),
    ("qformer.embeddings.word_embeddings.weight", "Qformer.bert.embeddings.word_embeddings.weight"),
    ("qformer.embeddings.position_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight"),
    ("qformer.layernorm.{p}", "Qformer.bert.embeddings.LayerNorm.{p}"),
    ("qformer.lm_head.dense.{p}", "Qformer.cls.predictions.transform.dense.{p}"),
    ("qformer.lm_head.norm.{p}", "Qformer.cls.predictions.transform.LayerNorm.{p}"),
    ("qformer.lm_head.bias", "Qformer.cls.predictions.bias"),
] + [
    (f"qformer.layers.{{n}}.{ours}.{{p}}", f"Qformer.bert.encoder.layer.{{n}}.{bert}.{{p}}")
    for ours, bert in LAYER_PARTS
]

_GROUPS = {"n": r"(?P<n>\d+)", "p": r"(?P<p>weight|bias)", "rest": r"(?P<rest>.+)", "llm": r"(?P<llm>opt|t5|llm)"}


def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    return re.compile("".join(_GROUPS[p] if i % 2 else re.escape(p) for i, p in enumerate(parts)))


_OURS = [(_pattern(ours), lavis) for ours, lavis in _TABLE]
_LAVIS = [(_pattern(lavis), ours) for ours, lavis in _TABLE]

# LAVIS names that carry nothing of ours: a buffer, the MLM decoder tied to the word embeddings (and its bias,
# the same tensor as predictions.bias), and the EVA ViT's head, which LAVIS does not build.
_LAVIS_SKIPPED = re.compile(
    r"Qformer\.bert\.embeddings\.position_ids|Qformer\.cls\.predictions\.decoder\.(weight|bias)"
    r"|visual_encoder\.(norm|fc_norm|head)\..+"
)
# EVA has a query and a value bias but no key bias; ours is one qkv bias with a zero middle third.
_EVA_QV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias")
_OUR_QKV_BIAS = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias")


def _rename(key: str, table: list[tuple[re.Pattern[str], str]], **fixed: str) -> str | None:
    for pattern, template in table:
        m = pattern.fullmatch(key)
        if m:
            return template.format(**{**m.groupdict(), **fixed})
    return None


def lavis_to_ours(state: StateDict, strict: bool = True) -> StateDict:
    """A LAVIS BLIP-2 state dict (``visual_encoder.*``, ``ln_vision.*``, ``Qformer.bert.*`` ...) → ours.

    ``strict=False`` skips names outside the table instead of raising (LAVIS loads ``eva_vit_g.pth`` so).
    """
    out: StateDict = {}
    qv_bias: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if _LAVIS_SKIPPED.fullmatch(key):
            continue
        if m := _EVA_QV_BIAS.fullmatch(key):
            qv_bias.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        new = _rename(key, _LAVIS)
        if new is not None:
            out[new] = value
        elif strict:
            raise CheckpointError(f"unrecognised weight {key!r} in a LAVIS checkpoint")
    for layer, bias in qv_bias.items():
        if set(bias) != {"q", "v"}:
            raise CheckpointError(f"LAVIS checkpoint has only the {next(iter(bias))} bias of EVA block {layer}")
        q, v = bias["q"], bias["v"]  # (D,) each
        out[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def ours_to_lavis(state: StateDict, llm_prefix: str = "opt") -> StateDict:
    """Our state dict → LAVIS names (the same table read the other way). ``llm_prefix``: "opt" or "t5"."""
    out: StateDict = {}
    for key, value in state.items():
        if m := _OUR_QKV_BIAS.fullmatch(key):
            d = value.shape[0] // 3
            if bool(value[d : 2 * d].abs().max() > 0):
                raise CheckpointError(f"{key}: EVA ViT has no key bias but this one is non-zero")
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = value[:d]
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = value[2 * d :]
            continue
        new = _rename(key, _OURS, llm=llm_prefix)
        if new is None:
            raise CheckpointError(f"cannot express {key!r} in LAVIS names")
        out[new] = value
    if "qformer.lm_head.bias" in state and "qformer.embeddings.word_embeddings.weight" in state:
        # LAVIS's MLM decoder is tied to the word embeddings and to predictions.bias; its files hold both names
        out["Qformer.cls.predictions.decoder.weight"] = state["qformer.embeddings.word_embeddings.weight"]
        out["Qformer.cls.predictions.decoder.bias"] = state["qformer.lm_head.bias"]
    return out


def eva_to_ours(state: StateDict, num_layers: int) -> StateDict:
    """LAVIS's ``eva_vit_g.pth`` (EVA ViT names, no prefix; or ``visual_encoder.``-prefixed) → ours.

    As LAVIS (``create_eva_vit_g``): only the first ``num_layers`` blocks are used (39 of EVA-CLIP-g's 40) and
    names it does not build are ignored (``load_state_dict(strict=False)``).
    """
    prefixed = {k if k.startswith("visual_encoder.") else "visual_encoder." + k: v for k, v in state.items()}
    kept = {
        k: v
        for k, v in prefixed.items()
        if not ((m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k)) and int(m.group(1)) >= num_layers)
    }
    return {k: v for k, v in lavis_to_ours(kept, strict=False).items() if k.startswith("vision_model.")}


def lavis_llm_prefix(config: Blip2Config) -> str:
    """LAVIS's attribute prefix for the LLM of ``config``: opt_model (blip2_opt), t5_model (blip2_t5), else
    llm_model (its newer models)."""
    model_type = config.llm.hf_config.get("model_type") if config.llm is not None else None
    return model_type if model_type in ("opt", "t5") else "llm"


def looks_lavis(state: StateDict) -> bool:
    return any(k.startswith(("Qformer.", "visual_encoder.", "ln_vision.")) for k in state)


def load_lavis(
    cls: type,
    state: StateDict,
    config: Blip2Config,
    source: str,
    vision_weights: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> tuple[Any, bool]:
    """Build ``cls`` (Blip2 / Blip2QFormer) from a LAVIS state dict, the frozen parts from LAVIS's sources.

    - the image encoder: the checkpoint's ``visual_encoder.*`` if present, else ``vision_weights``
      (``eva_vit_g.pth``); as in LAVIS, the checkpoint's own weights win over that file's;
    - the LLM (``Blip2``): the checkpoint's ``opt_model.*`` / ``t5_model.*`` if present, else the pretrained
      model named by ``config.llm.model_id`` (a hub id or a local directory), as LAVIS does;
    - ``ln_vision`` keeps LAVIS's eps (`LN_VISION_EPS`); a stage-2 file without Q-Former text parts loads
      into a config without them (LAVIS deletes them in stage 2).

    Returns the model and whether its LLM came from ``model_id`` (its tokenizer then comes from there too).
    """
    ours = lavis_to_ours(state)
    config = config.copy()
    config.vision.ln_vision_eps = LN_VISION_EPS
    stage2 = cls.__name__ == "Blip2"
    if stage2 and "qformer.embeddings.word_embeddings.weight" not in ours:
        config.qformer.use_text = False
    optional = OPTIONAL
    if vision_weights is not None:
        num_layers = int(config.vision.hf_config.get("num_hidden_layers", 0))
        ours = {**eva_to_ours(read_state_dict(Path(vision_weights)), num_layers), **ours}
    if not any(k.startswith("vision_model.") for k in ours):
        if config.vision.kind == "blip2":
            raise CheckpointError(
                f"'{source}' holds no image-encoder weights (LAVIS saves only trainable parameters): pass the "
                f"EVA ViT-g file with --vision-weights eva_vit_g.pth (vision_weights= in Python; LAVIS "
                f"downloads it from {EVA_VIT_G_URL})"
            )
        kwargs["pretrained_vision"] = True  # an hf / timm encoder: its pretrained weights, from its model_id
        optional += ("vision_model.",)
    llm_id = config.llm.model_id if stage2 and config.llm is not None else None
    llm_from_id = stage2 and not any(k.startswith("language_model.") for k in ours)
    if llm_from_id:
        if not llm_id:
            raise CheckpointError(
                f"'{source}' holds no language-model weights (LAVIS saves only trainable parameters) and the "
                "config names no llm.model_id to load them from: use a preset that names it "
                "(blip2-opt-2.7b, blip2-flan-t5-xl) or set llm.model_id"
            )
        kwargs["pretrained_llm"] = True
        optional += ("language_model.",)
    try:
        model = cls(config, **kwargs)
    except OSError as exc:  # transformers: no such model id / no internet / missing files
        if not llm_from_id:
            raise
        raise CheckpointError(
            f"'{source}' holds no language-model weights and loading them from '{llm_id}' failed "
            f"({first_line(exc)}): download that model "
            f"(huggingface-cli download {llm_id}) or set llm.model_id to a local copy"
        ) from exc
    load_into(model, ours, source, optional)
    return model, llm_from_id
