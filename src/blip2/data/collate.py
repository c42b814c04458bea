"""Batching: images → one tensor, texts → token ids, skipped samples dropped and counted.

Tokenisation happens here (in DataLoader workers), never inside a model's forward().

Text layout of one sample, for a language-modelling loss on the target only::

    [special tokens] prompt part | target part [eos]

- ``prompt`` without ``{}`` is a prefix (LAVIS's captioning prompt, e.g. ``"a photo of "``); the sample's text is
  the target.
- ``prompt`` with ``{}`` is a template filled with the sample's text (e.g. ``"Question: {} Answer:"``); the
  target is ``target_separator + sample[target_key]`` when ``target_key`` is set (e.g. ``"answer"``), else
  nothing (an inference batch).
- ``append_eos`` adds ``tokenizer.eos_token`` after the target, so a decoder LLM learns to stop (stage-2
  training uses `DecoderCollate`, which ends each target with the LLM's stop token instead).
  Truncation at ``max_length`` can cut it off, as in the reference.

``target_mask`` (B, L) marks the tokens that belong to the target (and the appended EOS): the positions a
stage-2 LM loss should score. It is computed from character offsets, so it needs a fast tokenizer; tokens
that straddle the prompt/target boundary count as prompt.

The training stages' collators (used by `blip2.train.recipes` and the demo) build on it: `Stage1Collate` (BERT
text for ITC/ITM/ITG), `DecoderCollate` (stage 2, decoder-only LLM) and `PrefixLMCollate` (stage 2,
encoder-decoder LLM). Items may carry cached frozen features (P, Dv) under ``"image"``
(`blip2.data.feature_cache.CachedFeatureDataset`); they reach the model as ``image_features``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from PIL import Image

from blip2.data.datasets import SkippedSample
from blip2.data.transforms import transform_image

__all__ = ["DecoderCollate", "ImageTextCollator", "PrefixLMCollate", "Stage1Collate"]


class ImageTextCollator:
    """Collate dataset items (dicts from `blip2.data.datasets`) into a model batch.

    Returns ``{"pixel_values": (B, 3, H, W), "input_ids": (B, L), "attention_mask": (B, L),
    "target_mask": (B, L), "texts": [...], "image_ids": [...], "skipped": int, "skipped_files": [(path,
    reason), ...]}`` plus a list for each of ``keep_keys``. ``SkippedSample`` and ``None`` items are dropped
    and counted; if all are dropped, B is 0 and the training loop should skip the batch.

    Images that are still PIL are transformed with ``image_transform`` (the global torch RNG drives
    `TrainTransform` here: for augmentation reproducible per sample, give the dataset the transform and a
    seed instead).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        image_transform: Callable[..., Any] | None = None,
        prompt: str = "",
        append_eos: bool = False,
        padding_side: Literal["left", "right"] | None = None,
        target_key: str | None = None,
        target_separator: str = " ",
        add_special_tokens: bool = True,
        keep_keys: Sequence[str] = (),
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if tokenizer.pad_token is None:
            raise ValueError(
                "the tokenizer has no pad token; set one first (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        if append_eos and tokenizer.eos_token is None:
            raise ValueError("append_eos=True but the tokenizer has no eos_token")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if target_key is not None and "{}" not in prompt:
            raise ValueError("target_key needs a prompt template with '{}' for the sample's text")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_transform = image_transform
        self.prompt = prompt
        self.append_eos = append_eos
        self.padding_side = padding_side or tokenizer.padding_side
        self.target_key = target_key
        self.target_separator = target_separator
        self.add_special_tokens = add_special_tokens
        self.keep_keys = tuple(keep_keys)

    def split_text(self, text: str, target_value: str | None = None) -> tuple[str, str]:
        """(prompt part, target part) of one sample's sequence; ``target_value`` is ``sample[target_key]``."""
        if "{}" not in self.prompt:
            target = text
            prompt = self.prompt
        else:
            prompt = self.prompt.format(text)
            target = self.target_separator + target_value if target_value is not None else ""
        if self.append_eos:
            target += self.tokenizer.eos_token
        return prompt, target

    def __call__(self, samples: Sequence[Mapping[str, Any] | SkippedSample | None]) -> dict[str, Any]:
        kept = [s for s in samples if isinstance(s, Mapping)]
        skipped = [s for s in samples if not isinstance(s, Mapping)]
        skipped_files = [(s.path, s.reason) for s in skipped if isinstance(s, SkippedSample)]

        images: list[torch.Tensor] = []
        prompts: list[str] = []
        texts: list[str] = []
        for sample in kept:
            # The text and the target (e.g. a VQA answer) flip with the image when the transform flips it.
            raw = [str(sample["text"])] + ([str(sample[self.target_key])] if self.target_key else [])
            image, flipped = transform_image(self.image_transform, sample["image"], raw)
            if isinstance(image, Image.Image):
                raise TypeError("the collator got a PIL image and has no image_transform to turn it into a tensor")
            flipped = flipped if isinstance(flipped, list) else raw
            prompt, target = self.split_text(flipped[0], flipped[1] if self.target_key else None)
            images.append(image)
            prompts.append(prompt)
            texts.append(prompt + target)

        batch: dict[str, Any] = {
            "pixel_values": torch.stack(images) if images else self._empty_pixels(),
            **self._tokenize(prompts, texts),
            "texts": texts,
            "image_ids": [s["image_id"] for s in kept],
            "skipped": len(skipped),
            "skipped_files": skipped_files,
        }
        for key in self.keep_keys:
            batch[key] = [s.get(key) for s in kept]
        return batch

    def _tokenize(self, prompts: list[str], texts: list[str]) -> dict[str, torch.Tensor]:
        if not texts:
            empty = torch.zeros(0, 0, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty, "target_mask": empty}
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        encoded = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            padding_side=self.padding_side,
            add_special_tokens=self.add_special_tokens,
            return_offsets_mapping=fast,
            return_tensors="pt",
        )
        input_ids = encoded["input_ids"]  # (B, L)
        attention_mask = encoded["attention_mask"]  # (B, L)
        if fast:
            offsets = encoded["offset_mapping"]  # (B, L, 2) character spans; special tokens are (0, 0)
            prompt_chars = torch.tensor([len(p) for p in prompts]).unsqueeze(1)  # (B, 1)
            start, end = offsets[..., 0], offsets[..., 1]
            target_mask = (start >= prompt_chars) & (end > start) & attention_mask.bool()
        elif any(prompts) or self.target_key:
            raise ValueError("a prompt needs a fast tokenizer (character offsets) to build target_mask")
        else:  # no prompt: every real token except special ones is target text
            special = torch.tensor(
                [
                    self.tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
                    for ids in input_ids.tolist()
                ]
            )
            target_mask = attention_mask.bool() & ~special.bool()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask.long()}

    def _empty_pixels(self) -> torch.Tensor:
        size = getattr(self.image_transform, "image_size", 0)
        return torch.zeros(0, 3, size, size)


