"""Image-text datasets: annotation files + an image folder, COCO captions, VQA (WebDataset shards:
`blip2.data.webdataset`).

Every dataset yields dicts ``{"image": PIL image or (3, H, W) tensor, "text": str, "image_id": ...}`` (VQA adds
``question``/``answer``/``answers``/``question_id``; caption datasets add ``captions``, all references of the
image). With ``transform=None`` the image stays a PIL image and the collator transforms it.

Sampling: ``mode="pairs"`` (default, as LAVIS's caption datasets) gives one sample per (image, caption) pair;
``mode="random_caption"`` gives one sample per image with one of its captions drawn per epoch.

Randomness (caption choice, crop and flip) comes from a generator derived from ``(seed, epoch, index)`` when a
``seed`` is given, so a sample is the same whichever worker loads it and a resumed run sees the same data;
call ``set_epoch(epoch)`` at the start of each epoch. Without a seed the global torch RNG is used.

Bad samples never crash a run. A missing or corrupt image makes ``__getitem__`` return a `SkippedSample`
(the file and the reason) instead of a dict; `ImageTextCollator` drops it and reports ``skipped`` and
``skipped_files`` in the batch, which is the reliable count (DataLoader workers are separate processes, so a
counter on the dataset object only sees the samples loaded in its own process). Each process also logs a
warning for its first few skipped files, and keeps its own tally in ``dataset.skip_log``.
Malformed annotation files are different: they raise at construction, naming the file and line.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from blip2.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from blip2.data.transforms import transform_image

__all__ = [
    "SkippedSample",
    "SkipLog",
    "ImageTextDataset",
    "CocoCaptionsDataset",
    "VQADataset",
    "read_annotations",
]

logger = logging.getLogger(__name__)

Mode = Literal["pairs", "random_caption"]
Transform = Callable[..., Any]
PathLike = str | Path


# ----------------------------------------------------------------------------------------------------------
# Skipped-sample accounting
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedSample:
    """Stands in for a sample that could not be loaded; collators drop it and count it."""

    path: str
    reason: str


@dataclass
class SkipLog:
    """This process's tally of skipped samples; logs a warning for the first ``max_warnings``."""

    max_warnings: int = 5
    count: int = 0
    examples: list[SkippedSample] = field(default_factory=list)  # the first 100

    def record(self, path: str, reason: str) -> SkippedSample:
        sample = SkippedSample(path, reason)
        self.count += 1
        if len(self.examples) < 100:
            self.examples.append(sample)
        if self.count <= self.max_warnings:
            more = " (further skips are counted, not logged)" if self.count == self.max_warnings else ""
            logger.warning("skipping sample %s: %s%s", path, reason, more)
        return sample


def _sample_generator(seed: int | None, epoch: int, index: int) -> torch.Generator | None:
    """A generator that depends only on (seed, epoch, index): reproducible under any worker layout."""
    if seed is None:
        return None
    mixed = ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


# ----------------------------------------------------------------------------------------------------------
# Annotation files
# ----------------------------------------------------------------------------------------------------------


