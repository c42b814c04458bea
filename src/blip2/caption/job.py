"""One dataset captioning job from paths and options (what ``blip2 caption --input`` runs): load the models,
list the input, pick the output (this rank's part under torchrun), run, report."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from blip2.caption.capfilt import CapFilt, Rerank
from blip2.caption.run import CaptionSettings, Summary, caption_dataset, caption_shards, rank_and_world
from blip2.caption.shards import shard_urls
from blip2.caption.sinks import JsonlSink, ShardSink, SidecarSink, Sink, part_path
from blip2.caption.sources import list_items
from blip2.checkpoints import load_for_inference


@dataclass
class CaptionJob:
    input: str
    model: str
    output: str | None = None  # jsonl; default with --sidecar: <folder>/captions.jsonl
    sidecar: bool = False
    shards: str | None = None  # write WebDataset shards into this folder (the jsonl stays the index)
    samples_per_shard: int = 1000
    image_column: str = "image"
    text_column: str | None = None
    image_root: str | None = None
    device: str = "cpu"
    optimize: bool = True
    settings: CaptionSettings = field(default_factory=CaptionSettings)
    candidates: int | None = None  # CapFilt: sample this many captions per image
    scorer: str | None = None
    keep: int = 2
    rerank: Rerank = "itc"
    seed: int = 0


def output_path(job: CaptionJob) -> Path:
    if job.output is not None:
        return Path(job.output)
    if job.shards is not None:
        return Path(job.shards) / "captions.jsonl"
    if job.sidecar:
        folder = Path(job.input) if Path(job.input).is_dir() else Path()
        return folder / "captions.jsonl"
    raise ValueError("give --output OUT.jsonl, --shards DIR or --sidecar (a .txt next to each image)")


def process_device(device: str) -> str:
    """``cuda`` under torchrun means this process's GPU (``LOCAL_RANK``)."""
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{local_rank}" if device == "cuda" and local_rank is not None else device


def run_job(job: CaptionJob) -> tuple[Path, Summary]:
    """Run ``job``; → (the file this process wrote, its summary)."""
    if (job.candidates is None) != (job.scorer is None):
        raise ValueError("CapFilt needs both --candidates N and --scorer STAGE1_MODEL")
    output = output_path(job)
    if output.suffix != ".jsonl":
        raise ValueError(f"--output must be a .jsonl file, got '{output}'")
    rank, world = rank_and_world()
    urls = shard_urls(job.input)
    if urls is not None and (job.sidecar or job.shards is not None):
        raise ValueError("--sidecar and --shards copy image files; input shards have none: use --output OUT.jsonl")
    if job.sidecar and job.shards is not None:
        raise ValueError("choose one of --sidecar and --shards")
    items = list_items(job.input, job.image_column, job.text_column, job.image_root) if urls is None else []
    device = process_device(job.device)
    model = load_for_inference(job.model, device, optimize=job.optimize)
    capfilt = None
    if job.candidates is not None and job.scorer is not None:
        scorer = load_for_inference(job.scorer, device, optimize=job.optimize)
        capfilt = CapFilt(scorer, job.candidates, job.keep, job.rerank, job.seed)
    path = part_path(output, rank, world)
    log = JsonlSink(path, output)
    if urls is not None:
        return path, caption_shards(model, urls, log, job.settings, capfilt, rank, world)
    sink: Sink = log
    if job.sidecar:
        sink = SidecarSink(log)
    elif job.shards is not None:
        sink = ShardSink(log, Path(job.shards), job.samples_per_shard, rank, world)
    return path, caption_dataset(model, items, sink, job.settings, capfilt, rank, world)


def describe(path: Path, summary: Summary) -> str:
    return (
        f"{summary.captioned} captioned, {summary.failed} unreadable (see {path.stem}.errors.jsonl), "
        f"{summary.skipped} already done, of {summary.total}; output: {path}"
    )
