"""BERT's names for a Q-Former layer's parts, and the Q-Former's initialisation from a pretrained BERT.

The Q-Former is a BERT: LAVIS keeps BERT's names (``attention.self.query``), transformers' port renames the
attention block (``attention.attention.query``). `LAYER_PARTS` is the one table of a layer's parts; the
LAVIS and transformers maps are built on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from blip2.checkpoints.state import CheckpointError, StateDict

# One Q-Former layer: (our name, BERT's name as in LAVIS's Qformer.py). Parameters are ``<name>.weight/bias``.
LAYER_PARTS: list[tuple[str, str]] = [
    ("self_attn.query", "attention.self.query"),
    ("self_attn.key", "attention.self.key"),
    ("self_attn.value", "attention.self.value"),
    ("self_attn.dense", "attention.output.dense"),
    ("self_attn.norm", "attention.output.LayerNorm"),
    ("cross_attn.query", "crossattention.self.query"),
    ("cross_attn.key", "crossattention.self.key"),
    ("cross_attn.value", "crossattention.self.value"),
    ("cross_attn.dense", "crossattention.output.dense"),
    ("cross_attn.norm", "crossattention.output.LayerNorm"),
    ("ffn_query.fc1", "intermediate_query.dense"),
    ("ffn_query.fc2", "output_query.dense"),
    ("ffn_query.norm", "output_query.LayerNorm"),
    ("ffn_text.fc1", "intermediate.dense"),
    ("ffn_text.fc2", "output.dense"),
    ("ffn_text.norm", "output.LayerNorm"),
]
_FROM_BERT = {bert: ours for ours, bert in LAYER_PARTS}


def layer_part_from_bert(rest: str) -> str | None:
    """BERT's layer-internal parameter name (``attention.self.query.weight``) → ours (``self_attn.query.weight``)."""
    m = re.fullmatch(r"(.+)\.(weight|bias)", rest)
    if m is None or m.group(1) not in _FROM_BERT:
        return None
    return f"{_FROM_BERT[m.group(1)]}.{m.group(2)}"


# BERT's MLM head (``cls.predictions.*``) → the Q-Former's ITG head.
_LM_HEAD = {
    "transform.dense.weight": "lm_head.dense.weight",
    "transform.dense.bias": "lm_head.dense.bias",
    "transform.LayerNorm.weight": "lm_head.norm.weight",
    "transform.LayerNorm.bias": "lm_head.norm.bias",
}


def init_qformer_from_bert(qformer: nn.Module, bert_state: StateDict) -> list[str]:
    """Copy a pretrained BERT (Hugging Face ``BertModel`` names, optionally ``bert.``-prefixed) into a Q-Former.

    As LAVIS's ``init_Qformer`` (``BertLMHeadModel.from_pretrained("bert-base-uncased")``):

    - self-attention and embeddings come from BERT; both feed-forward blocks (query and text) start from
      BERT's feed-forward weights; cross-attention stays randomly initialised (as in the paper);
    - the extra ``[DEC]`` row(s) of the word embeddings keep their random init;
    - BERT's token-type embeddings are dropped: LAVIS's ``BertEmbeddings`` (``Qformer.py``) has none, so the
      Q-Former's text side starts from BERT's function *without* BERT's token-type-0 row;
    - the MLM head (``cls.predictions.*``) initialises the ITG LM head when present.

    Returns the names of Q-Former parameters that were *not* initialised from BERT.
    """
    state = {k.removeprefix("bert."): v for k, v in bert_state.items()}
    own = qformer.state_dict()
    mapped: StateDict = {}
    for key, value in state.items():
        if key == "embeddings.word_embeddings.weight":
            rows = own["embeddings.word_embeddings.weight"].clone()  # (V, D): BERT's V plus [DEC]
            n = min(rows.shape[0], value.shape[0])
            rows[:n] = value[:n]
            mapped["embeddings.word_embeddings.weight"] = rows
        elif key == "embeddings.position_embeddings.weight":
            mapped[key] = value
        elif key.startswith("embeddings.LayerNorm."):
            mapped["layernorm." + key.split(".")[-1]] = value
        elif key.startswith("cls.predictions."):
            rest = key[len("cls.predictions.") :]
            if rest in _LM_HEAD:
                mapped[_LM_HEAD[rest]] = value
            elif rest == "bias":
                bias = own["lm_head.bias"].clone()  # (V,)
                bias[: value.shape[0]] = value
                mapped["lm_head.bias"] = bias
        elif m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key):
            part = layer_part_from_bert(m.group(2))
            if part is None:
                continue
            mapped[f"layers.{m.group(1)}.{part}"] = value
            if part.startswith("ffn_text."):
                mapped[f"layers.{m.group(1)}.{part.replace('ffn_text.', 'ffn_query.')}"] = value
        # else: the pooler, token-type embeddings, the position_ids buffer: not part of the Q-Former
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


def wordpiece_rows(tokens: list[str], wordpiece: Any, specials: Mapping[str, str]) -> list[list[int]]:
    """For each of ``tokens``, the ids of its WordPieces in ``wordpiece`` (a BERT tokenizer); a token in
    ``specials`` stands for that BERT special token (e.g. ``{"<s>": "[CLS]"}``). The rows `narrow_vocabulary`
    averages."""
    return [wordpiece.convert_tokens_to_ids([specials[t]] if t in specials else wordpiece.tokenize(t)) for t in tokens]


def narrow_vocabulary(bert_state: StateDict, rows: list[list[int]]) -> StateDict:
    """A copy of a BERT state with a new vocabulary: token ``i``'s word embedding (and MLM-head bias, when the
    state has one) is the mean of BERT's rows ``rows[i]`` (the WordPiece ids of its word).

    A Q-Former whose texts use a small closed vocabulary keeps BERT's knowledge of those words while its ITG
    head scores only them (`init_qformer_from_bert` then copies the narrowed state; rows past ``len(rows)``,
    such as ``[DEC]``, keep their random init)."""
    if not rows or any(not r for r in rows):
        raise ValueError("narrow_vocabulary needs at least one BERT row for every new token")
    out = dict(bert_state)
    for key in ("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"):
        if key in out:
            table = out[key]  # (V_bert, D)
            out[key] = torch.stack([table[r].mean(0) for r in rows])  # (V_new, D)
    for key in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
        if key in out:
            bias = out[key]  # (V_bert,)
            out[key] = torch.stack([bias[r].mean() for r in rows])
    return out
