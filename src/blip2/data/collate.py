"""Batching: images → one tensor, texts → token ids, skipped samples dropped and counted.

Tokenisation happens here (in DataLoader workers), never inside a model's forward().

Text layout of one sample, for a language-modelling loss on the target only::

    [special tokens] prompt part | target part [eos]

- ``prompt`` without ``{}`` is a prefix (LAVIS's captioning prompt, e.g. ``"a photo of "``); the sample's text is
  the target.
- ``prompt`` with ``{}`` is a template filled with the sample's text (e.g. ``"Question: {} Answer:"``); the
  target is ``target_separator + sample[target_key]`` when ``target_key`` is set (e.g. ``"answer"``), else
  nothing (an inference batch).
- ``append_eos`` adds ``eos_text`` (default ``tokenizer.eos_token``) after the target, so a decoder LLM learns
  to stop; stage 2 passes the text of the LLM's stop token (`blip2.llm.stop_text`), the one generation stops on.
  Truncation at ``max_length`` can cut it off, as in the reference.

``target_mask`` (B, L) marks the tokens that belong to the target (and the appended EOS): the positions a
stage-2 LM loss should score. It is computed from character offsets, so it needs a fast tokenizer; tokens
that straddle the prompt/target boundary count as prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from PIL import Image

from blip2.data.datasets import SkippedSample
from blip2.data.transforms import transform_image

__all__ = ["ImageTextCollator"]


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
        eos_text: str | None = None,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if tokenizer.pad_token is None:
            raise ValueError(
                "the tokenizer has no pad token; set one first (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        if append_eos and eos_text is None and tokenizer.eos_token is None:
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
        self.eos_text = eos_text if eos_text is not None else tokenizer.eos_token
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
            target += self.eos_text
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
