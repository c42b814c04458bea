"""Deterministic synthetic scenes: coloured shapes on a grey background, with captions and questions.

The scenes make an offline BLIP-2 demo possible: every image is rendered from a small `Scene` description,
so captions and question answers are exact, attributes can be scored from generated text
(`caption_attributes`), and two extra evaluation splits test generalisation.

Geometry conventions (all in pixels of an `image_size` x `image_size` image):

* The image is divided into a 3x3 grid of equal cells. An object's *position* is the name of the cell that
  holds its centre: the middle cell is "center", the middle row's outer cells are "left" and "right", the
  middle column's outer cells are "top" and "bottom". Corner cells have no name, so no object is ever
  centred in one, and no two objects in a scene share a cell.
  Centres are drawn near the middle of their cell (within 30% of a cell side; 40% in "shifted"), so a
  position is never a borderline call.
* A "small" object's bounding box side is 13-17% of the image side, a "large" one's 28-33% (12-18% and
  27-34% in "shifted"), so the two sizes never get close.
* Objects never overlap: bounding boxes are kept at least `_GAP` pixels apart by rejection sampling.
* The background is a mid grey (g, g, g) drawn per scene: g in [112, 144] in the training distribution,
  in [92, 104] or [152, 164] in "shifted". Every grey differs in hue or lightness from every object colour.
* The relation of object A to object B compares their centres along the axis where they differ more:
  "left of"/"right of" horizontally, "above"/"below" vertically.

Splits (`SPLITS`); every split's examples are seeded by (split, seed, index), so splits are independent:

* "train", "val", "test": one distribution. Only `TRAIN_PAIRS` appear, in images and in question texts.
  "test" is the split of headline figures.
* "compositional": every image contains at least one of `HELD_OUT_PAIRS`; "no" questions may name any pair.
* "shifted": training pairs only, but other backgrounds, wider placement and size ranges, and questions in
  held-out wordings (`HELD_OUT_WORDINGS`: new arrangements of words that training texts already use).

Question wordings: `TRAIN_WORDINGS[type][0]` is the canonical wording, the one `make_questions` writes for
every split but "shifted"; `sample_questions` draws any training wording (varied text for pretraining).
`scene_vocabulary` lists every word any caption, question or answer can use.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageDraw

from blip2.data.scene_wordings import HELD_OUT_WORDINGS, TRAIN_WORDINGS

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
# Mid grey differs in hue or lightness from every object colour (white and black included). Scenes draw
# their own grey (see `_BACKGROUND_RANGES`); this is the default of a hand-built `Scene`.
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional", "shifted")

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


@dataclass(frozen=True)
class _Drawing:
    """How a split draws its scenes: grey levels (inclusive integer ranges), box sides as fractions of the
    image side, and how far (in cell sides) a centre may stray from its cell's centre."""

    backgrounds: tuple[tuple[int, int], ...]
    sizes: dict[str, tuple[float, float]]
    jitter: float


_TRAINING_DRAWING = _Drawing(((112, 144),), {"small": (0.13, 0.17), "large": (0.28, 0.33)}, 0.3)
_SHIFTED_DRAWING = _Drawing(((92, 104), (152, 164)), {"small": (0.12, 0.18), "large": (0.27, 0.34)}, 0.4)
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

WORDING_MODES: tuple[str, ...] = ("canonical", "train", "held_out")


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


def _place(
    rng: random.Random, size: str, position: str, image_size: int, drawing: _Drawing = _TRAINING_DRAWING
) -> tuple[int, int, int, int]:
    """A bbox of the given size, centred near the middle of `position`'s cell and inside the image."""
    lo, hi = drawing.sizes[size]
    side = round(rng.uniform(lo, hi) * image_size)
    col, row = _CELL_OF[position]
    cell = image_size / 3
    corners = []
    for index in (col, row):
        center = (index + 0.5 + rng.uniform(-drawing.jitter, drawing.jitter)) * cell
        # Clamping keeps the box inside the image; it only moves an outer cell's centre towards the middle of
        # the image, to side / 2 from the edge, which stays inside the outer cell because side < 2 cells.
        corners.append(round(min(max(center - side / 2, 0), image_size - side)))
    x0, y0 = corners
    return (x0, y0, x0 + side, y0 + side)


# ---------------------------------------------------------------------------------------------- sampling