# ----------------------------------------------------------------------------------------------------------
# The training stages' batches
# ----------------------------------------------------------------------------------------------------------


def _features_key(batch: dict[str, Any]) -> None:
    """Cached features (B, P, Dv) arrive where pixels would; the model takes them as ``image_features``."""
    if batch["pixel_values"].dim() == 3:
        batch["image_features"] = batch.pop("pixel_values")


class Stage1Collate:
    """Stage 1: BERT tokenisation ([CLS] text [SEP], right padding); cached features become ``image_features``."""

    def __init__(self, tokenizer: Any, max_length: int = 32) -> None:
        self.inner = ImageTextCollator(tokenizer, max_length=max_length, padding_side="right")

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        batch = self.inner(samples)
        _features_key(batch)
        batch.pop("target_mask", None)
        return batch


class DecoderCollate:
    """Stage 2, decoder-only LLM: ``head_ids + prompt + caption + [stop]`` right-padded, labels on the caption
    and the stop token only.

    ``stop_id`` is the token generation stops on (`blip2.llm.stop_token_id`: "\\n" for BLIP-2's OPT, as in
    LAVIS; default the tokenizer's EOS), so the model learns to end where generation will end it.

    ``head_ids`` start every row: the LLM's BOS and the image placeholders where the model puts them at
    inference (`blip2.train.recipes.decoder_head_ids`), so the LLM sees in training the layout it sees when it
    captions or answers. The pieces are tokenised apart (no special tokens) and joined as ids; the caption
    follows a prompt after one space. ``max_length`` bounds the prompt, caption and EOS (the head is kept
    whole). Items are those of `ImageTextCollator` (pixels, or cached features); skipped ones are dropped and
    counted.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 32,
        prompt: str = "",
        head_ids: Sequence[int] = (),
        stop_id: int | None = None,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.stop_id = stop_id if stop_id is not None else tokenizer.eos_token_id
        if self.stop_id is None:
            raise ValueError("the LLM tokenizer has no eos_token and no stop token was given; stage 2 needs one")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.head_ids = list(head_ids)
        self.prompt_ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        self.space = " " if prompt else ""
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, caption: str) -> tuple[list[int], int]:
        """(token ids of one row, number of leading tokens outside the loss)."""
        target = self.tokenizer(self.space + caption, add_special_tokens=False)["input_ids"]
        text = (self.prompt_ids + target + [self.stop_id])[: self.max_length]
        return self.head_ids + text, len(self.head_ids) + len(self.prompt_ids)

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        kept = [s for s in samples if isinstance(s, Mapping)]
        skipped = [s for s in samples if not isinstance(s, Mapping)]
        images = [s["image"] for s in kept]
        if any(isinstance(image, Image.Image) for image in images):
            raise TypeError("DecoderCollate got a PIL image: give the dataset a transform (or cached features)")
        encoded = [self.encode(str(s["text"])) for s in kept]
        width = max((len(ids) for ids, _ in encoded), default=0)
        input_ids = torch.full((len(kept), width), self.pad, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(kept), width), dtype=torch.long)  # (B, L)
        labels = torch.full((len(kept), width), -100, dtype=torch.long)  # (B, L)
        for row, (ids, n_head) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, n_head : len(ids)] = torch.tensor(ids[n_head:])
        batch: dict[str, Any] = {
            "pixel_values": torch.stack(images) if images else torch.zeros(0, 3, 0, 0),  # (B, 3, H, W) | (B, P, Dv)
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "image_ids": [s.get("image_id") for s in kept],
            "skipped": len(skipped),
            "skipped_files": [(s.path, s.reason) for s in skipped if isinstance(s, SkippedSample)],
        }
        _features_key(batch)
        return batch


class PrefixLMCollate:
    """Stage 2, encoder-decoder LLM (prefix LM): each caption is split at a random word; the prefix goes
    with the visual prompt into the encoder, the suffix is the decoder's target."""

    def __init__(self, tokenizer: Any, max_length: int = 32, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.inner = ImageTextCollator(tokenizer, max_length=max_length, padding_side="right")
        self.rng = random.Random(seed)

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        kept = [s for s in samples if isinstance(s, Mapping)]
        prefixes, suffixes = [], []
        for s in kept:
            words = str(s["text"]).split()
            cut = self.rng.randint(0, max(0, len(words) - 1))  # the suffix keeps at least one word
            prefixes.append(" ".join(words[:cut]))
            suffixes.append(" ".join(words[cut:]))
        batch = self.inner([{**s, "text": p} for s, p in zip(kept, prefixes, strict=True)])
        _features_key(batch)
        batch.pop("target_mask", None)
        batch["skipped"] = len(samples) - len(kept)
        target = self.tokenizer(
            suffixes, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch["labels"] = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
        return batch