def read_annotations(path: PathLike, image_column: str = "image") -> list[dict[str, Any]]:
    """Records from a ``.jsonl`` (one object per line), ``.json`` (a list of objects) or ``.csv``/``.tsv`` file.

    Every record must name an image in ``image_column``.
    In CSV, a ``captions``/``answers`` cell holding a JSON list (``["a", "b"]``) is parsed as a list.
    Each record gets ``_where`` ("file:line") for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file '{path}' does not exist")
    suffix = path.suffix.lower()
    records: list[dict[str, Any]] = []
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from err
                records.append(_as_record(record, f"{path}:{line_no}", image_column))
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records (for COCO files use CocoCaptionsDataset)")
        records = [_as_record(r, f"{path}:item {i}", image_column) for i, r in enumerate(data)]
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for line_no, row in enumerate(reader, 2):
                record = {k.strip(): v for k, v in row.items() if k is not None}
                for key in ("captions", "answers"):
                    cell = record.get(key)
                    if isinstance(cell, str) and cell.lstrip().startswith("["):
                        record[key] = json.loads(cell)
                records.append(_as_record(record, f"{path}:{line_no}", image_column))
    else:
        raise ValueError(f"annotation file '{path}' must be .jsonl, .json, .csv or .tsv")
    return records


def _as_record(record: Any, where: str, image_column: str = "image") -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    if not record.get(image_column):
        raise ValueError(f"{where}: record has no '{image_column}' (a path relative to the image root)")
    return {**record, "_where": where}


def _captions_of(record: Mapping[str, Any]) -> list[str]:
    value = record.get("captions", record.get("caption"))
    if value is None:
        raise ValueError(f"{record['_where']}: record has neither 'caption' nor 'captions'")
    captions = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{record['_where']}: captions must be strings")
    return [c.strip() for c in captions if c.strip()]


@dataclass
class _Image:
    """One image of a caption dataset and all its captions."""

    path: str  # relative to the image root (or absolute)
    image_id: Any
    captions: list[str]


# ----------------------------------------------------------------------------------------------------------
# Map-style caption datasets
# ----------------------------------------------------------------------------------------------------------


class _CaptionDataset(Dataset):
    """Shared machinery: a list of images with captions, pair/random-caption indexing, skip accounting."""

    def __init__(
        self,
        images: list[_Image],
        image_root: PathLike | None,
        transform: Transform | None,
        mode: Mode,
        seed: int | None,
        max_pixels: int | None,
    ) -> None:
        if mode not in ("pairs", "random_caption"):
            raise ValueError(f"mode must be 'pairs' or 'random_caption', got {mode!r}")
        dropped = sum(1 for im in images if not im.captions)
        if dropped:
            logger.warning("dropping %d image(s) with no non-empty caption", dropped)
        self.images = [im for im in images if im.captions]
        self.image_root = Path(image_root) if image_root is not None else Path()
        self.transform = transform
        self.mode = mode
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        self.skip_log = SkipLog()
        # (image index, caption index) per sample; caption index -1: drawn at random per epoch.
        if mode == "pairs":
            self._index = [(i, c) for i, im in enumerate(self.images) for c in range(len(im.captions))]
        else:
            self._index = [(i, -1) for i in range(len(self.images))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._index)

    def sample_indices(self, index: int) -> tuple[int, int]:
        """(image index, caption index) of sample ``index``. In ``random_caption`` mode the caption is drawn
        from (seed, epoch, index) alone: the same under any worker layout, after a resume, and in
        `blip2.data.feature_cache.CachedFeatureDataset` (which asks here). Without a seed: python's global RNG."""
        image_index, caption_index = self._index[index]
        if caption_index < 0:
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}") if self.seed is not None else random
            caption_index = rng.randrange(len(self.images[image_index].captions))
        return image_index, caption_index

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        image_index, caption_index = self.sample_indices(index)
        entry = self.images[image_index]
        generator = _sample_generator(self.seed, self.epoch, index)
        path = self.image_root / entry.path
        try:
            image = load_image(path, max_pixels=self.max_pixels)
        except ImageError as err:
            return self.skip_log.record(str(path), str(err))
        image, text = transform_image(self.transform, image, entry.captions[caption_index], generator)
        return {"image": image, "text": text, "image_id": entry.image_id, "captions": entry.captions}


