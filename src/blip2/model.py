"""The two BLIP-2 models: tensors in, tensors out (no tokenisation or file I/O inside forward).

- `Blip2QFormer`: stage 1 (ITC + ITM + ITG on a frozen image encoder), retrieval and feature extraction.
- `Blip2`: stage 2 and inference (Q-Former + projection + frozen LLM), captioning and zero-shot VQA.

Both share the image side (`_ImageQueryModel`): frozen encoder → ``ln_vision`` → Q-Former queries.
Attribute names follow transformers' port (``vision_model``, ``query_tokens``, ``qformer``,
``language_projection``, ``language_model``) so checkpoint maps stay short.

(A little over the project's 500-line guide on purpose: the two models share their image side and their
stage-1/stage-2 split is easiest to follow side by side, as in the paper's Figure 2 and 3.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip2 import losses
from blip2.config import VQA_PROMPT, Blip2Config
from blip2.inference.fast import expansion_factor, prefix_cached_generate
from blip2.layers import KVCache
from blip2.llm import build_language_model, decoder_lm_loss, splice_visual_prompt, use_stop_token
from blip2.qformer import (
    ImageInput,
    QFormer,
    bidirectional_mask,
    cat_image_kv,
    image_batch_size,
    multimodal_causal_mask,
)
from blip2.vision import build_vision_encoder


@dataclass
class Blip2Output:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


def _init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation for newly created Q-Former parts (normal(0, 0.02), zero bias, unit LayerNorm)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _text_mask(input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The attention mask of ``input_ids`` (all ones when not given); text is required."""
    if input_ids is None:
        raise ValueError("input_ids (the tokenised texts) are required")
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask


