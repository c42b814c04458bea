"""Frozen language models: building them, splicing the visual prompt in, and computing the losses.

The visual prompt (the projected query outputs, (B, Q, H)) enters the LLM through its input embeddings,
in one of two conventions:

- placeholders: ``input_ids`` contain ``image_token_index`` exactly Q times per row (the convention of the
  current hub configs); the prompt vectors replace those positions in order;
- prepending: ``input_ids`` contain no placeholder; the prompt is put in front and the attention mask grows
  by Q ones.

Stop token: one token ends every stage-2 training target and stops generation (`stop_token_id`, from
``LLMConfig.stop_token_id`` or the LLM config's EOS). `Blip2` writes it into the LLM's generation config when
it is built (`use_stop_token`), and the decoder-only stage-2 collator appends its id
(`blip2.data.collate.DecoderCollate`), so the two cannot disagree; e.g. BLIP-2's OPT models end captions
with "\n", as LAVIS trains and generates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import LLMConfig


def build_language_model(config: LLMConfig, pretrained: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen Hugging Face decoder-only (``kind='decoder'``) or encoder-decoder model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForCausalLM if config.kind == "decoder" else AutoModelForSeq2SeqLM
    if config.kind not in ("decoder", "encoder_decoder"):
        raise ValueError(f"unknown LLM kind {config.kind!r}; expected 'decoder' or 'encoder_decoder'")
    if pretrained:
        if not config.model_id:
            raise ValueError("LLMConfig.model_id is needed to load pretrained language model weights")
        if config.model_id.startswith("pip:"):
            raise ValueError(
                f"LLMConfig.model_id {config.model_id!r} names pip-installed weights: resolve it to a local path "
                "first with blip2.checkpoints.offline.resolve_offline(config)"
            )
        model = auto.from_pretrained(config.model_id, dtype=dtype or torch.float32)
    else:
        values = dict(config.hf_config)
        if "model_type" not in values:
            raise ValueError("LLMConfig.hf_config needs a 'model_type' (e.g. 'opt', 't5', 'gemma3_text')")
        hf_config = AutoConfig.for_model(**values)
        model = auto.from_config(hf_config, dtype=dtype or torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def stop_token_id(config: LLMConfig) -> int:
    """The token that ends stage-2 targets and stops generation: ``config.stop_token_id``, else the first EOS
    of ``hf_config``."""
    if config.stop_token_id is not None:
        return int(config.stop_token_id)
    eos = config.hf_config.get("eos_token_id")
    if isinstance(eos, list | tuple):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError("the LLM config names no stop token: set LLMConfig.stop_token_id (or hf_config eos_token_id)")
    return int(eos)


def generation_stop_ids(config: LLMConfig) -> list[int]:
    """The ids generation stops on: the stop token first, then any other EOS ``hf_config`` lists."""
    eos = config.hf_config.get("eos_token_id")
    others = list(eos) if isinstance(eos, list | tuple) else ([] if eos is None else [eos])
    return list(dict.fromkeys([stop_token_id(config), *(int(i) for i in others)]))


def use_stop_token(language_model: nn.Module, config: LLMConfig) -> None:
    """Make the LLM's ``generate`` stop on the stop token, whatever its own (e.g. pretrained) config says."""
    ids = generation_stop_ids(config)
    generation_config = getattr(language_model, "generation_config", None)
    if generation_config is not None:
        generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids


def splice_visual_prompt(
    input_embeds: torch.Tensor,  # (B, L, H) embeddings of input_ids
    input_ids: torch.Tensor,  # (B, L)
    attention_mask: torch.Tensor,  # (B, L)
    visual_prompt: torch.Tensor,  # (B, Q, H)
    image_token_index: int | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Put the visual prompt into the input embeddings.

    Returns (embeds (B, L', H), attention_mask (B, L'), offset) where ``offset`` is how many positions were
    prepended before ``input_ids`` (0 with placeholders, Q when prepending).
    """
    b, q, _ = visual_prompt.shape
    visual_prompt = visual_prompt.to(input_embeds.dtype)
    if image_token_index is not None:
        is_placeholder = input_ids == image_token_index  # (B, L)
        counts = is_placeholder.sum(dim=1)
        if bool((counts > 0).any()):
            if not bool((counts == q).all()):
                raise ValueError(
                    f"input_ids hold {counts.tolist()} image placeholder tokens per row; "
                    f"expected exactly num_query_tokens={q} (or none, to prepend the visual prompt)"
                )
            embeds = input_embeds.masked_scatter(is_placeholder[..., None], visual_prompt)
            return embeds, attention_mask, 0
    embeds = torch.cat([visual_prompt, input_embeds], dim=1)
    mask = torch.cat([attention_mask.new_ones(b, q), attention_mask], dim=1)
    return embeds, mask, q


def output_head(language_model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head applied to hidden states, with the final soft-capping some models (Gemma 2) use.

    The head is the model's whole head module where it has one (``lm_head``, or BERT's ``cls``): BERT- and
    RoBERTa-style decoders put a transform (dense, GELU, LayerNorm) before the output embeddings."""
    head = getattr(language_model, "lm_head", None)
    if not isinstance(head, nn.Module):
        head = getattr(language_model, "cls", None)
    if not isinstance(head, nn.Module):
        head = language_model.get_output_embeddings()
    logits = head(hidden)
    cap = getattr(language_model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def decoder_lm_loss(
    language_model: nn.Module,
    inputs_embeds: torch.Tensor,  # (B, L, H)
    attention_mask: torch.Tensor,  # (B, L)
    labels: torch.Tensor,  # (B, L): target token at each position's *own* index, -100 = ignored
    full_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal LM loss, computing logits only at the positions that predict a target token.

    Position i predicts labels[i + 1] (the usual shift). With ``full_logits`` the naive path is taken
    (logits for every position, then the loss), which gives the same loss and serves as the baseline.
    """
    targets = labels[:, 1:]  # (B, L-1)
    if full_logits:
        out = language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        logits = out.logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return loss, out.logits
    base = language_model.base_model
    hidden = base(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
    keep = targets != -100  # (B, L-1)
    selected = hidden[:, :-1][keep]  # (N, H)
    logits = output_head(language_model, selected).float()  # (N, V)
    loss = F.cross_entropy(logits, targets[keep])
    return loss, None
