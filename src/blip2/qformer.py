"""The Q-Former: a BERT-style transformer whose learned queries read image features.

One stack of layers serves three uses, chosen by the self-attention mask:

- queries alone (with cross-attention to the image): the image representation;
- text alone: the text representation (ITC's text side);
- queries + text together: ITM (bi-directional mask) and ITG (multimodal causal mask).

Query positions and text positions share each layer's self-attention but have their own feed-forward
blocks (``ffn_query`` / ``ffn_text``); only query positions cross-attend to the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import QFormerConfig
from blip2.layers import Attention, FeedForward, KVCache, additive_mask

# The image side of cross-attention: the features (B, P, Dv), or their keys/values per layer (None for
# layers without cross-attention), as `QFormer.image_kv` computes them once for several passes.
ImageInput = torch.Tensor | list[tuple[torch.Tensor, torch.Tensor] | None]


def image_batch_size(image: ImageInput) -> int:
    if isinstance(image, torch.Tensor):
        return image.shape[0]
    return next(kv[0].shape[0] for kv in image if kv is not None)


def select_image_kv(image_kv: list[tuple[torch.Tensor, torch.Tensor] | None], index: torch.Tensor) -> list:
    """Rows ``index`` of per-layer image keys/values."""
    return [None if kv is None else (kv[0][index], kv[1][index]) for kv in image_kv]


def cat_image_kv(*parts: list[tuple[torch.Tensor, torch.Tensor] | None]) -> list:
    """Concatenate per-layer image keys/values along the batch."""
    return [
        None if layer[0] is None else (torch.cat([kv[0] for kv in layer]), torch.cat([kv[1] for kv in layer]))
        for layer in zip(*parts, strict=True)
    ]


# --------------------------------------------------------------------------------------------------------
# Self-attention masks (boolean, True = may attend), over the sequence [queries (Q) | text (T)].
# --------------------------------------------------------------------------------------------------------


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM: every position sees every query and every real (non-pad) text token.  → (B, Q+T, Q+T)"""
    b, t = text_mask.shape
    keys = torch.cat([text_mask.new_ones(b, num_queries), text_mask], dim=1).bool()  # (B, Q+T)
    return keys[:, None, :].expand(-1, num_queries + t, -1)


