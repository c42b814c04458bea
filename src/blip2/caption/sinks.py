"""Where captions go: a jsonl file (one record per image, appended and flushed per batch), ``.txt`` sidecar
files next to the images, or WebDataset shards; and the merge of the per-rank parts of a multi-process run.

Crash safety: a record is one line, written whole; a run killed mid-write leaves at most a partial last
line, which the next run cuts off before appending (`repair`). What is in the output (captions, or the
errors file) is done; a rerun skips it, so every image ends up in the output exactly once.
Unreadable images go to ``<output stem>.errors.jsonl`` (``{"image", "error"}``) so the captions file stays
directly usable as training data (`blip2.data.datasets.ImageTextDataset`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from blip2.caption.sources import Item

FSYNC_SECONDS = 30.0  # flush to the OS every batch; to the disk at most this often (and at the end)


class Sink(Protocol):
    def is_done(self, item: Item) -> bool: ...

    def write(self, records: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


def errors_path(output: Path) -> Path:
    """``out.jsonl`` → ``out.errors.jsonl`` (also for part files: ``out.rank0-of-2.errors.jsonl``)."""
    return output.with_name(output.stem + ".errors.jsonl")


def part_path(output: Path, rank: int, world_size: int) -> Path:
    """The file of one process of a multi-process run: ``out.jsonl`` → ``out.rank{r}-of-{n}.jsonl``."""
    return output if world_size == 1 else output.with_name(f"{output.stem}.rank{rank}-of-{world_size}.jsonl")


def repair(path: Path) -> None:
    """Cut a partial last line (left by a killed run) so that appending starts on a fresh line."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        step = 1 << 16
        end = size
        while end > 0:  # search backwards for the last newline
            start = max(0, end - step)
            f.seek(start)
            chunk = f.read(end - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        if keep != size:
            f.truncate(keep)


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The complete records of a jsonl output (a partial or broken line, e.g. another process's tail, is
    ignored)."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "image" in record:
                yield record


def _related_outputs(output: Path) -> list[Path]:
    """The merged output and every part of it (any world size), captions and errors files."""
    parts = sorted(output.parent.glob(f"{glob_escape(output.stem)}.rank*-of-*.jsonl"))
    paths = [output, *(p for p in parts if not p.name.endswith(".errors.jsonl"))]
    return [q for p in paths for q in (p, errors_path(p))]


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


class JsonlSink:
    """Appends records to ``path`` (and errors to its errors file); knows which images are done in any part
    of ``output`` (so a rerun with another number of processes also skips them)."""

    def __init__(self, path: Path, output: Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.errors = errors_path(self.path)
        for own in (self.path, self.errors):
            repair(own)
        self.done = {str(r["image"]) for p in _related_outputs(Path(output or path)) for r in read_records(p)}
        self._files = [self.path.open("ab"), self.errors.open("ab")]
        self._synced = time.monotonic()

    def is_done(self, item: Item) -> bool:
        return item.key in self.done

    def write(self, records: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
        for file, rows in zip(self._files, (records, errors), strict=True):
            if rows:  # one write per batch: a kill leaves whole lines and at most one partial tail
                file.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows))
                file.flush()
        self.done.update(str(r["image"]) for r in (*records, *errors))
        if time.monotonic() - self._synced > FSYNC_SECONDS:
            self._sync()

    def _sync(self) -> None:
        for file in self._files:
            os.fsync(file.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        self._sync()
        for file in self._files:
            file.close()


class SidecarSink:
    """``photo.jpg`` → ``photo.txt`` (the caption; with several captions, one a line), written atomically,
    besides the records in ``log`` (a `JsonlSink`: an index of what was written, and the errors). An image
    with a sidecar file is done (delete the ``.txt`` files to caption again)."""

    def __init__(self, log: JsonlSink) -> None:
        self.log = log
        self.paths: dict[str, Path] = {}

    def is_done(self, item: Item) -> bool:
        self.paths[item.key] = Path(item.path)
        return self.log.is_done(item) or Path(item.path).with_suffix(".txt").exists()

    def write(self, records: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
        for record in records:
            target = self.paths[record["image"]].with_suffix(".txt")
            captions = record.get("captions", [record.get("caption", "")])
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_text("\n".join(captions) + "\n", encoding="utf-8")
            os.replace(tmp, target)
        self.log.write(records, errors)

    def close(self) -> None:
        self.log.close()


def merge_parts(output: str | Path) -> tuple[int, int]:
    """Merge ``out.rank*-of-*.jsonl`` (and ``out.jsonl`` if it exists) into ``out.jsonl``, each image once,
    and the errors files likewise; the parts are removed. → (captioned images, errors)."""
    output = Path(output)
    paths = _related_outputs(output)
    captions = [p for p in paths if not p.name.endswith(".errors.jsonl")]
    errors = [p for p in paths if p.name.endswith(".errors.jsonl")]
    if not any(p.exists() for p in paths):
        raise FileNotFoundError(f"no output or part files for '{output}' (expected {output.stem}.rank0-of-N.jsonl)")
    n_captions = _merge_files(captions, output)
    n_errors = _merge_files(errors, errors_path(output))
    for p in paths:
        if p not in (output, errors_path(output)) and p.exists():
            p.unlink()
    return n_captions, n_errors


def _merge_files(sources: Iterable[Path], target: Path) -> int:
    seen: set[str] = set()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as out:
        for source in sources:
            for record in read_records(source):
                if str(record["image"]) not in seen:
                    seen.add(str(record["image"]))
                    out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    return len(seen)


class ShardSink:
    """WebDataset tar shards of ``samples_per_shard`` images each: per image ``KEY.<ext>`` (the image file's
    own bytes, not re-encoded), ``KEY.txt`` (the best caption) and ``KEY.json`` (the record: ``image`` = the
    input's path or key, ``caption`` / ``captions`` / ``scores``), keys numbered by input position, so the
    shards train as they are (`blip2.data.webdataset.WebDatasetShards`). ``log`` (a `JsonlSink`) keeps the
    index and the unreadable images.

    A shard is written whole (to a temporary folder, then renamed): a killed run loses at most the images of
    the shard it was filling, and a rerun captions them again. What the shards already hold is done, also
    when the kill came between a shard's rename and its index lines, so every image is in exactly one shard.
    Shard names carry the rank (``shard-r0of8-000003.tar``), so processes never write the same file.
    """

    def __init__(self, log: JsonlSink, directory: Path, samples_per_shard: int, rank: int = 0, world: int = 1) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
        self.log = log
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".tmp-*"):  # a shard a killed run was writing
            shutil.rmtree(stale, ignore_errors=True)
        self.samples_per_shard = samples_per_shard
        self.prefix = f"shard-r{rank}of{world}"
        self.in_shards = set(_shard_images(self.directory))
        self.items: dict[str, Item] = {}
        self.pending: list[dict[str, Any]] = []

    def is_done(self, item: Item) -> bool:
        self.items[item.key] = item
        return self.log.is_done(item) or item.key in self.in_shards

    def write(self, records: list[dict[str, Any]], errors: list[dict[str, Any]]) -> None:
        self.log.write([], errors)
        self.pending.extend(records)
        while len(self.pending) >= self.samples_per_shard:
            self._write_shard(self.pending[: self.samples_per_shard])
            self.pending = self.pending[self.samples_per_shard :]

    def _write_shard(self, records: list[dict[str, Any]]) -> None:
        from blip2.data.webdataset import write_webdataset_shards

        samples = []
        for record in records:
            item = self.items[record["image"]]
            path = Path(item.path)
            captions = record.get("captions") or [record.get("caption", "")]
            samples.append(
                {
                    "key": f"{item.index:09d}",
                    "image": path.read_bytes(),
                    "image_ext": path.suffix.lstrip(".").lower() or "jpg",
                    "text": captions[0],
                    "json": record,
                }
            )
        seq = len(list(self.directory.glob(f"{self.prefix}-*.tar")))
        tmp = self.directory / f".tmp-{os.getpid()}"
        (written,) = write_webdataset_shards(samples, tmp, len(samples), prefix=self.prefix)
        os.replace(written, self.directory / f"{self.prefix}-{seq:06d}.tar")
        tmp.rmdir()
        self.log.write(records, [])
        self.in_shards.update(r["image"] for r in records)

    def close(self) -> None:
        if self.pending:
            self._write_shard(self.pending)
            self.pending = []
        self.log.close()


def _shard_images(directory: Path) -> Iterator[str]:
    """The ``image`` of every record in the finished shards of ``directory``."""
    for shard in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json") and (file := tar.extractfile(member)) is not None:
                    record = json.loads(file.read())
                    if isinstance(record, dict) and "image" in record:
                        yield str(record["image"])
