"""Faster generation with the frozen LLM, giving the same tokens as transformers' ``generate``.

transformers' ``Blip2ForConditionalGeneration.generate`` hands the whole prompt (visual prompt + text) to the
LLM's ``generate``, which first copies every prompt ``num_beams`` times and then runs the prompt through the
LLM for every copy. The copies are identical, so here the prompt is run once per row (or once per image when
several questions share it) and its key/value cache is copied to the beams; transformers' own ``generate``
then continues from that cache (a documented use of ``generate``: "continue from a cache"), so the search
itself, its stopping rules and its output format are exactly transformers'.

- `prefix_cached_generate`: one prompt per row; the first L-1 positions are run once per row, the cache is
  expanded to the beams, ``generate`` runs the last prompt token and the search.
- `shared_prefix_generate`: rows that share a prefix (the visual prompt of one image followed by the same
  text, e.g. "</s>Question:") run it once; each row's own suffix follows with its padding *after* the
  shared prefix. Exact for LLMs whose positions follow the attention mask (`positions_follow_mask`: OPT).
- `prepack_linear_weights` (opt-in, CPU, inference only): replaces the ``nn.Linear`` layers of a frozen
  module by oneDNN pre-packed ones, 1.1-2.5x faster matrix products on CPU with the same numbers up to
  float rounding (about 1e-6 relative).

The outputs are the same tokens as the plain path up to float rounding in the logits (the prompt is computed
with a different batch size, so the matrix products may round differently in the last bit); the tests compare
token for token against the plain path and against transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# Generation options that read the prompt's token ids (the placeholder / padding ids we put in front would
# change what they see) or that change how the cache is handled: with any of them set, use the plain path.
_READS_PROMPT_IDS = ("no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "encoder_no_repeat_ngram_size")
_UNSUPPORTED_KWARGS = ("cache", "past_key_values", "assistant_model", "prefill_chunk_size", "inputs_embeds")
# LLMs whose position ids are computed from the attention mask (cumsum), so padding placed between a shared
# prefix and a row's own text leaves every real token's position unchanged.
_MASK_POSITION_MODELS = frozenset({"opt"})
# LLMs the prefix-cache path is not exact for: a BERT decoder (`transformers.BertLMHeadModel`, the offline demo's
# text LLM) numbers the positions of a left-padded row from the padding, not from its first real token, when
# the prompt runs without generate's position ids (measured: other tokens than the plain path, which matches
# each row generated alone).
_PLAIN_PATH_MODELS = frozenset({"bert", "roberta"})


def positions_follow_mask(language_model: nn.Module) -> bool:
    return getattr(language_model.config, "model_type", None) in _MASK_POSITION_MODELS


def expansion_factor(language_model: nn.Module, generation_kwargs: dict[str, Any]) -> int | None:
    """How many copies of each row transformers' ``generate`` makes (beams / return sequences), or None when
    the prefix-cache path does not apply to this model or these options (then the plain path is used)."""
    config = language_model.config
    if getattr(config, "is_encoder_decoder", False) or not hasattr(language_model, "generate"):
        return None
    if getattr(config, "model_type", None) in _PLAIN_PATH_MODELS:
        return None
    if not getattr(language_model, "_supports_default_dynamic_cache", lambda: False)():
        return None
    if any(generation_kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS):
        return None
    gc = copy.deepcopy(language_model.generation_config)
    gc.update(**{k: v for k, v in generation_kwargs.items() if hasattr(gc, k)})
    if gc.use_cache is False or gc.cache_implementation is not None or gc.return_dict_in_generate:
        return None
    if (gc.repetition_penalty or 1.0) != 1.0 or any(getattr(gc, k, None) for k in _READS_PROMPT_IDS):
        return None
    if gc.max_new_tokens is None:  # max_length semantics depend on how the prompt is passed
        return None
    return max(int(gc.num_beams or 1), int(gc.num_return_sequences or 1))


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@torch.no_grad()
def prefill(
    language_model: nn.Module,
    cache: Any = None,
    inputs_embeds: torch.Tensor | None = None,  # (B, T, H)
    input_ids: torch.Tensor | None = None,  # (B, T)
    attention_mask: torch.Tensor | None = None,  # (B, past + T)
) -> Any:
    """Run T prompt positions through the LLM, appending their keys/values to ``cache`` (new if None)."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=language_model.config.get_text_config(decoder=True))
    out = language_model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,  # only the cache is needed; skip the LM head on all but one position
    )
    return _cache_of(out)


def _select_rows(cache: Any, rows: torch.Tensor) -> Any:
    """Cache rows in the order of ``rows`` (any length: repeats expand, as for beams)."""
    cache.reorder_cache(rows)
    return cache