def _derive_seed(*parts: object) -> int:
    """A stable 64-bit seed from any parts (Python's hash() is salted per process, so not that)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _sample_pairs(rng: random.Random, n_objects: int, split: str) -> list[tuple[str, str]]:
    """Distinct (color, shape) pairs: training pairs only, but at least one held-out pair in "compositional"."""
    if split == "compositional":
        first = rng.choice(sorted(HELD_OUT_PAIRS))
        rest = rng.sample([p for p in ALL_PAIRS if p != first], n_objects - 1)
        pairs = [first, *rest]
        rng.shuffle(pairs)
        return pairs
    return rng.sample(TRAIN_PAIRS, n_objects)


def _background(rng: random.Random, drawing: _Drawing) -> tuple[int, int, int]:
    """A grey drawn uniformly over the union of `drawing.backgrounds` (inclusive integer ranges)."""
    levels = [g for lo, hi in drawing.backgrounds for g in range(lo, hi + 1)]
    g = rng.choice(levels)
    return (g, g, g)


def sample_scene(rng: random.Random, split: str, image_size: int = 224) -> Scene:
    """Rejection-sample a scene of 1-3 non-overlapping objects in distinct grid cells on a grey background."""
    drawing = _SHIFTED_DRAWING if split == "shifted" else _TRAINING_DRAWING
    background = _background(rng, drawing)
    for _ in range(_MAX_TRIES):
        n_objects = rng.randint(1, 3)
        pairs = _sample_pairs(rng, n_objects, split)
        positions = rng.sample(POSITIONS, n_objects)
        objects: list[SceneObject] = []
        for (color, shape), position in zip(pairs, positions, strict=True):
            size = rng.choice(SIZES)
            box = _place(rng, size, position, image_size, drawing)
            if not all(_boxes_apart(box, o.bbox) for o in objects):
                break
            objects.append(SceneObject(color, shape, size, position, box))
        if len(objects) == n_objects:
            return Scene(tuple(objects), image_size, background)
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


def _worded(kind: str, mode: str, rng: random.Random, **fields: str) -> str:
    """A question of type `kind` in the canonical, a random training or a random held-out wording."""
    if mode == "canonical":
        template = TRAIN_WORDINGS[kind][0]  # draws nothing, so canonical questions keep the rng stream
    elif mode == "train":
        template = rng.choice(TRAIN_WORDINGS[kind])
    elif mode == "held_out":
        template = rng.choice(HELD_OUT_WORDINGS[kind])
    else:
        raise ValueError(f"unknown wording {mode!r}; expected one of {WORDING_MODES}")
    return template.format(**fields)


def _questions(
    scene: Scene, rng: random.Random, no_pairs: tuple[tuple[str, str], ...], wording: str
) -> tuple[Question, ...]:
    """Questions with single-word answers, only where the answer is unambiguous: a color question only for a
    shape the scene holds once, a shape question only for a color it holds once, one "yes" and one "no"
    exists question (the "no" one naming a pair from `no_pairs` absent from the scene)."""
    if wording not in WORDING_MODES:
        raise ValueError(f"unknown wording {wording!r}; expected one of {WORDING_MODES}")
    objs = scene.objects
    questions = [Question(_worded("count", wording, rng), NUMBER_WORDS[len(objs)], "count")]
    shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    color_counts = {c: sum(o.color == c for o in objs) for c in COLORS}
    for obj in objs:
        if shape_counts[obj.shape] == 1:
            questions.append(Question(_worded("color", wording, rng, shape=obj.shape), obj.color, "color"))
        if color_counts[obj.color] == 1:
            questions.append(Question(_worded("shape", wording, rng, color=obj.color), obj.shape, "shape"))
        where = _worded("position", wording, rng, color=obj.color, shape=obj.shape)
        questions.append(Question(where, obj.position, "position"))
    present = rng.choice(objs)
    questions.append(
        Question(_worded("exists", wording, rng, object=_phrase(present, with_size=False)), "yes", "exists")
    )
    in_scene = {(o.color, o.shape) for o in objs}
    color, shape = rng.choice([p for p in no_pairs if p not in in_scene])
    questions.append(
        Question(_worded("exists", wording, rng, object=_with_article(f"{color} {shape}")), "no", "exists")
    )
    return tuple(questions)


def make_questions(scene: Scene, split: str, rng: random.Random) -> tuple[Question, ...]:
    """A split's questions: canonical wordings, but held-out wordings in "shifted"; only "compositional"
    questions may name a held-out pair (in its "no" exists question)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    no_pairs = ALL_PAIRS if split == "compositional" else TRAIN_PAIRS
    return _questions(scene, rng, no_pairs, "held_out" if split == "shifted" else "canonical")


def sample_questions(scene: Scene, rng: random.Random, wordings: str = "train") -> tuple[Question, ...]:
    """The questions `make_questions` asks of `scene`, each in a random wording of `wordings` ("train",
    "held_out" or "canonical"); "no" questions name training pairs only. For text-only pretraining on
    varied wordings."""
    return _questions(scene, rng, TRAIN_PAIRS, wordings)


# ---------------------------------------------------------------------------------------------- vocabulary

_TOKEN = re.compile(r"[a-z]+|[?.,:]")
# The fixed words of `make_captions` and `detailed_caption` (besides sizes, colors, shapes and number words).
_CAPTION_WORDS = (
    "a an the of and to on in at from picture shape shapes gray background left right top bottom center above below"
).split()


def text_tokens(text: str) -> list[str]:
    """The words of `text` as `scene_vocabulary` counts them: lowercased, with "?", ".", "," and ":" as tokens
    of their own; any other character is dropped."""
    return _TOKEN.findall(text.lower())


def scene_vocabulary() -> list[str]:
    """Every word (see `text_tokens`) that a caption, `detailed_caption`, question (any training or held-out
    wording) or answer can contain, sorted."""
    words = {*_CAPTION_WORDS, ":", ",", *NUMBER_WORDS[1:], *SIZES, *COLORS, *SHAPES, *POSITIONS, "yes", "no"}
    fills = {"shape": "", "color": "", "object": "a an"}  # {object} is an article, a color and a shape
    for table in (TRAIN_WORDINGS, HELD_OUT_WORDINGS):
        for templates in table.values():
            for template in templates:
                words.update(text_tokens(template.format(**fills)))
    return sorted(words)


# ---------------------------------------------------------------------------------------------- splits


def make_example(split: str, index: int, seed: int, image_size: int = 224) -> SceneExample:
    """Example `index` of a split; independent of every other index, so any subset is cheap."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(_derive_seed("blip2-scenes", split, seed, index))
    scene = sample_scene(rng, split, image_size)
    return SceneExample(scene, make_captions(scene, rng), make_questions(scene, split, rng))


def make_split(name: str, n: int, seed: int = 0, image_size: int = 224) -> list[SceneExample]:
    """`n` examples of split `name` (one of `SPLITS`); images are rendered with `render`."""
    return [make_example(name, i, seed, image_size) for i in range(n)]


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
