"""The demo's image encoder: pretrain its small ViT with a contrastive (CLIP-style) objective on the training
split, then freeze it.

No pretrained vision weights install offline, so the demo trains its own encoder before BLIP-2 touches it;
the README gives the measurement behind the choice (against a seeded random-init frozen ViT).

The image tower is the ViT with mean-pooled patch features and a linear head; the text tower is a word
embedding + one GRU layer over the caption's words (the scene vocabulary is a few dozen words); the loss is the
symmetric InfoNCE of CLIP with a learnable temperature. After training, only the ViT is kept (frozen) as the
BLIP-2 image encoder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


class WordGRUTextEncoder(nn.Module):
    """Captions → (B, E): word embeddings, one GRU layer, the last hidden state, a linear head."""

    def __init__(self, vocabulary: Sequence[str], width: int = 128, embed_dim: int = 128) -> None:
        super().__init__()
        self.index = {w: i + 1 for i, w in enumerate(sorted(set(vocabulary)))}  # 0 = padding / unknown
        self.embed = nn.Embedding(len(self.index) + 1, width, padding_idx=0)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, embed_dim)

    def encode_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [[self.index.get(w, 0) for w in _words(t)] or [0] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, L)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids, torch.tensor([len(r) for r in rows])

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        ids, lengths = self.encode_ids(texts)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        _, hidden = self.gru(packed)  # (1, B, W)
        return F.normalize(self.head(hidden[0]), dim=-1)  # (B, E)


class ImageTower(nn.Module):
    """ViT features (B, P, Dv) → mean over tokens → LayerNorm → linear → normalised (B, E)."""

    def __init__(self, vit: nn.Module, width: int, embed_dim: int = 128) -> None:
        super().__init__()
        self.vit = vit
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.vit(pixels)  # (B, P, Dv)
        return F.normalize(self.head(self.norm(feats.mean(dim=1))), dim=-1)


def pretrain_vit_contrastive(
    vit: nn.Module,
    pixels: torch.Tensor,  # (N, 3, H, W) preprocessed training images
    captions: Sequence[Sequence[str]],  # N lists of captions
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 10,
    min_lr: float = 1e-4,
    weight_decay: float = 0.05,
    seed: int = 0,
) -> list[float]:
    """Train ``vit`` in place with CLIP's loss on (image, random caption) pairs, AdamW with warm-up and cosine
    decay (`blip2.train.optim.lr_at`); return the loss per step. The ViT is left frozen (eval mode,
    ``requires_grad=False``) afterwards."""
    from blip2.train.optim import lr_at

    generator = torch.Generator().manual_seed(seed)
    width = int(getattr(vit, "hidden_size", pixels.shape[1]))
    vocabulary = [w for group in captions for c in group for w in _words(c)]
    torch.manual_seed(seed)
    image_tower = ImageTower(vit, width)
    text_tower = WordGRUTextEncoder(vocabulary)
    logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP
    vit.requires_grad_(True)
    vit.train()
    params = [*image_tower.parameters(), *text_tower.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, max_steps=steps) / lr
    )
    losses = []
    for _ in tqdm(range(steps), desc="contrastive ViT", leave=False):
        idx = torch.randint(len(captions), (batch_size,), generator=generator)
        texts = [captions[i][int(torch.randint(len(captions[i]), (1,), generator=generator))] for i in idx.tolist()]
        image_emb = image_tower(pixels[idx])  # (B, E)
        text_emb = text_tower(texts)  # (B, E)
        logits = logit_scale.exp().clamp(max=100) * image_emb @ text_emb.t()  # (B, B)
        # Identical captions in one batch are positives of each other's images too: soft targets.
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        targets = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t())) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    vit.eval()
    vit.requires_grad_(False)
    return losses
