"""Building blocks of the Q-Former: BERT-style (post-LayerNorm) attention and feed-forward blocks.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention`` with an explicit additive mask
(0 where attention is allowed, a large negative number where it is not), so a fully masked row never
produces NaNs and the numbers match the reference implementations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import QFormerConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (key, value), each (B, H, L, Dh)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" mask (B, Lq, Lk) → additive mask (B, 1, Lq, Lk) for SDPA."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head attention + output projection + dropout + residual + LayerNorm (BERT's post-LN block).

    Self-attention when ``context`` is None; cross-attention to ``context`` (image features) otherwise.
    """

    def __init__(self, config: QFormerConfig, kv_dim: int | None = None) -> None:
        super().__init__()
        d = config.hidden_size
        if d % config.num_attention_heads:
            raise ValueError(f"hidden_size {d} is not a multiple of num_attention_heads {config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_dim = d // config.num_attention_heads
        kv_dim = kv_dim or d
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_dim, d)
        self.value = nn.Linear(kv_dim, d)
        self.dense = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attn_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``source`` (B, Lk, Dkv). → ((B, H, Lk, Dh), (B, H, Lk, Dh))"""
        return self._heads(self.key(source)), self._heads(self.value(source))

    def forward(
        self,
        hidden: torch.Tensor,  # (B, Lq, D)
        mask: torch.Tensor | None = None,  # additive (B, 1, Lq, Lk) or None
        context: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,  # (B, Lk, Dkv) or its (k, v)
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``context`` may be given as keys/values already projected by `project_kv`: cross-attention to the
        same image from several passes (ITC, ITM, re-ranking many texts) then projects the image once."""
        q = self._heads(self.query(hidden))
        if isinstance(context, tuple):
            k, v = context
        else:
            k, v = self.project_kv(hidden if context is None else context)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if q.shape[0] != k.shape[0]:  # cached keys/values shared by a batch of expanded queries (beams)
            k = k.expand(q.shape[0], -1, -1, -1)
            v = v.expand(q.shape[0], -1, -1, -1)
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, Lq, Dh)
        out = out.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
        out = self.norm(self.dropout(self.dense(out)) + hidden)
        return out, (k, v)


class FeedForward(nn.Module):
    """BERT's intermediate + output block: Linear → GELU → Linear → dropout → residual → LayerNorm."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if config.hidden_act != "gelu":
            raise ValueError(f"unsupported Q-Former activation {config.hidden_act!r} (only 'gelu')")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.fc2(F.gelu(self.fc1(x)))) + x)
