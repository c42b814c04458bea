"""The dataset captioning loop: skip what is done, take this process's share, decode in DataLoader workers,
caption a batch at a time, write each batch before the next. WebDataset shards stream through
`caption_shards` instead.

Under torchrun (``RANK`` / ``WORLD_SIZE`` in the environment) process r takes the images whose index in the
input is r modulo the world size (shards: the shards), and writes its own part
(`blip2.caption.sinks.part_path`); no process group is needed, so ranks never wait for each other.
`blip2.caption.sinks.merge_parts` joins the parts.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from blip2.caption.capfilt import CapFilt
from blip2.caption.shards import ShardItems
from blip2.caption.sinks import JsonlSink, Sink
from blip2.caption.sources import Batch, ImageItems, Item, collate
from blip2.inference.tasks import caption_pixels, processor_for

logger = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes, from torchrun's environment (0, 1 without it)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}: start the processes with torchrun")
    return rank, world


@dataclass
class CaptionSettings:
    batch_size: int = 16
    workers: int = 2
    prompt: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)  # e.g. num_beams, max_new_tokens
    progress: bool = True


@dataclass
class Summary:
    total: int  # images of this process's share
    skipped: int  # already in the output
    captioned: int = 0
    failed: int = 0


def my_share(items: list[Item], rank: int, world_size: int) -> list[Item]:
    return [item for item in items if item.index % world_size == rank]


def caption_dataset(
    model: Any,
    items: list[Item],
    sink: Sink,
    settings: CaptionSettings | None = None,
    capfilt: CapFilt | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Summary:
    """Caption this process's share of ``items`` into ``sink``; images the sink has are skipped.

    ``capfilt`` switches to CapFilt: sampled candidates, scored with the original text, the best kept.
    """
    _check(model, capfilt)
    share = my_share(items, rank, world_size)
    todo = [item for item in share if not sink.is_done(item)]
    summary = Summary(total=len(share), skipped=len(share) - len(todo))
    return _run(
        model, ImageItems(todo, processor_for(model)), len(todo), sink, summary, settings, capfilt, rank, world_size
    )


def caption_shards(
    model: Any,
    urls: list[str],
    sink: JsonlSink,
    settings: CaptionSettings | None = None,
    capfilt: CapFilt | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Summary:
    """`caption_dataset` over WebDataset shards (`blip2.caption.shards`): this process takes every
    ``world_size``-th shard; the totals are unknown in advance (the bar shows the rate, no ETA)."""
    _check(model, capfilt)
    dataset = ShardItems(urls, processor_for(model), set(sink.done), rank, world_size)
    return _run(model, dataset, None, sink, Summary(0, 0), settings, capfilt, rank, world_size)


def _check(model: Any, capfilt: CapFilt | None) -> None:
    if not hasattr(model, "language_model"):
        raise ValueError("dataset captioning needs a stage-2 model (with an LLM); this is a stage-1 Q-Former")
    if capfilt is not None:
        capfilt.check_inputs(model)


def _run(
    model: Any,
    dataset: Dataset,
    total: int | None,
    sink: Sink,
    summary: Summary,
    settings: CaptionSettings | None,
    capfilt: CapFilt | None,
    rank: int,
    world_size: int,
) -> Summary:
    """The loop: batches decoded in workers, captioned, written (and flushed) before the next."""
    settings = settings or CaptionSettings()
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        collate_fn=collate,
        pin_memory=model.device.type == "cuda",
    )
    bar = tqdm(
        total=total,
        unit="img",
        desc=f"caption rank {rank}/{world_size}" if world_size > 1 else "caption",
        disable=not settings.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    with bar:
        for batch in loader:
            records = _caption_batch(model, batch, settings, capfilt)
            errors = [{"image": item.key, "error": reason} for item, reason in batch.failed]
            sink.write(records, errors)
            summary.captioned += len(records)
            summary.failed += len(errors)
            bar.update(len(records) + len(errors))
            bar.set_postfix(failed=summary.failed, refresh=False)
    sink.close()
    if total is None:
        summary.total = summary.captioned + summary.failed
    return summary


def _caption_batch(
    model: Any, batch: Batch, settings: CaptionSettings, capfilt: CapFilt | None
) -> list[dict[str, Any]]:
    if batch.pixels is None:
        return []
    pixels = batch.pixels.to(model.device, non_blocking=True)  # (B, 3, H, W)
    with _autocast(model):
        if capfilt is not None:
            return capfilt.bootstrap(model, batch.items, pixels, settings.prompt, settings.generation)
        captions = caption_pixels(model, pixels, settings.prompt, **settings.generation)
    records = []
    for item, text in zip(batch.items, captions, strict=True):
        record: dict[str, Any] = {"image": item.key, "caption": text}
        if item.text is not None:
            record["text"] = item.text
        records.append(record)
    return records


def _autocast(model: Any) -> Any:
    """bf16 autocast on CUDA (as the server and eval run); nothing on CPU."""
    if model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