class ImageTextDataset(_CaptionDataset):
    """Image-caption pairs from a JSONL/JSON/CSV annotation file (or a list of records) + an image folder.

    Records: ``{"image": "relative/path.jpg", "caption": "..."}`` or ``{"image": ..., "captions": [...]}``,
    optionally ``"image_id"`` (default: the image path). Records naming the same image are merged.
    """

    def __init__(
        self,
        annotations: PathLike | Sequence[Mapping[str, Any]],
        image_root: PathLike | None = None,
        transform: Transform | None = None,
        mode: Mode = "pairs",
        seed: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if isinstance(annotations, str | Path):
            records = read_annotations(annotations)
        else:
            records = [_as_record(dict(r), f"record {i}") for i, r in enumerate(annotations)]
        by_path: dict[str, _Image] = {}
        for record in records:
            image_path = str(record["image"])
            entry = by_path.setdefault(image_path, _Image(image_path, record.get("image_id", image_path), []))
            entry.captions.extend(_captions_of(record))
        super().__init__(list(by_path.values()), image_root, transform, mode, seed, max_pixels)


class CocoCaptionsDataset(_CaptionDataset):
    """COCO captions: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.

    ``image_id`` is COCO's integer id. Images without captions are left out.
    """

    def __init__(
        self,
        annotation_file: PathLike,
        image_root: PathLike | None = None,
        transform: Transform | None = None,
        mode: Mode = "pairs",
        seed: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        data = json.loads(Path(annotation_file).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise ValueError(f"'{annotation_file}' is not a COCO captions file (needs 'images' and 'annotations')")
        entries = {im["id"]: _Image(im["file_name"], im["id"], []) for im in data["images"]}
        for ann in data["annotations"]:
            if ann["image_id"] not in entries:
                raise ValueError(
                    f"'{annotation_file}': annotation {ann.get('id')} refers to unknown image {ann['image_id']}"
                )
            entries[ann["image_id"]].captions.append(str(ann["caption"]).strip())
        with_captions = [e for e in entries.values() if e.captions]
        super().__init__(with_captions, image_root, transform, mode, seed, max_pixels)


class VQADataset(Dataset):
    """Question-answer pairs about images, from JSONL/JSON/CSV or a list of records.

    Records: ``{"image", "question", "answer"}`` or ``"answers"`` (a list of strings, or VQAv2's list of
    ``{"answer": ...}``), optionally ``question_id`` and ``image_id``. ``answer`` in an item is the most
    frequent of ``answers`` (first seen wins ties), the usual training target; ``answers`` keeps all of them
    for the VQA accuracy metric. ``text`` is the question. A `TrainTransform` with ``flip_text`` flips the
    question and the answers together with the image ("what is left of the cat?" / "left").
    """

    def __init__(
        self,
        annotations: PathLike | Sequence[Mapping[str, Any]],
        image_root: PathLike | None = None,
        transform: Transform | None = None,
        seed: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if isinstance(annotations, str | Path):
            records = read_annotations(annotations)
        else:
            records = [_as_record(dict(r), f"record {i}") for i, r in enumerate(annotations)]
        self.records = [self._parse(r, i) for i, r in enumerate(records)]
        self.image_root = Path(image_root) if image_root is not None else Path()
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        self.skip_log = SkipLog()

    @staticmethod
    def _parse(record: Mapping[str, Any], index: int) -> dict[str, Any]:
        where = record["_where"]
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: record has no 'question'")
        raw = record.get("answers", record.get("answer"))
        if raw is None:
            raise ValueError(f"{where}: record has neither 'answer' nor 'answers'")
        raw_list = [raw] if isinstance(raw, str) else list(raw)
        answers = [str(a["answer"] if isinstance(a, Mapping) else a).strip() for a in raw_list]
        answers = [a for a in answers if a]
        if not answers:
            raise ValueError(f"{where}: record has no non-empty answer")
        return {
            "image": str(record["image"]),
            "question": question.strip(),
            "answers": answers,
            "answer": Counter(answers).most_common(1)[0][0],
            "question_id": record.get("question_id", index),
            "image_id": record.get("image_id", str(record["image"])),
        }

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        record = self.records[index]
        path = self.image_root / record["image"]
        try:
            image = load_image(path, max_pixels=self.max_pixels)
        except ImageError as err:
            return self.skip_log.record(str(path), str(err))
        generator = _sample_generator(self.seed, self.epoch, index)
        texts = [record["question"], record["answer"], *record["answers"]]
        image, flipped = transform_image(self.transform, image, texts, generator)  # flip_text: all together
        question, answer, *answers = flipped if isinstance(flipped, list) else texts
        item = {k: v for k, v in record.items() if k != "image"}
        return {**item, "image": image, "text": question, "question": question, "answer": answer, "answers": answers}