class _ImageQueryModel(nn.Module):
    """Frozen image encoder + ln_vision + learned queries + Q-Former (the part both stages share)."""

    def __init__(self, config: Blip2Config, pretrained_vision: bool = False) -> None:
        super().__init__()
        self.config = config
        vcfg = config.vision
        if config.qformer.encoder_hidden_size != vcfg.hidden_size:
            raise ValueError(
                f"Q-Former cross-attends to {config.qformer.encoder_hidden_size}-d features but the image "
                f"encoder gives {vcfg.hidden_size}-d ones"
            )
        self.vision_model = build_vision_encoder(vcfg, pretrained=pretrained_vision)
        eps = float(vcfg.hf_config.get("layer_norm_eps", 1e-5)) if vcfg.kind == "blip2" else 1e-5
        eps = vcfg.ln_vision_eps if vcfg.ln_vision_eps is not None else eps
        self.ln_vision = nn.LayerNorm(vcfg.hidden_size, eps=eps)
        q = config.qformer
        self.query_tokens = nn.Parameter(torch.zeros(1, q.num_query_tokens, q.hidden_size))
        self.qformer = QFormer(q)
        _init_weights(self.qformer)
        nn.init.normal_(self.query_tokens, std=0.02)
        self.tokenizer: Any = None  # set by from_pretrained / the caller; used by the inference helpers
        self.image_processor: Any = None

    def train(self, mode: bool = True) -> _ImageQueryModel:
        super().train(mode)
        self.vision_model.eval()  # frozen: always in eval mode
        return self

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's features (B, P, Dv), before ln_vision: what the feature cache stores."""
        with torch.no_grad():
            dtype = next(self.vision_model.parameters()).dtype
            return self.vision_model(pixel_values.to(self.device, dtype))

    def encode_image(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image embeddings the queries cross-attend to: ln_vision(frozen features).  → (B, P, Dv)"""
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or precomputed image_features")
            image_features = self.image_features(pixel_values)
        return self.ln_vision(image_features.to(self.ln_vision.weight.dtype))

    def query_output(self, image_embeds: ImageInput) -> tuple[torch.Tensor, KVCache]:
        """The queries after reading the image: (B, Q, D), plus their self-attention keys/values."""
        queries = self.query_tokens.expand(image_batch_size(image_embeds), -1, -1)
        return self.qformer(query_embeds=queries, image_embeds=image_embeds)

    def gradient_checkpointing_enable(self) -> None:
        self.qformer.gradient_checkpointing = True

    # Loading and saving live in blip2.checkpoints (loading: every source format; ours: this project's
    # directory format); these are the entry points.
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, **kwargs: Any) -> Any:
        from blip2.checkpoints.loading import load_model

        return load_model(cls, path_or_id, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        from blip2.checkpoints.ours import save_model

        save_model(self, directory)


class Blip2QFormer(_ImageQueryModel):
    """Stage 1: the Q-Former trained on a frozen image encoder with ITC, ITM and ITG; retrieval."""

    def __init__(self, config: Blip2Config, pretrained_vision: bool = False) -> None:
        if not config.qformer.use_text:
            raise ValueError("Blip2QFormer needs a Q-Former with its text side (QFormerConfig.use_text=True)")
        super().__init__(config, pretrained_vision=pretrained_vision)
        q = config.qformer
        self.vision_projection = nn.Linear(q.hidden_size, q.embed_dim)
        self.text_projection = nn.Linear(q.hidden_size, q.embed_dim)
        self.itm_head = nn.Linear(q.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        # ITC: gather the other side's features with gradient (both terms train both towers) or without
        # (the authors' code; each term trains one tower). See `blip2.losses.itc_loss`.
        self.itc_gather_grad = False
        # Training: clamp temp into [low, high] before each forward (BLIP-1's rule); None: never (LAVIS BLIP-2).
        self.temp_clamp: tuple[float, float] | None = (0.001, 0.5)
        _init_weights(self.vision_projection)
        _init_weights(self.text_projection)
        _init_weights(self.itm_head)

    # ---------------------------------------------------------------- features
    def image_embeddings(self, image_embeds: ImageInput) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """(normalised ITC features (B, Q, E), query output (B, Q, D), query keys/values)."""
        query_output, past = self.query_output(image_embeds)
        feats = F.normalize(self.vision_projection(query_output), dim=-1)
        return feats, query_output, past

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised ITC text features from the [CLS] output of a text-only pass. → (B, E)"""
        t = input_ids.shape[1]
        allowed = attention_mask.bool()[:, None, :].expand(-1, t, -1)
        hidden, _ = self.qformer(input_ids=input_ids, allowed=allowed)
        return F.normalize(self.text_projection(hidden[:, 0]), dim=-1)

    def multimodal_embeddings(
        self, image_embeds: ImageInput, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Query outputs of a joint pass with the text (bi-directional mask). → (B, Q, D)"""
        q = self.query_tokens.shape[1]
        queries = self.query_tokens.expand(image_batch_size(image_embeds), -1, -1)
        hidden, _ = self.qformer(
            query_embeds=queries,
            input_ids=input_ids,
            allowed=bidirectional_mask(q, attention_mask),
            image_embeds=image_embeds,
        )
        return hidden[:, :q]

    def itm_logits(
        self, image_embeds: ImageInput, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """ITM head on each query output of the joint pass, averaged over queries. → (B, 2)"""
        return self.itm_head(self.multimodal_embeddings(image_embeds, input_ids, attention_mask)).mean(dim=1)

    # ---------------------------------------------------------------- inference entry points
    @torch.no_grad()
    def forward_itc(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-text similarity (max over queries, no temperature). → (B_img, B_txt)"""
        attention_mask = _text_mask(input_ids, attention_mask)
        feats, _, _ = self.image_embeddings(self.encode_image(pixel_values, image_features))
        return losses.itc_similarities(feats, self.text_embeddings(input_ids, attention_mask))[0]  # type: ignore[arg-type]

    @torch.no_grad()
    def forward_itm(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-text matching logits for aligned (image, text) pairs. → (B, 2)"""
        attention_mask = _text_mask(input_ids, attention_mask)
        return self.itm_logits(self.encode_image(pixel_values, image_features), input_ids, attention_mask)

    def caption(
        self, images: Any, batch_size: int = 8, prompt: str | None = None, **generation_kwargs: Any
    ) -> list[str]:
        """Captions from the Q-Former's own text decoder (ITG). ``prompt`` is not supported here."""
        from blip2.inference.tasks import pixel_values

        if prompt:
            raise ValueError("a stage-1 model captions without a prompt (its decoder starts from [DEC])")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; set model.tokenizer or load it from a directory")
        images = list(images) if isinstance(images, list | tuple) else [images]
        kwargs = {"num_beams": 3, "max_new_tokens": 30, "min_new_tokens": 3} | generation_kwargs
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            tokens = self.generate(pixel_values=pixel_values(self, images[start : start + batch_size]), **kwargs)
            out.extend(t.strip() for t in self.tokenizer.batch_decode(tokens[:, 1:], skip_special_tokens=True))
        return out

    def retrieve(self, images: Any, texts: Any, k: int = 16, **kwargs: Any) -> dict[str, Any]:
        """ITC shortlist of k candidates, ITM re-rank; see `blip2.inference.tasks.retrieve`."""
        from blip2.inference.tasks import retrieve

        return retrieve(self, images, texts, k=k, **kwargs)

    def extract_features(self, images: Any = None, texts: Any = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Image, text and multimodal embeddings; see `blip2.inference.tasks.extract_features`."""
        from blip2.inference.tasks import extract_features

        return extract_features(self, images=images, texts=texts, **kwargs)

    # ---------------------------------------------------------------- stage-1 training
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T), starting with [CLS]
        attention_mask: torch.Tensor,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (B, 3, H, W)
        image_features: torch.Tensor | None = None,  # (B, P, Dv) from the feature cache
        generator: torch.Generator | None = None,
        **_: Any,
    ) -> Blip2Output:
        """All three stage-1 losses on one batch: ITC + ITM + ITG.

        ``losses`` also holds ``itm_skipped``: 1 when the global batch held a single sample (the others were
        unreadable), so ITM had no negative and was left out of this step, else 0.
        """
        image_embeds = self.encode_image(pixel_values, image_features)  # (B, P, Dv)
        b = image_embeds.shape[0]
        q = self.query_tokens.shape[1]
        if self.temp_clamp is not None:
            with torch.no_grad():
                self.temp.clamp_(*self.temp_clamp)

        # ITC: queries alone and text alone (the uni-modal mask, as two passes)
        image_kv = self.qformer.image_kv(image_embeds)  # cross-attention keys/values, shared by ITC and ITM
        image_feats, _, query_past = self.image_embeddings(image_kv)  # (B, Q, E)
        text_feats = self.text_embeddings(input_ids, attention_mask)  # (B, E)
        sizes = losses.batch_sizes(b, image_embeds.device)  # per rank: they differ when images were dropped
        loss_itc, sim_i2t, sim_t2i = losses.itc_loss(
            image_feats, text_feats, self.temp, sizes=sizes, gather_grad=self.itc_gather_grad
        )
        if sum(sizes) > 1:
            sims = (sim_i2t.detach(), sim_t2i.detach())
            loss_itm = self._itm_loss(image_embeds, image_kv, input_ids, attention_mask, sims, sizes, generator)
            itm_skipped = torch.zeros((), device=image_embeds.device)
        else:
            # One readable sample in the whole (global) batch: no negative to mine. Every rank sees the same
            # global size, so all skip together; the loss part is 0 without gradient, and the count is logged.
            loss_itm = torch.zeros((), device=image_embeds.device)
            itm_skipped = torch.ones((), device=image_embeds.device)

        # ITG: [DEC] replaces [CLS]; text attends to the queries' keys/values and to earlier text
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.config.qformer.bos_token_id
        labels = dec_ids.masked_fill(attention_mask == 0, -100)
        allowed = multimodal_causal_mask(q, attention_mask)[:, q:]  # (B, T, Q+T): the text rows
        text_hidden, _ = self.qformer(input_ids=dec_ids, allowed=allowed, past=query_past)
        loss_lm = losses.lm_loss(self.qformer.lm_logits(text_hidden), labels, label_smoothing=0.1)

        loss = loss_itc + loss_itm + loss_lm
        parts = {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm, "itm_skipped": itm_skipped}
        return Blip2Output(loss=loss, losses=parts)

    def _itm_loss(
        self,
        image_embeds: torch.Tensor,  # (B, P, Dv) this rank's
        image_kv: ImageInput,  # their cross-attention keys/values
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        sims: tuple[torch.Tensor, torch.Tensor],  # ITC (sim_i2t, sim_t2i), each (B, Bg), detached
        sizes: list[int],  # every rank's batch size
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """ITM with one hard negative text per image and one hard negative image per text (global batch)."""
        b = image_embeds.shape[0]
        pad = self.config.qformer.pad_token_id
        start = losses.rank_offset(sizes)  # this rank's first row in the global batch
        image_embeds_all = losses.all_gather_with_grad(image_embeds, sizes)  # (Bg, P, Dv)
        ids_all = losses.all_gather_padded(input_ids, pad, sizes)  # (Bg, Tmax)
        mask_all = losses.all_gather_padded(attention_mask, 0, sizes)
        neg_image = losses.sample_hard_negatives(sims[1], offset=start, generator=generator)  # (B,)
        neg_text = losses.sample_hard_negatives(sims[0], offset=start, generator=generator)  # (B,)
        neg_kv = self.qformer.image_kv(image_embeds_all[neg_image])  # only the negatives need projecting
        itm_images = cat_image_kv(image_kv, neg_kv, image_kv)  # images of [positives | neg image | neg text]
        width = ids_all.shape[1]  # this rank's texts padded to the global width
        own_ids = F.pad(input_ids, (0, width - input_ids.shape[1]), value=pad)
        own_mask = F.pad(attention_mask, (0, width - attention_mask.shape[1]), value=0)
        itm_ids = torch.cat([own_ids, own_ids, ids_all[neg_text]])  # (3B, T)
        itm_mask = torch.cat([own_mask, own_mask, mask_all[neg_text]])
        return losses.itm_loss(self.itm_logits(itm_images, itm_ids, itm_mask), b)

    # ---------------------------------------------------------------- ITG captioning
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        max_new_tokens: int = 30,
        min_new_tokens: int = 0,
        num_beams: int = 1,
    ) -> torch.Tensor:
        """Image-grounded text generation with the Q-Former's LM head (greedy or beam search, KV cache).

        Returns token ids (B, L) starting with [DEC]; stops at [SEP].
        """
        from blip2.inference.beam_search import beam_search

        image_embeds = self.encode_image(pixel_values, image_features)
        _, query_past = self.query_output(image_embeds)
        b = image_embeds.shape[0]
        q = self.query_tokens.shape[1]
        cfg = self.config.qformer

        def step(tokens: torch.Tensor, past: Any, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
            # tokens (N, t) new tokens; past: (cache, text_len); rows: which image each hypothesis belongs to
            cache, text_len = past
            if cache is None:
                cache = [(k[rows], v[rows]) for k, v in query_past]
            n, t = tokens.shape
            allowed = torch.ones(n, t, q + text_len + t, dtype=torch.bool, device=tokens.device)
            allowed[:, :, q + text_len :] = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
            hidden, cache = self.qformer(input_ids=tokens, allowed=allowed, past=cache, text_position_offset=text_len)
            logits = self.qformer.lm_logits(hidden[:, -1])  # (N, V)
            return logits, (cache, text_len + t)

        start = torch.full((b, 1), cfg.bos_token_id, dtype=torch.long, device=self.device)
        return beam_search(
            step,
            start,
            init_past=(None, 0),
            reorder=lambda past, idx: ([(k[idx], v[idx]) for k, v in past[0]], past[1]),
            eos_token_id=cfg.sep_token_id,
            pad_token_id=cfg.pad_token_id,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            num_beams=num_beams,
        )


class Blip2(_ImageQueryModel):
    """Stage 2 and inference: queries → Linear → soft visual prompt of a frozen LLM."""

    def __init__(self, config: Blip2Config, pretrained_vision: bool = False, pretrained_llm: bool = False) -> None:
        if config.llm is None:
            raise ValueError("Blip2 needs an LLM config (Blip2Config.llm); use Blip2QFormer for stage 1")
        super().__init__(config, pretrained_vision=pretrained_vision)
        self.language_model = build_language_model(config.llm, pretrained=pretrained_llm)
        use_stop_token(self.language_model, config.llm)  # generation stops where training targets end
        llm_width = self.language_model.get_input_embeddings().weight.shape[1]
        self.language_projection = nn.Linear(config.qformer.hidden_size, llm_width)
        _init_weights(self.language_projection)
        # True: the frozen LLM follows train()/eval() like the rest (dropout active in training, as in LAVIS);
        # False: always in eval mode.
        self.frozen_llm_train_mode = False

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.language_model.config.is_encoder_decoder)

    def train(self, mode: bool = True) -> Blip2:
        super().train(mode)
        if not self.frozen_llm_train_mode:
            self.language_model.eval()  # frozen: no dropout
        return self

    def visual_prompt(
        self, pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected query outputs in the LLM's embedding space. → (B, Q, H)"""
        query_output, _ = self.query_output(self.encode_image(pixel_values, image_features))
        return self.language_projection(query_output)

    def _llm_inputs(
        self, visual_prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, H)
        return splice_visual_prompt(embeds, input_ids, attention_mask, visual_prompt, self.config.llm.image_token_index)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L) prompt/text (decoder-only) or encoder prefix (encoder-decoder)
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # decoder-only: aligned with input_ids; enc-dec: decoder targets
        image_features: torch.Tensor | None = None,
        full_logits: bool = False,
        **_: Any,
    ) -> Blip2Output:
        """Logits (and the loss when ``labels`` are given).

        Decoder-only: ``logits`` cover the positions of ``input_ids`` (placeholders included, as
        transformers returns them). With ``labels`` the loss is computed from logits at target positions
        only and ``logits`` is None, unless ``full_logits`` (the naive path) is asked for.
        Encoder-decoder: prefix-LM; ``labels`` are the decoder targets (the suffix text).
        """
        prompt = self.visual_prompt(pixel_values, image_features)
        embeds, mask, offset = self._llm_inputs(prompt, input_ids, attention_mask)
        if self.is_encoder_decoder:
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
            )
            return Blip2Output(
                loss=out.loss, logits=out.logits, losses={"loss_lm": out.loss} if labels is not None else {}
            )
        if labels is None:
            logits = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits
            return Blip2Output(logits=logits[:, offset:])
        if offset:
            labels = torch.cat([labels.new_full((labels.shape[0], offset), -100), labels], dim=1)
        loss, logits = decoder_lm_loss(self.language_model, embeds, mask, labels, full_logits=full_logits)
        if logits is not None:
            logits = logits[:, offset:]
        return Blip2Output(loss=loss, logits=logits, losses={"loss_lm": loss})

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        visual_prompt: torch.Tensor | None = None,
        prefix_cache: bool = True,
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        """Token ids from the LLM conditioned on the image (and the prompt ``input_ids``).

        As transformers does: decoder-only models return the prompt ``input_ids`` followed by the new
        tokens; encoder-decoder models return the decoder's tokens. Without ``input_ids`` the prompt is
        the visual prompt followed by BOS (decoder-only; BOS first with ``LLMConfig.visual_prompt_after_bos``)
        or the visual prompt alone (encoder-decoder).
        ``visual_prompt`` (B, Q, H) may be given instead of the image, when it was computed once and reused.
        ``prefix_cache`` (decoder-only): run the prompt through the LLM once per row and copy its cache to the
        beams instead of running it once per beam (`blip2.inference.fast`; same tokens, less work).
        """
        prompt = visual_prompt if visual_prompt is not None else self.visual_prompt(pixel_values, image_features)
        b, q, _ = prompt.shape
        llm_cfg = self.config.llm
        assert llm_cfg is not None
        if input_ids is None:
            start: list[int] = []
            if llm_cfg.image_token_index is not None:
                start = [llm_cfg.image_token_index] * q
            bos = getattr(self.language_model.config, "bos_token_id", None)
            if not self.is_encoder_decoder and bos is not None:
                start = [bos, *start] if llm_cfg.visual_prompt_after_bos else [*start, bos]
            if not start:  # encoder-decoder with prepending and no prompt: the encoder sees the queries only
                embeds = prompt.to(self.language_model.get_input_embeddings().weight.dtype)
                mask = torch.ones(b, q, dtype=torch.long, device=prompt.device)
                return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generation_kwargs)
            input_ids = torch.tensor([start], dtype=torch.long, device=prompt.device).repeat(b, 1)
        embeds, mask, offset = self._llm_inputs(prompt, input_ids, attention_mask)
        if self.is_encoder_decoder:
            return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generation_kwargs)
        expand = expansion_factor(self.language_model, generation_kwargs) if prefix_cache else None
        if expand is not None and input_ids.shape[1] > 0 and self._last_is_text(input_ids):
            # the prompt's first L-1 positions run once per row, not once per beam (same tokens)
            llm_ids = input_ids
            if offset:  # prepended: stand-in ids for the visual prompt's positions (cached, never embedded)
                llm_ids = torch.cat([input_ids.new_zeros(b, offset), input_ids], dim=1)
            out = prefix_cached_generate(self.language_model, llm_ids, embeds, mask, expand, **generation_kwargs)
            return torch.cat([input_ids.repeat_interleave(out.shape[0] // b, dim=0), out[:, llm_ids.shape[1] :]], 1)
        if offset:  # prepended: transformers cannot align input_ids with the longer embeddings
            new = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generation_kwargs)
            return torch.cat([input_ids, new], dim=1)
        return self.language_model.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, **generation_kwargs
        )

    def _last_is_text(self, input_ids: torch.Tensor) -> bool:
        """The last prompt position is an ordinary token (not a visual-prompt placeholder) in every row."""
        image_token = self.config.llm.image_token_index if self.config.llm is not None else None
        return image_token is None or not bool((input_ids[:, -1] == image_token).any())

    # ---------------------------------------------------------------- convenience (PIL images or paths)
    def caption(
        self, images: Any, prompt: str | None = None, batch_size: int = 8, **generation_kwargs: Any
    ) -> list[str]:
        from blip2.inference.tasks import caption

        return caption(self, images, prompt=prompt, batch_size=batch_size, **generation_kwargs)

    def answer(
        self,
        images: Any,
        questions: Any,
        prompt_template: str = VQA_PROMPT,
        batch_size: int = 8,
        **generation_kwargs: Any,
    ) -> list[str]:
        from blip2.inference.tasks import answer

        return answer(
            self, images, questions, prompt_template=prompt_template, batch_size=batch_size, **generation_kwargs
        )
