"""Caption whole datasets: folders, globs, path lists, annotation files and WebDataset shards in; jsonl or
``.txt`` sidecar files out; resumable after a kill; split over torchrun processes; CapFilt bootstrapping
(`blip2 caption --input`)."""

from blip2.caption.capfilt import CapFilt
from blip2.caption.run import CaptionSettings, Summary, caption_dataset, caption_shards, rank_and_world
from blip2.caption.sinks import JsonlSink, SidecarSink, merge_parts, part_path
from blip2.caption.sources import Item, list_items

__all__ = [
    "CapFilt",
    "CaptionSettings",
    "Item",
    "JsonlSink",
    "SidecarSink",
    "Summary",
    "caption_dataset",
    "caption_shards",
    "list_items",
    "merge_parts",
    "part_path",
    "rank_and_world",
]
