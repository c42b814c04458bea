"""Image transforms with PIL and torch only (no torchvision).

- `ImageProcessor`: evaluation / inference preprocessing, identical (to float rounding) to transformers'
  ``BlipImageProcessor`` as configured by the official BLIP-2 checkpoints: convert to RGB (alpha on white),
  bicubic resize to ``image_size × image_size`` (no aspect-preserving crop), scale by 1/255, normalise.
- `TrainTransform`: the BLIP-2 training augmentation (LAVIS ``blip2_image_train``): random resized crop
  (scale (0.5, 1.0), aspect ratio (3/4, 4/3), bicubic) then a random horizontal flip, then the same scaling
  and normalisation. Randomness comes from an explicit ``torch.Generator`` when one is given, so a dataset
  can derive one per (seed, epoch, index) and training is reproducible and resumable regardless of the
  number of DataLoader workers.

Horizontal flips swap left and right. Captions that say "to the left of" become wrong for a flipped image:
pass ``flip_text`` (e.g. `swap_left_right`) so the caption is flipped with the image, or ``hflip=False``.
The offline demo's synthetic scenes have positional captions and need one or the other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from blip2.data.images import to_rgb

if TYPE_CHECKING:
    from blip2.config import VisionConfig

__all__ = ["ImageProcessor", "TrainTransform", "CropBox", "swap_left_right", "transform_image"]

Triple = Sequence[float]
Texts = str | list[str] | None  # a caption, or texts that flip together (a question and its answers)


def _normalise(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB PIL image → normalised float32 tensor (3, H, W)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    pixels = pixels.permute(2, 0, 1).to(torch.float32) * (1.0 / 255.0)  # (3, H, W)
    return (pixels - mean) / std


def _stats(values: Triple, what: str) -> torch.Tensor:
    if len(values) != 3:
        raise ValueError(f"image {what} needs 3 values (R, G, B), got {len(values)}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32).view(3, 1, 1)


class ImageProcessor:
    """Evaluation preprocessing: images → (B, 3, image_size, image_size) float32."""

    def __init__(self, image_size: int, mean: Triple, std: Triple) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.mean = _stats(mean, "mean")
        self.std = _stats(std, "std")

    @classmethod
    def from_vision_config(cls, config: VisionConfig) -> ImageProcessor:
        return cls(config.image_size, config.image_mean, config.image_std)

    def process(self, image: Image.Image) -> torch.Tensor:
        """One image → (3, H, W)."""
        size = (self.image_size, self.image_size)
        resized = to_rgb(image).resize(size, resample=Image.Resampling.BICUBIC)
        return _normalise(resized, self.mean, self.std)

    def __call__(self, images: Sequence[Image.Image] | Image.Image) -> torch.Tensor:
        """A sequence of images (or one image) → (B, 3, H, W)."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self.process(image) for image in images])

    def __repr__(self) -> str:
        return f"ImageProcessor(image_size={self.image_size})"


@dataclass(frozen=True)
class CropBox:
    """A crop in pixel coordinates (top, left, height, width) and whether to flip it horizontally."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class TrainTransform:
    """Training augmentation: random resized crop + horizontal flip, then scale and normalise.

    Call it as ``transform(image, generator=g)`` for a tensor, or ``transform.apply(image, text, g)`` to also
    get the text (a caption, or a list such as a question and its answers) passed through ``flip_text`` when
    the image is flipped. Without a generator the global torch
    RNG is used (which DataLoader seeds differently in each worker).
    """

    def __init__(
        self,
        image_size: int,
        mean: Triple,
        std: Triple,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        flip_text: Callable[[str], str] | None = None,
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.image_size = int(image_size)
        self.mean = _stats(mean, "mean")
        self.std = _stats(std, "std")
        self.scale = scale
        self.ratio = ratio
        self.hflip = hflip
        self.flip_text = flip_text

    @classmethod
    def from_vision_config(cls, config: VisionConfig, **kwargs: Any) -> TrainTransform:
        return cls(config.image_size, config.image_mean, config.image_std, **kwargs)

    def sample_crop(self, width: int, height: int, generator: torch.Generator | None = None) -> CropBox:
        """Draw crop and flip parameters (torchvision's RandomResizedCrop algorithm, then the flip)."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        box: tuple[int, int, int, int] | None = None
        for _ in range(10):
            target_area = area * _uniform(self.scale[0], self.scale[1], generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = _randint(height - h + 1, generator)
                left = _randint(width - w + 1, generator)
                box = (top, left, h, w)
                break
        if box is None:  # fall back to a central crop with the closest allowed aspect ratio
            in_ratio = width / height
            if in_ratio < self.ratio[0]:
                w, h = width, round(width / self.ratio[0])
            elif in_ratio > self.ratio[1]:
                w, h = round(height * self.ratio[1]), height
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, max(h, 1), max(w, 1))
        flip = self.hflip and _uniform(0.0, 1.0, generator) < 0.5
        return CropBox(*box, flip=flip)

    def apply(
        self, image: Image.Image, text: Texts = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Texts]:
        """Augment ``image`` → ((3, H, W), text), the text(s) passed through ``flip_text`` if flipped."""
        image = to_rgb(image)
        crop = self.sample_crop(image.width, image.height, generator)
        region = (crop.left, crop.top, crop.left + crop.width, crop.top + crop.height)
        size = (self.image_size, self.image_size)
        out = image.crop(region).resize(size, resample=Image.Resampling.BICUBIC)
        if crop.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if text is not None and self.flip_text is not None:
                text = self.flip_text(text) if isinstance(text, str) else [self.flip_text(t) for t in text]
        return _normalise(out, self.mean, self.std), text

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(image, None, generator)[0]

    def __repr__(self) -> str:
        return (
            f"TrainTransform(image_size={self.image_size}, scale={self.scale}, hflip={self.hflip}, "
            f"flip_text={getattr(self.flip_text, '__name__', self.flip_text)})"
        )


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(0, high, (), generator=generator).item())


_LEFT_RIGHT = re.compile(r"\b(left|right)(s|most|ward|wards)?\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap "left" and "right" (also "leftmost", "rightward" ..., keeping case): the caption of a flipped image."""

    def swap(match: re.Match[str]) -> str:
        word, suffix = match.group(1), match.group(2) or ""
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            other = other.upper()
        elif word[0].isupper():
            other = other.capitalize()
        return other + suffix

    return _LEFT_RIGHT.sub(swap, text)


def transform_image(
    transform: Callable[..., Any] | None,
    image: Image.Image | torch.Tensor,
    text: Texts = None,
    generator: torch.Generator | None = None,
) -> tuple[Image.Image | torch.Tensor, Texts]:
    """Apply any of our transforms (or a plain callable) to one image, flipping the text when it must.

    Tensors pass through unchanged (already transformed); ``transform=None`` returns the image as is.
    """
    if transform is None or isinstance(image, torch.Tensor):
        return image, text
    if isinstance(transform, TrainTransform):
        return transform.apply(image, text, generator)
    if isinstance(transform, ImageProcessor):
        return transform.process(image), text
    return transform(image), text
