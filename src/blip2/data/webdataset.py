"""WebDataset tar shards: a streaming image-text dataset (split across ranks and workers, shuffled through a
buffer, resumable by epoch) and a writer for such shards.

Samples are grouped by key (``dir/key.jpg`` + ``dir/key.txt`` or ``dir/key.json``); a sample whose image is
missing or unreadable becomes a `blip2.data.datasets.SkippedSample`, as in the map-style datasets.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import tarfile
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from blip2.data.datasets import PathLike, SkipLog, SkippedSample, Transform
from blip2.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from blip2.data.transforms import transform_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "TEXT_EXTENSIONS",
    "WebDatasetShards",
    "expand_urls",
    "read_samples",
    "write_webdataset_shards",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TEXT_EXTENSIONS = ("txt", "text", "caption")
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # "dir/key.ext.more" → ("dir/key", "ext.more")
_BRACES_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Expand WebDataset brace ranges: ``"shard-{000..002}.tar"`` → three names (zero padding kept)."""
    names = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for name in names:
        match = _BRACES_RE.search(name)
        if match is None:
            out.append(name)
            continue
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") else 0
        for n in range(int(lo), int(hi) + 1):
            out.extend(expand_urls(name[: match.start()] + str(n).zfill(width) + name[match.end() :]))
    return out


def _distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WebDatasetShards(IterableDataset):
    """Stream samples from WebDataset tar shards (``key.jpg`` + ``key.txt``/``key.json``), stdlib only.

    Shards (local paths, checked at construction, or http(s) URLs; ``{000..009}`` ranges expand) are split
    between distributed ranks (``torch.distributed`` when initialised, or explicit ``rank``/``world_size``) and
    DataLoader workers: consumer ``rank * num_workers + worker`` reads shards ``consumer::total``. With fewer
    shards than consumers, every consumer streams all shards and keeps every ``total``-th sample instead
    (correct, more I/O).
    Shard-level splitting gives ranks equal sample counts only when shards hold equal counts and their number
    is a multiple of ``total``; the training loop should not rely on equal lengths otherwise.

    Shuffling (``shuffle_buffer > 0``): shard order is permuted per epoch (the same permutation on every
    rank, so the split stays disjoint), and samples pass through a buffer of that size, seeded by
    (seed, epoch, consumer). Call ``set_epoch`` each epoch. Corrupt images, samples without image or text and
    unreadable shards are skipped and reported as `SkippedSample` items.
    """

    def __init__(
        self,
        urls_or_paths: str | Sequence[str],
        transform: Transform | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.urls = expand_urls(urls_or_paths)
        if not self.urls:
            raise ValueError("WebDatasetShards needs at least one shard")
        missing = [u for u in self.urls if "://" not in u and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) do not exist, e.g. '{missing[0]}'")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size
        self.max_pixels = max_pixels
        self.skip_log = SkipLog()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _consumer(self) -> tuple[int, int]:
        """(this consumer's index, number of consumers) over ranks × workers."""
        rank, world_size = (self.rank, self.world_size) if self.rank is not None else _distributed_rank()
        assert world_size is not None
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * num_workers + worker, world_size * num_workers

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedSample]:
        consumer, total = self._consumer()
        urls = list(self.urls)
        if self.shuffle_buffer > 0:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        mixed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + consumer) % (2**63 - 1)
        generator = torch.Generator().manual_seed(mixed)
        rng = random.Random(mixed)
        if len(urls) >= total:
            raw: Iterable[dict[str, Any] | SkippedSample] = self._raw_samples(urls[consumer::total])
        else:
            raw = (s for i, s in enumerate(self._raw_samples(urls)) if i % total == consumer)
        if self.shuffle_buffer > 0:
            raw = _shuffled(raw, self.shuffle_buffer, rng)
        for sample in raw:
            yield sample if isinstance(sample, SkippedSample) else self._decode(sample, generator)

    def _raw_samples(self, urls: Iterable[str]) -> Iterator[dict[str, Any] | SkippedSample]:
        return read_samples(urls, self.skip_log)

    def _decode(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any] | SkippedSample:
        where = f"{sample['__url__']}:{sample['__key__']}"
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_ext is None:
            return self.skip_log.record(where, f"no image ({', '.join(IMAGE_EXTENSIONS)}) in the sample")
        meta: dict[str, Any] = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                return self.skip_log.record(where, f"invalid .json ({err})")
            if not isinstance(meta, dict):
                meta = {}
        text = _sample_text(sample, meta, generator)
        if text is None:
            return self.skip_log.record(where, "no caption (.txt, or 'caption'/'captions'/'text' in .json)")
        try:
            image = load_image(sample[image_ext], name=f"{where}.{image_ext}", max_pixels=self.max_pixels)
        except ImageError as err:
            return self.skip_log.record(f"{where}.{image_ext}", str(err))
        image, text = transform_image(self.transform, image, text, generator)
        return {"image": image, "text": text, "image_id": meta.get("image_id", sample["__key__"])}