@torch.no_grad()
def prefix_cached_generate(
    language_model: nn.Module,
    input_ids: torch.Tensor,  # (B, L): ids the LLM sees; positions < L-1 may be placeholders (never embedded)
    inputs_embeds: torch.Tensor,  # (B, L, H), the visual prompt already spliced in
    attention_mask: torch.Tensor,  # (B, L)
    expand: int,
    **generation_kwargs: Any,
) -> torch.Tensor:
    """``generate`` with the first L-1 prompt positions computed once per row instead of once per beam.

    Returns what ``language_model.generate(input_ids=..., inputs_embeds=..., ...)`` returns: (B * n, L + new).
    The last prompt position must be an ordinary token (it is embedded from ``input_ids`` by ``generate``).
    """
    b, length = input_ids.shape
    cache = None
    if length > 1:
        cache = prefill(language_model, inputs_embeds=inputs_embeds[:, :-1], attention_mask=attention_mask[:, :-1])
        if expand > 1:
            cache = _select_rows(cache, torch.arange(b, device=input_ids.device).repeat_interleave(expand))
    return language_model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **generation_kwargs)


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of the token lists, leaving every row at least one token."""
    if not rows:
        return 0
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


@torch.no_grad()
def shared_prefix_generate(
    language_model: nn.Module,
    prefix_embeds: torch.Tensor,  # (N, P, H): one shared prefix per distinct image (visual prompt + common text)
    prefix_ids: Sequence[int],  # (P,) the ids at those positions (placeholders are never embedded)
    rows: torch.Tensor,  # (B,) which prefix each row continues
    suffixes: Sequence[Sequence[int]],  # B token lists, each row's own text after the prefix (non-empty)
    pad_token_id: int,
    expand: int,
    **generation_kwargs: Any,
) -> torch.Tensor:
    """Generate for B rows that continue N shared prefixes; the prefixes are run through the LLM once.

    Rows are laid out [prefix][pads][suffix], so the shared prefix sits at the same positions in every row;
    the pads are masked, and for LLMs whose positions follow the attention mask (`positions_follow_mask`)
    every real token keeps the position it has without padding. Returns the new tokens (B * n, new).
    """
    if not positions_follow_mask(language_model):
        raise ValueError(
            f"padding after a shared prefix is exact only for LLMs whose positions follow the attention mask "
            f"({sorted(_MASK_POSITION_MODELS)}), not {language_model.config.model_type!r}"
        )
    if any(len(s) == 0 for s in suffixes):
        raise ValueError("every row needs at least one token after the shared prefix")
    device = prefix_embeds.device
    b, p = len(suffixes), prefix_embeds.shape[1]
    width = max(len(s) for s in suffixes)
    ids = torch.full((b, p + width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, p + width), dtype=torch.long)
    ids[:, :p] = torch.tensor(list(prefix_ids), dtype=torch.long)
    mask[:, :p] = 1
    for i, s in enumerate(suffixes):
        ids[i, p + width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, p + width - len(s) :] = 1
    ids, mask = ids.to(device), mask.to(device)

    prefix_mask = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=device)
    cache = prefill(language_model, inputs_embeds=prefix_embeds, attention_mask=prefix_mask)  # N rows
    cache = _select_rows(cache, rows.to(device))  # B rows
    if width > 1:  # each row's suffix except its last token (which generate runs)
        cache = prefill(language_model, cache=cache, input_ids=ids[:, p:-1], attention_mask=mask[:, :-1])
    if expand > 1:
        cache = _select_rows(cache, torch.arange(b, device=device).repeat_interleave(expand))
    out = language_model.generate(input_ids=ids, attention_mask=mask, cache=cache, **generation_kwargs)
    return out[:, ids.shape[1] :]


# ----------------------------------------------------------------------------------------------------------
# CPU weight pre-packing (opt-in, inference only)
# ----------------------------------------------------------------------------------------------------------


def can_prepack() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in oneDNN's blocked layout (CPU, float32, no autograd).

    The original weight is released (the packed copy replaces it), so a packed model can neither be trained
    nor saved; build it again from the checkpoint for that.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError("PackedLinear packs float32 CPU weights only")
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("a pre-packed linear layer is for inference only (no gradients)")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def prepack_linear_weights(module: nn.Module) -> int:
    """Replace every float32 CPU ``nn.Linear`` inside ``module`` by a `PackedLinear`. Returns how many.

    For frozen modules at inference on CPU (the image encoder, the LLM). Tied weights (an LM head sharing
    the input embeddings) get their own packed copy; the embedding keeps the original.
    """
    if not can_prepack():
        return 0
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


def optimize_for_cpu_inference(model: nn.Module) -> int:
    """Pre-pack the frozen parts of a BLIP-2 model on CPU (image encoder and LLM). Returns the layer count.

    Inference only: the packed layers release their original weights, so the model can no longer be
    trained or saved. A no-op (0) off CPU, for non-float32 weights, or without oneDNN.
    """
    count = 0
    for name in ("vision_model", "language_model"):
        part = getattr(model, name, None)
        if part is not None:
            count += prepack_linear_weights(part)
    return count
