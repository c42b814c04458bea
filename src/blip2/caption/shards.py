"""WebDataset tar shards as captioning input: ``data/shard-{000000..000099}.tar`` (brace ranges) or a glob.

Shards stream: the split is by shard (process r of n takes shards r, r+n, ...; its DataLoader workers split
those again), so give at least as many shards as processes x workers. A sample's key (``dir/key`` of
``dir/key.jpg``) is its output "image"; its ``.txt`` (or the json's "caption"/"text") is the original text.
A resumed run re-reads the shards but decodes and captions only the samples not yet in the output.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from blip2.caption.sources import Item
from blip2.data.datasets import SkipLog, SkippedSample
from blip2.data.images import ImageError, load_image
from blip2.data.transforms import ImageProcessor
from blip2.data.webdataset import IMAGE_EXTENSIONS, TEXT_EXTENSIONS, expand_urls, read_samples


def shard_urls(source: str) -> list[str] | None:
    """The shards ``source`` names (brace ranges expanded, globs matched, sorted), or None when it does not
    name ``.tar`` files."""
    if not source.endswith(".tar"):
        return None
    urls: list[str] = []
    for name in expand_urls(source):
        urls.extend(sorted(glob.glob(name)) if glob.has_magic(name) else [name])
    if not urls:
        raise FileNotFoundError(f"no shards match '{source}'")
    return urls


class ShardItems(IterableDataset):
    """Yields ``(Item, pixels (3, H, W) | None, error | None)`` for this process's shards, skipping ``done``
    keys; a sample without an image, or an unreadable shard, yields its error."""

    def __init__(
        self, urls: list[str], processor: ImageProcessor, done: set[str], rank: int = 0, world_size: int = 1
    ) -> None:
        self.urls = [u for i, u in enumerate(urls) if i % world_size == rank]
        self.processor = processor
        self.done = done

    def __iter__(self) -> Iterator[tuple[Item, torch.Tensor | None, str | None]]:
        worker = get_worker_info()
        urls = self.urls if worker is None else self.urls[worker.id :: worker.num_workers]
        for sample in read_samples(urls, SkipLog(max_warnings=0)):
            if isinstance(sample, SkippedSample):  # an unreadable shard: recorded under its name
                if sample.path not in self.done:
                    yield Item(-1, sample.path, sample.path), None, sample.reason
                continue
            key = str(sample["__key__"])
            if key not in self.done:
                yield self._decode(key, sample)

    def _decode(self, key: str, sample: dict[str, Any]) -> tuple[Item, torch.Tensor | None, str | None]:
        item = Item(-1, key, sample["__url__"], _text(sample))
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            return item, None, f"no image ({', '.join(IMAGE_EXTENSIONS)}) in the sample"
        try:
            image = load_image(sample[ext], name=f"{sample['__url__']}:{key}.{ext}")
        except ImageError as err:
            return item, None, str(err)
        return item, self.processor.process(image), None


def _text(sample: dict[str, Any]) -> str | None:
    for ext in TEXT_EXTENSIONS:
        if ext in sample:
            return sample[ext].decode("utf-8", errors="replace").strip() or None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        for field in ("caption", "text"):
            if isinstance(meta, dict) and isinstance(meta.get(field), str) and meta[field].strip():
                return meta[field].strip()
    return None
