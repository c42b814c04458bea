"""Synthetic scenes (`blip2.data.scenes`): attribute accuracy of generated captions, and a split loaded for
`blip2.eval.runner.run_eval`. Imported only when scenes are evaluated."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from blip2.data.scenes import caption_attributes
from blip2.eval.loaders import EvalData, load_coco_captions, load_vqa


def attribute_accuracy(
    generated_captions: Sequence[str], scenes_objects: Sequence[Sequence[Mapping[str, Any]]]
) -> dict[str, float]:
    """How well generated captions describe synthetic scenes (objects as in scenes' captions.jsonl).

    An object is *named* when the caption mentions its color and shape together ("red circle") with the
    right size or none. Returns fractions:
      exact:      images whose caption names every object
      object:     objects named
      color:      objects whose color is mentioned; shape: objects whose shape is mentioned
      size:       of the objects named with a size, those with the right size
      count:      images with exactly one mention per object
      precision:  mentions whose color+shape is in the scene (1 - hallucination rate)
    """
    if len(generated_captions) != len(scenes_objects):
        raise ValueError(f"{len(generated_captions)} captions for {len(scenes_objects)} scenes")
    if not generated_captions:
        raise ValueError("no captions to score")
    n_exact = n_count = n_obj = n_named = n_color = n_shape = n_sized = n_size_ok = 0
    n_mentions = n_true_mentions = 0
    for caption, objects in zip(generated_captions, scenes_objects, strict=True):
        mentions = caption_attributes(caption)
        all_named = True
        for obj in objects:
            sizes = {size for size, color, shape in mentions if (color, shape) == (obj["color"], obj["shape"])}
            named = bool(sizes) and (None in sizes or obj["size"] in sizes)
            all_named &= named
            n_named += named
            n_color += any(color == obj["color"] for _, color, _ in mentions)
            n_shape += any(shape == obj["shape"] for _, _, shape in mentions)
            stated = sizes - {None}
            n_sized += bool(stated)
            n_size_ok += stated == {obj["size"]}
        n_obj += len(objects)
        n_exact += all_named
        n_count += len(mentions) == len(objects)
        scene_pairs = {(o["color"], o["shape"]) for o in objects}
        n_mentions += len(mentions)
        n_true_mentions += sum((c, s) in scene_pairs for _, c, s in mentions)
    n_img = len(generated_captions)
    return {
        "exact": n_exact / n_img,
        "object": n_named / max(n_obj, 1),
        "color": n_color / max(n_obj, 1),
        "shape": n_shape / max(n_obj, 1),
        "size": n_size_ok / n_sized if n_sized else float("nan"),
        "count": n_count / n_img,
        "precision": n_true_mentions / n_mentions if n_mentions else 0.0,
    }


def load_scenes_eval(directory: str | Path) -> EvalData:
    """A scenes split written by `blip2.data.scenes.write_split`, with each image's objects (for
    `attribute_accuracy`)."""
    root = Path(directory)
    if not (root / "captions_coco.json").is_file():
        raise FileNotFoundError(f"'{root}' is not a scenes split directory (no captions_coco.json)")
    images, refs = load_coco_captions(root / "captions_coco.json")
    questions, annotations = load_vqa(root / "vqa_questions.json", root / "vqa_annotations.json")
    objects = {}
    with open(root / "captions.jsonl", encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            objects[row["image"]] = row["objects"]
    return EvalData(
        paths={img["id"]: str(root / img["file_name"]) for img in images},
        references=refs,
        objects={img["id"]: objects[img["file_name"]] for img in images},
        questions=questions,
        annotations=annotations,
    )
