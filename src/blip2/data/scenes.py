"""Deterministic synthetic scenes: coloured shapes on a grey background, with captions and questions.

The scenes make an offline BLIP-2 demo possible: every image is rendered from a small `Scene` description,
so captions and question answers are exact, attributes can be scored from generated text
(`caption_attributes`), and a held-out split tests compositional generalisation.

Geometry conventions (all in pixels of an `image_size` x `image_size` image):

* The image is divided into a 3x3 grid of equal cells. An object's *position* is the name of the cell that
  holds its centre: the middle cell is "center", the middle row's outer cells are "left" and "right", the
  middle column's outer cells are "top" and "bottom". Corner cells have no name, so no object is ever
  centred in one, and no two objects in a scene share a cell.
  Centres are drawn near the middle of their cell (within 30% of a cell side), so a position is never a
  borderline call.
* A "small" object's bounding box side is 13-17% of the image side, a "large" one's 28-33%, so the two
  sizes never get close.
* Objects never overlap: bounding boxes are kept at least `_GAP` pixels apart by rejection sampling.
* The relation of object A to object B compares their centres along the axis where they differ more:
  "left of"/"right of" horizontally, "above"/"below" vertically.

Held-out compositions: the (color, shape) pairs in `HELD_OUT_PAIRS` never appear in "train" or "val" images
(nor in their question texts); every "test" image contains at least one of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# Mid grey differs in hue or lightness from every object colour (white and black included).
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
SPLITS: tuple[str, ...] = ("train", "val", "test")

# One pair per colour at most and every shape still seen with >= 6 colours in training.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("purple", "triangle"),
        ("orange", "star"),
        ("green", "circle"),
        ("blue", "square"),
        ("white", "star"),
        ("yellow", "triangle"),
    }
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
_SIZE_FRACTION: dict[str, tuple[float, float]] = {"small": (0.13, 0.17), "large": (0.28, 0.33)}
_JITTER = 0.3  # object centres stay within +-30% of a cell side of the cell's centre
# Grid cell (column, row) of each named position.
_CELL_OF: dict[str, tuple[int, int]] = {
    "left": (0, 1),
    "right": (2, 1),
    "top": (1, 0),
    "bottom": (1, 2),
    "center": (1, 1),
}
_POSITION_OF_CELL: dict[tuple[int, int], str] = {cell: name for name, cell in _CELL_OF.items()}
_POSITION_PHRASE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_RELATION_PHRASE: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
_GAP = 4  # minimum pixels between two bounding boxes
_MAX_TRIES = 200


@dataclass(frozen=True)
class SceneObject:
    """One shape. `bbox` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    color: str
    shape: str
    size: str
    position: str
    bbox: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bbox"] = list(self.bbox)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneObject:
        return cls(d["color"], d["shape"], d["size"], d["position"], tuple(d["bbox"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    image_size: int = 224
    background: tuple[int, int, int] = BACKGROUND


@dataclass(frozen=True)
class Question:
    question: str
    answer: str
    type: str  # "color" | "shape" | "count" | "exists" | "position"


@dataclass(frozen=True)
class SceneExample:
    """A scene with its captions and questions; the image is rendered on demand with `render`."""

    scene: Scene
    captions: tuple[str, ...]
    questions: tuple[Question, ...]


# ---------------------------------------------------------------------------------------------- geometry


def position_of(center: tuple[float, float], image_size: int) -> str | None:
    """Name of the 3x3 grid cell holding `center`, or None for a corner cell."""
    cell = tuple(min(int(v * 3 / image_size), 2) for v in center)
    return _POSITION_OF_CELL.get(cell)  # type: ignore[arg-type]


def relation(a: SceneObject, b: SceneObject) -> str:
    """Spatial relation of `a` to `b` along the axis where their centres differ more."""
    (ax, ay), (bx, by) = a.center, b.center
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


def _boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]


def _place(rng: random.Random, size: str, position: str, image_size: int) -> tuple[int, int, int, int]:
    """A bbox of the given size, centred near the middle of `position`'s cell and inside the image."""
    lo, hi = _SIZE_FRACTION[size]
    side = round(rng.uniform(lo, hi) * image_size)
    col, row = _CELL_OF[position]
    cell = image_size / 3
    corners = []
    for index in (col, row):
        center = (index + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        # Clamping keeps the box inside the image; the centre stays in its cell because side < cell.
        corners.append(round(min(max(center - side / 2, 0), image_size - side)))
    x0, y0 = corners
    return (x0, y0, x0 + side, y0 + side)


# ---------------------------------------------------------------------------------------------- sampling


def _derive_seed(*parts: object) -> int:
    """A stable 64-bit seed from any parts (Python's hash() is salted per process, so not that)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _sample_pairs(rng: random.Random, n_objects: int, split: str) -> list[tuple[str, str]]:
    """Distinct (color, shape) pairs; train/val avoid held-out pairs, test includes at least one."""
    if split == "test":
        first = rng.choice(sorted(HELD_OUT_PAIRS))
        rest = rng.sample([p for p in ALL_PAIRS if p != first], n_objects - 1)
        pairs = [first, *rest]
        rng.shuffle(pairs)
        return pairs
    return rng.sample(TRAIN_PAIRS, n_objects)


def sample_scene(rng: random.Random, split: str, image_size: int = 224) -> Scene:
    """Rejection-sample a scene of 1-3 non-overlapping objects in distinct grid cells."""
    for _ in range(_MAX_TRIES):
        n_objects = rng.randint(1, 3)
        pairs = _sample_pairs(rng, n_objects, split)
        positions = rng.sample(POSITIONS, n_objects)
        objects: list[SceneObject] = []
        for (color, shape), position in zip(pairs, positions, strict=True):
            size = rng.choice(SIZES)
            box = _place(rng, size, position, image_size)
            if not all(_boxes_apart(box, o.bbox) for o in objects):
                break
            objects.append(SceneObject(color, shape, size, position, box))
        if len(objects) == n_objects:
            return Scene(tuple(objects), image_size)
    raise RuntimeError(f"could not place objects in a {image_size}px image; use image_size >= 64")


# ---------------------------------------------------------------------------------------------- rendering


def _star_points(box: tuple[int, int, int, int], inner_ratio: float = 0.42) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * inner_ratio
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def render(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image (no anti-aliasing, so output is exact and fast)."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLORS[obj.color]
        x0, y0, x1, y1 = obj.bbox
        box = (x0, y0, x1 - 1, y1 - 1)  # PIL boxes are inclusive
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
        elif obj.shape == "star":
            draw.polygon(_star_points(box), fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    return image


# ---------------------------------------------------------------------------------------------- captions


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _phrase(obj: SceneObject, with_size: bool = True) -> str:
    return _with_article(f"{obj.size} {obj.color} {obj.shape}" if with_size else f"{obj.color} {obj.shape}")


def _listing(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _left_to_right(objects: tuple[SceneObject, ...]) -> list[SceneObject]:
    return sorted(objects, key=lambda o: (o.center[0], o.center[1]))


def make_captions(scene: Scene, rng: random.Random) -> tuple[str, ...]:
    """Five captions from varied templates; each names every object's color and shape."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    n = len(objs)
    sized = [_phrase(o) for o in objs]
    plain = [_phrase(o, with_size=False) for o in objs]
    placed = [f"{_phrase(o)} {_POSITION_PHRASE[o.position]}" for o in objs]
    count = NUMBER_WORDS[n]
    if n == 1:
        return (
            sized[0],
            placed[0],
            f"a picture of {sized[0]}",
            f"one shape: {plain[0]} on a gray background",
            f"{plain[0]} {_POSITION_PHRASE[objs[0].position]}",
        )
    ordered = _left_to_right(scene.objects)
    a, b = objs[0], objs[1]
    related = f"{_phrase(a)} {_RELATION_PHRASE[relation(a, b)]} {_phrase(b)}"
    if n == 3:
        related += f", and {placed[2]}"
    return (
        related,
        f"{count} shapes: {_listing(plain)}",
        f"a picture of {count} shapes: {_listing(sized)}",
        _listing(placed),
        f"from left to right: {_listing([_phrase(o) for o in ordered])}",
    )


_CAPTION_PATTERN = re.compile(
    r"\b(?:(?P<size>small|large)\s+)?(?P<color>" + "|".join(COLORS) + r")\s+(?P<shape>" + "|".join(SHAPES) + r")s?\b"
)


def caption_attributes(caption: str) -> list[tuple[str | None, str, str]]:
    """(size or None, color, shape) for each "[size] color shape" mention, in order of appearance.

    Plurals ("two red circles") count as one mention; words outside the scene vocabulary are ignored.
    """
    return [(m.group("size"), m.group("color"), m.group("shape")) for m in _CAPTION_PATTERN.finditer(caption.lower())]


# ---------------------------------------------------------------------------------------------- questions


def make_questions(scene: Scene, split: str, rng: random.Random) -> tuple[Question, ...]:
    """Questions with single-word answers, only where the answer is unambiguous."""
    objs = scene.objects
    questions = [Question("how many shapes are there?", NUMBER_WORDS[len(objs)], "count")]
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    color_counts = {c: sum(o.color == c for o in objs) for c in COLORS}
    for obj in objs:
        if shape_counts[obj.shape] == 1:
            questions.append(Question(f"what color is the {obj.shape}?", obj.color, "color"))
        if color_counts[obj.color] == 1:
            questions.append(Question(f"what shape is the {obj.color} object?", obj.shape, "shape"))
        questions.append(Question(f"where is the {obj.color} {obj.shape}?", obj.position, "position"))
    present = rng.choice(objs)
    questions.append(Question(f"is there {_phrase(present, with_size=False)}?", "yes", "exists"))
    # Train/val question texts never mention a held-out pair either.
    candidates = ALL_PAIRS if split == "test" else TRAIN_PAIRS
    in_scene = {(o.color, o.shape) for o in objs}
    color, shape = rng.choice([p for p in candidates if p not in in_scene])
    questions.append(Question(f"is there {_with_article(f'{color} {shape}')}?", "no", "exists"))
    return tuple(questions)


# ---------------------------------------------------------------------------------------------- splits


def make_example(split: str, index: int, seed: int, image_size: int = 224) -> SceneExample:
    """Example `index` of a split; independent of every other index, so any subset is cheap."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(_derive_seed("blip2-scenes", split, seed, index))
    scene = sample_scene(rng, split, image_size)
    return SceneExample(scene, make_captions(scene, rng), make_questions(scene, split, rng))


def make_split(name: str, n: int, seed: int = 0, image_size: int = 224) -> list[SceneExample]:
    """`n` examples of split `name` ("train", "val" or "test"); images are rendered with `render`."""
    return [make_example(name, i, seed, image_size) for i in range(n)]


def write_split(root: str | Path, name: str, n: int, seed: int = 0, image_size: int = 224) -> Path:
    """Write split `name` to `root/name/` and return that folder. Same arguments give identical bytes.

    Layout: `images/{name}_{i:06d}.png`, `captions.jsonl`, `questions.jsonl`, and the COCO/VQA style
    `captions_coco.json`, `vqa_questions.json`, `vqa_annotations.json`. Image ids are the indices `i`;
    question ids are `i * 100 + k` for the image's k-th question. Paths in the files are relative to
    `root/name/`. VQA annotations repeat the single answer ten times, so the standard 10-answer accuracy
    applies unchanged.
    """
    out = Path(root) / name
    (out / "images").mkdir(parents=True, exist_ok=True)
    examples = make_split(name, n, seed, image_size)
    caption_lines, question_lines = [], []
    coco: dict[str, list[dict[str, Any]]] = {"images": [], "annotations": []}
    vqa_questions: list[dict[str, Any]] = []
    vqa_annotations: list[dict[str, Any]] = []
    for image_id, example in enumerate(examples):
        rel_path = f"images/{name}_{image_id:06d}.png"
        render(example.scene).save(out / rel_path, format="PNG")
        objects = [o.to_dict() for o in example.scene.objects]
        caption_lines.append({"image": rel_path, "captions": list(example.captions), "objects": objects})
        coco["images"].append({"id": image_id, "file_name": rel_path})
        for caption in example.captions:
            coco["annotations"].append({"image_id": image_id, "id": len(coco["annotations"]), "caption": caption})
        for k, q in enumerate(example.questions):
            question_id = image_id * 100 + k
            question_lines.append({"image": rel_path, "question": q.question, "answer": q.answer, "type": q.type})
            vqa_questions.append({"image_id": image_id, "question_id": question_id, "question": q.question})
            vqa_annotations.append(
                {
                    "question_id": question_id,
                    "image_id": image_id,
                    "question_type": q.type,
                    "answer_type": _ANSWER_TYPE[q.type],
                    "multiple_choice_answer": q.answer,
                    "answers": [
                        {"answer": q.answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)
                    ],
                }
            )
    _write_jsonl(out / "captions.jsonl", caption_lines)
    _write_jsonl(out / "questions.jsonl", question_lines)
    _write_json(out / "captions_coco.json", coco)
    _write_json(out / "vqa_questions.json", {"questions": vqa_questions})
    _write_json(out / "vqa_annotations.json", {"annotations": vqa_annotations})
    return out


_ANSWER_TYPE = {"count": "number", "exists": "yes/no", "color": "other", "shape": "other", "position": "other"}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


def detailed_caption(objects: list[dict[str, Any]]) -> str:
    """One caption that names everything a scene shows: "two shapes: a small red circle on the left and a
    large blue square at the top" (objects left to right, top to bottom)."""
    phrases = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
    ordered = sorted(objects, key=lambda o: ((o["bbox"][0] + o["bbox"][2]) / 2, (o["bbox"][1] + o["bbox"][3]) / 2))
    parts = []
    for o in ordered:
        words = f"{o['size']} {o['color']} {o['shape']}"
        article = "an" if words[0] in "aeiou" else "a"
        parts.append(f"{article} {words} {phrases.get(o['position'], 'in the center')}")
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(objects)
    return f"{NUMBER_WORDS[n]} shape{'s' if n != 1 else ''}: {listing}"
