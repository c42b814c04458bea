"""CapFilt bootstrapping, as the BLIP-2 paper prepares its 129M pretraining images (section 3.4, after BLIP):
sample N captions per image with nucleus sampling, rank them together with the original web text by
image-text similarity, keep the top K (the paper: K=2, ranked by CLIP ViT-L/14; here a stage-1 BLIP-2
Q-Former's ITC similarity, optionally re-ranked by its ITM head as BLIP's filter does).

Candidates are seeded per image (from ``seed`` and the image's key), so a rerun, a resumed run or another
number of processes samples the same candidates for the same image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

from blip2.caption.sources import Item
from blip2.inference.tasks import caption_pixels, processor_for, qformer_text_ids

Rerank = Literal["itc", "itm"]
# LAVIS's nucleus-sampling settings for BLIP-2 captions (blip2_opt.generate with use_nucleus_sampling)
SAMPLING = {"do_sample": True, "top_p": 0.9, "num_beams": 1}


def image_seed(seed: int, key: str) -> int:
    """A seed that depends only on ``seed`` and the image's key."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class CapFilt:
    scorer: Any  # a stage-1 `blip2.model.Blip2QFormer` (ITC features and the ITM head)
    candidates: int = 5
    keep: int = 2
    rerank: Rerank = "itc"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.keep < 1:
            raise ValueError(f"--candidates and --keep must be at least 1 (got {self.candidates}, {self.keep})")
        if self.rerank not in ("itc", "itm"):
            raise ValueError(f"--rerank must be 'itc' or 'itm', got {self.rerank!r}")
        if not hasattr(self.scorer, "itm_logits") or hasattr(self.scorer, "language_model"):
            raise ValueError("the --scorer must be a stage-1 model (Blip2QFormer, with ITC and ITM heads)")

    def check_inputs(self, model: Any) -> None:
        """The scorer reads the captioner's pixels: both must preprocess images the same way."""
        ours, theirs = processor_for(model), processor_for(self.scorer)
        same_stats = torch.equal(ours.mean, theirs.mean) and torch.equal(ours.std, theirs.std)
        if ours.image_size != theirs.image_size or not same_stats:
            raise ValueError(
                f"the scorer preprocesses images as {theirs}, the captioner as {ours}: use a pair that match"
            )

    @torch.no_grad()
    def sample(
        self, model: Any, item: Item, pixels: torch.Tensor, prompt: str | None, generation: dict[str, Any]
    ) -> list[str]:
        """``candidates`` sampled captions of one image (pixels (1, 3, H, W)), distinct, seeded by its key."""
        kwargs = {**generation, **SAMPLING, "num_return_sequences": self.candidates}
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(image_seed(self.seed, item.key))
            texts = caption_pixels(model, pixels, prompt, **kwargs)
        return list(dict.fromkeys(t for t in texts if t))

    @torch.no_grad()
    def scores(self, pixels: torch.Tensor, owner: list[int], texts: list[str]) -> torch.Tensor:
        """Similarity of each text with its image (``owner[t]`` indexes ``pixels`` (B, 3, H, W)). → (T,)"""
        scorer = self.scorer
        pixels = pixels.to(scorer.device)
        rows = torch.tensor(owner, device=scorer.device)
        image_embeds = scorer.encode_image(pixels)  # (B, P, D)
        ids, mask = qformer_text_ids(scorer, texts)
        if self.rerank == "itm":  # probability of "match", as BLIP's filter
            return scorer.itm_logits(image_embeds[rows], ids, mask).float().softmax(dim=-1)[:, 1]
        image_feats = scorer.image_embeddings(image_embeds)[0]  # (B, Q, E), normalised
        text_feats = scorer.text_embeddings(ids, mask)  # (T, E), normalised
        return torch.einsum("tqe,te->tq", image_feats[rows], text_feats).max(dim=1).values.float()

    def bootstrap(
        self, model: Any, items: list[Item], pixels: torch.Tensor, prompt: str | None, generation: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """One record per image: the top ``keep`` of its candidates and its original text, with scores."""
        texts: list[str] = []
        owner: list[int] = []
        sources: list[str] = []
        for i, item in enumerate(items):
            generated = self.sample(model, item, pixels[i : i + 1], prompt, generation)
            for text, source in [*((t, "generated") for t in generated), (item.text, "web")]:
                if text:
                    texts.append(text)
                    owner.append(i)
                    sources.append(source)
        scores = self.scores(pixels, owner, texts).tolist() if texts else []
        records = []
        for i, item in enumerate(items):
            mine = sorted((j for j in range(len(texts)) if owner[j] == i), key=lambda j: -scores[j])[: self.keep]
            record: dict[str, Any] = {
                "image": item.key,
                "captions": [texts[j] for j in mine],
                "scores": [round(scores[j], 6) for j in mine],
                "sources": [sources[j] for j in mine],
                "scored_by": self.rerank,
            }
            if item.text is not None:
                record["text"] = item.text
            records.append(record)
        return records
