"""What a dataset looks like on disk → a deterministic list of `Item` s, and their decoding in workers.

Inputs: a folder (recursive), a glob pattern, a ``.txt`` list of paths (one a line), or an annotation file
(``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv``) with an image column and optionally a text column (the web
alt-text, scored by CapFilt). The order is fixed (sorted folder walk, sorted glob, file order), so every
process of a multi-process run splits the same list the same way.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from blip2.data.datasets import read_annotations
from blip2.data.images import ImageError, load_image
from blip2.data.transforms import ImageProcessor

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
ANNOTATION_SUFFIXES = frozenset({".jsonl", ".json", ".csv", ".tsv"})


@dataclass(frozen=True)
class Item:
    """One image to caption: ``key`` is written to the output ("image"); ``path`` is where it is read."""

    index: int  # position in the whole input: the rank split and the seeds use it
    key: str
    path: str
    text: str | None = None  # the original (web) text, if the input has one


def list_items(
    source: str,
    image_column: str = "image",
    text_column: str | None = None,
    image_root: str | None = None,
) -> list[Item]:
    """The images of ``source`` in a fixed order, each once (repeated keys are dropped)."""
    path = Path(source)
    if path.is_dir():
        root = path if image_root is None else Path(image_root)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        pairs = [(str(p.relative_to(path)), str(root / p.relative_to(path)), None) for p in files]
    elif path.is_file() and path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        pairs = [(line.strip(), _under(image_root, line.strip()), None) for line in lines if line.strip()]
    elif path.is_file() and path.suffix.lower() in ANNOTATION_SUFFIXES:
        pairs = [_from_record(r, image_column, text_column, image_root) for r in read_annotations(path, image_column)]
    elif glob.has_magic(source):
        pairs = [(p, _under(image_root, p), None) for p in sorted(glob.glob(source, recursive=True))]
        pairs = [p for p in pairs if Path(p[1]).suffix.lower() in IMAGE_SUFFIXES]
    elif path.exists():
        raise ValueError(f"'{source}' is not a folder, glob, .txt list or annotation file (.jsonl/.json/.csv/.tsv)")
    else:
        raise FileNotFoundError(f"input '{source}' does not exist (give a folder, a glob, a .txt or a .jsonl/.csv)")
    items: list[Item] = []
    seen: set[str] = set()
    for key, file, text in pairs:
        if key not in seen:
            seen.add(key)
            items.append(Item(len(items), key, file, text))
    return items


def _under(root: str | None, path: str) -> str:
    return path if root is None else str(Path(root) / path)


def _from_record(
    record: dict[str, Any], image_column: str, text_column: str | None, root: str | None
) -> tuple[str, str, str | None]:
    key = str(record[image_column])
    text = None
    if text_column is not None:
        value = record.get(text_column)
        text = str(value).strip() if value not in (None, "") else None
    return key, _under(root, key), text


class ImageItems(Dataset):
    """Decodes and preprocesses `Item` s (in DataLoader workers); an unreadable image yields its error."""

    def __init__(self, items: list[Item], processor: ImageProcessor) -> None:
        self.items = items
        self.processor = processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Item, torch.Tensor | None, str | None]:
        item = self.items[i]
        try:
            pixels = self.processor.process(load_image(item.path))  # (3, H, W)
        except (ImageError, OSError) as err:
            return item, None, str(err) or type(err).__name__
        return item, pixels, None


@dataclass
class Batch:
    """Readable images with their pixels (B, 3, H, W), and the unreadable ones with the reason."""

    items: list[Item]
    pixels: torch.Tensor | None
    failed: list[tuple[Item, str]]


def collate(samples: list[tuple[Item, torch.Tensor | None, str | None]]) -> Batch:
    ok = [(item, pixels) for item, pixels, _ in samples if pixels is not None]
    failed = [(item, error) for item, pixels, error in samples if pixels is None and error is not None]
    stacked = torch.stack([p for _, p in ok]) if ok else None  # (B, 3, H, W)
    return Batch([item for item, _ in ok], stacked, failed)