def unimodal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITC: queries see only queries, text sees only (real) text.  → (B, Q+T, Q+T)"""
    b, t = text_mask.shape
    n = num_queries + t
    allowed = torch.zeros(b, n, n, dtype=torch.bool, device=text_mask.device)
    allowed[:, :num_queries, :num_queries] = True
    allowed[:, num_queries:, num_queries:] = text_mask.bool()[:, None, :]
    return allowed


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: queries see all queries and no text; text sees all queries and earlier (real) text.

    → (B, Q+T, Q+T)
    """
    b, t = text_mask.shape
    n = num_queries + t
    allowed = torch.zeros(b, n, n, dtype=torch.bool, device=text_mask.device)
    allowed[:, :, :num_queries] = True
    causal = torch.ones(t, t, dtype=torch.bool, device=text_mask.device).tril()
    allowed[:, num_queries:, num_queries:] = causal[None] & text_mask.bool()[:, None, :]
    return allowed


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings (BERT's, without token types)."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        t = input_ids.shape[1]
        if position_offset + t > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {position_offset + t} tokens exceeds the Q-Former's "
                f"{self.position_embeddings.num_embeddings} position embeddings; truncate it"
            )
        positions = torch.arange(position_offset, position_offset + t, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]  # (B, T, D)


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, has_cross_attention: bool) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.cross_attn = Attention(config, kv_dim=config.encoder_hidden_size) if has_cross_attention else None
        self.ffn_query = FeedForward(config)
        self.ffn_text = FeedForward(config) if config.use_text else None

    def forward(
        self,
        hidden: torch.Tensor,  # (B, L, D), the first `num_queries` positions are queries
        mask: torch.Tensor | None,  # additive (B, 1, L, Lpast + L)
        num_queries: int,
        image: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,  # (B, P, Dv) or this layer's (k, v)
        image_mask: torch.Tensor | None,  # additive (B, 1, Q, P) or None
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn, kv = self.self_attn(hidden, mask, past=past)
        parts = []
        if num_queries > 0:
            queries = attn[:, :num_queries]
            if self.cross_attn is not None:
                if image is None:
                    raise ValueError("image features are needed for the queries' cross-attention")
                queries, _ = self.cross_attn(queries, image_mask, context=image)
            parts.append(self.ffn_query(queries))
        if attn.shape[1] > num_queries:
            if self.ffn_text is None:
                raise ValueError("this Q-Former has no text side (use_text=False): it cannot take text input")
            parts.append(self.ffn_text(attn[:, num_queries:]))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out, kv


class LMHead(nn.Module):
    """BERT's prediction head: dense → GELU → LayerNorm → decoder (tied to the word embeddings) + bias."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), word_embeddings, self.bias)


class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config) if config.use_text else None
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        freq = config.cross_attention_frequency
        self.layers = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=(i % freq == 0)) for i in range(config.num_hidden_layers)
        )
        self.lm_head = LMHead(config) if config.use_text else None
        self.gradient_checkpointing = False

    def forward(
        self,
        query_embeds: torch.Tensor | None = None,  # (B, Q, D)
        input_ids: torch.Tensor | None = None,  # (B, T)
        allowed: torch.Tensor | None = None,  # boolean (B, L, Lpast + L) or None (all allowed)
        image_embeds: ImageInput | None = None,  # (B, P, Dv), or per-layer keys/values from `image_kv`
        image_attention_mask: torch.Tensor | None = None,  # (B, P) of 1/0, None = all real
        past: KVCache | None = None,
        text_position_offset: int = 0,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run the stack. Returns the hidden states (B, L, D) and the per-layer self-attention keys/values
        (including ``past``), which later calls may pass back as ``past`` (ITG, generation)."""
        pieces = []
        num_queries = 0
        if query_embeds is not None:
            pieces.append(query_embeds)
            num_queries = query_embeds.shape[1]
        if input_ids is not None:
            if self.embeddings is None:
                raise ValueError("this Q-Former has no text embeddings (use_text=False)")
            pieces.append(self.embeddings(input_ids, text_position_offset).to(self.layernorm.weight.dtype))
        if not pieces:
            raise ValueError("the Q-Former needs query embeddings, input ids or both")
        hidden = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        hidden = self.dropout(self.layernorm(hidden))  # (B, L, D)
        mask = None if allowed is None else additive_mask(allowed, hidden.dtype)
        image_mask = None
        if image_attention_mask is not None and num_queries:
            image_mask = additive_mask(
                image_attention_mask.bool()[:, None, :].expand(-1, num_queries, -1), hidden.dtype
            )
        new_past: KVCache = []
        for i, layer in enumerate(self.layers):
            layer_past = past[i] if past is not None else None
            image = image_embeds[i] if isinstance(image_embeds, list) else image_embeds
            if self.gradient_checkpointing and self.training:
                hidden, kv = torch.utils.checkpoint.checkpoint(
                    layer, hidden, mask, num_queries, image, image_mask, layer_past, use_reentrant=False
                )
            else:
                hidden, kv = layer(hidden, mask, num_queries, image, image_mask, layer_past)
            new_past.append(kv)
        return hidden, new_past

    def image_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Cross-attention keys/values of the image features for every layer (None where a layer has no
        cross-attention). Several passes over the same images (ITC and ITM in stage 1, ITM re-ranking of many
        texts) share them instead of projecting the image again each time."""
        return [
            None if layer.cross_attn is None else layer.cross_attn.project_kv(image_embeds) for layer in self.layers
        ]

    def lm_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """ITG logits over the BERT vocabulary for text hidden states (B, T, D) → (B, T, V)."""
        if self.lm_head is None or self.embeddings is None:
            raise ValueError("this Q-Former has no LM head (use_text=False)")
        return self.lm_head(text_hidden, self.embeddings.word_embeddings.weight)