def read_samples(urls: Iterable[str], skip_log: SkipLog) -> Iterator[dict[str, Any] | SkippedSample]:
    """The raw samples of tar shards, in order: consecutive members grouped by key into
    ``{"__key__", "__url__", ext: bytes}``; an unreadable shard yields one `SkippedSample` (``skip_log``)."""
    for url in urls:
        current: dict[str, Any] | None = None
        try:
            with _open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    match = _KEY_RE.match(member.name)
                    if match is None or Path(member.name).name.startswith((".", "_")):
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    data = tar.extractfile(member)
                    current[ext] = data.read() if data is not None else b""
        except (OSError, tarfile.TarError, EOFError) as err:
            current = None  # the sample being read is incomplete; the shard's record stands for it
            yield skip_log.record(url, f"shard could not be read ({err}); the rest of it is skipped")
        if current is not None:
            yield current


def _sample_text(sample: Mapping[str, Any], meta: Mapping[str, Any], generator: torch.Generator) -> str | None:
    for ext in TEXT_EXTENSIONS:
        if ext in sample:
            text = sample[ext].decode("utf-8", errors="replace").strip()
            return text or None
    for key in ("caption", "text"):
        if isinstance(meta.get(key), str) and meta[key].strip():
            return meta[key].strip()
    captions = [c for c in meta.get("captions", []) if isinstance(c, str) and c.strip()]
    if captions:
        return captions[int(torch.randint(len(captions), (), generator=generator).item())].strip()
    return None


def _shuffled(samples: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle with a fixed-size buffer (streaming: memory is ``buffer_size`` samples)."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def _open_stream(url: str) -> IO[bytes]:
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url)  # noqa: S310 - streaming a shard the user named
    return Path(url.removeprefix("file://")).open("rb")


def write_webdataset_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: PathLike,
    samples_per_shard: int,
    prefix: str = "shard",
) -> list[Path]:
    """Write samples as WebDataset tar shards ``{prefix}-000000.tar``, ...; returns the shard paths.

    A sample has ``image`` (a PIL image, saved as PNG, or encoded bytes with ``image_ext``, default "jpg"),
    and ``text`` (→ ``.txt``) and/or ``json`` (a dict → ``.json``); ``key`` defaults to a running number.
    """
    if samples_per_shard < 1:
        raise ValueError("samples_per_shard must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    iterator = iter(samples)
    count = 0
    while chunk := list(itertools.islice(iterator, samples_per_shard)):
        paths.append(out / f"{prefix}-{len(paths):06d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for sample in chunk:
                key = str(sample.get("key", f"{count:08d}"))
                count += 1
                for ext, payload in _encode_sample(sample):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return paths


def _encode_sample(sample: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    files: list[tuple[str, bytes]] = []
    image = sample.get("image")
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        files.append(("png", buffer.getvalue()))
    elif isinstance(image, bytes):
        files.append((str(sample.get("image_ext", "jpg")), image))
    elif image is not None:
        raise TypeError(f"sample image must be a PIL image or bytes, got {type(image).__name__}")
    if "text" in sample:
        files.append(("txt", str(sample["text"]).encode("utf-8")))
    if "json" in sample:
        files.append(("json", json.dumps(sample["json"]).encode("utf-8")))
    return files
