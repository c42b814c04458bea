"""Synthetic scenes: determinism, held-out compositions, geometry, and that every question has one answer."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from blip2.data.scenes import (
    COLORS,
    HELD_OUT_PAIRS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    Scene,
    SceneExample,
    SceneObject,
    caption_attributes,
    make_split,
    position_of,
    relation,
    render,
    write_split,
)

TRAIN = make_split("train", 300, seed=0)
VAL = make_split("val", 100, seed=0)
TEST = make_split("test", 150, seed=0)
ALL = TRAIN + VAL + TEST


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = _files(write_split(tmp_path / "a", "train", 8, seed=3))
    b = _files(write_split(tmp_path / "b", "train", 8, seed=3))
    assert len(a) == 8 + 5 and a == b
    c = _files(write_split(tmp_path / "c", "train", 8, seed=4))
    assert c["captions.jsonl"] != a["captions.jsonl"]


def test_examples_do_not_depend_on_split_length() -> None:
    assert make_split("val", 5, seed=0) == VAL[:5]
    assert make_split("val", 5, seed=1) != VAL[:5]


def test_held_out_pairs_never_in_train_or_val() -> None:
    for example in TRAIN + VAL:
        assert not {(o.color, o.shape) for o in example.scene.objects} & HELD_OUT_PAIRS
        for q in example.questions:
            assert not any(f"{c} {s}" in q.question for c, s in HELD_OUT_PAIRS), q.question
            assert not any(f"{c} {s}" in caption for caption in example.captions for c, s in HELD_OUT_PAIRS)


def test_every_test_image_has_a_held_out_pair() -> None:
    for example in TEST:
        assert {(o.color, o.shape) for o in example.scene.objects} & HELD_OUT_PAIRS
    seen = {(o.color, o.shape) for e in TEST for o in e.scene.objects}
    assert seen >= HELD_OUT_PAIRS


def test_vocabulary_is_covered() -> None:
    objects = [o for e in TRAIN for o in e.scene.objects]
    assert {o.color for o in objects} == set(COLORS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {len(e.scene.objects) for e in TRAIN} == {1, 2, 3}


def test_geometry_is_clean() -> None:
    small = [o for e in ALL for o in e.scene.objects if o.size == "small"]
    large = [o for e in ALL for o in e.scene.objects if o.size == "large"]
    side = lambda o: o.bbox[2] - o.bbox[0]  # noqa: E731
    assert max(map(side, small)) * 1.5 < min(map(side, large))
    for example in ALL:
        objs = example.scene.objects
        size = example.scene.image_size
        assert len({o.position for o in objs}) == len(objs)
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        for i, a in enumerate(objs):
            assert 0 <= a.bbox[0] < a.bbox[2] <= size and 0 <= a.bbox[1] < a.bbox[3] <= size
            assert position_of(a.center, size) == a.position
            for b in objs[i + 1 :]:
                overlap_x = min(a.bbox[2], b.bbox[2]) - max(a.bbox[0], b.bbox[0])
                overlap_y = min(a.bbox[3], b.bbox[3]) - max(a.bbox[1], b.bbox[1])
                assert overlap_x <= 0 or overlap_y <= 0


def test_position_and_relation_definitions() -> None:
    assert position_of((10, 112), 224) == "left"
    assert position_of((112, 10), 224) == "top"
    assert position_of((112, 112), 224) == "center"
    assert position_of((10, 10), 224) is None
    a = SceneObject("red", "circle", "small", "left", (10, 100, 40, 130))
    b = SceneObject("blue", "square", "small", "center", (100, 90, 130, 120))
    assert relation(a, b) == "left of" and relation(b, a) == "right of"
    c = SceneObject("green", "star", "small", "top", (100, 10, 130, 40))
    assert relation(c, b) == "above" and relation(b, c) == "below"


def test_render_draws_each_object_in_its_color() -> None:
    for example in ALL[:60]:
        image = render(example.scene)
        assert image.mode == "RGB" and image.size == (224, 224)
        for obj in example.scene.objects:
            cx, cy = (int(v) for v in obj.center)
            assert image.getpixel((cx, cy)) == COLORS[obj.color]
        assert Counter(image.getdata())[example.scene.background] > 224 * 224 // 3


def test_image_size_is_configurable() -> None:
    example = make_split("train", 1, seed=0, image_size=96)[0]
    assert render(example.scene).size == (96, 96)
    assert all(o.bbox[2] <= 96 and o.bbox[3] <= 96 for o in example.scene.objects)


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        make_split("dev", 1)


def _oracle(question: str, scene: Scene) -> set[str]:
    """All answers consistent with the scene; an unambiguous question has exactly one."""
    objs = scene.objects
    if question == "how many shapes are there?":
        return {NUMBER_WORDS[len(objs)]}
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        return {o.color for o in objs if o.shape == m[1]}
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return {o.shape for o in objs if o.color == m[1]}
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return {"yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objs) else "no"}
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        return {position_of(o.center, scene.image_size) for o in objs if (o.color, o.shape) == (m[1], m[2])}
    raise AssertionError(f"unexpected question {question!r}")


def test_every_question_has_exactly_one_answer() -> None:
    types: Counter[str] = Counter()
    for example in ALL:
        assert len({q.question for q in example.questions}) == len(example.questions)
        for q in example.questions:
            assert _oracle(q.question, example.scene) == {q.answer}, q
            assert re.fullmatch(r"[a-z]+", q.answer)
            types[q.type] += 1
    assert set(types) == {"color", "shape", "count", "exists", "position"}
    assert {q.answer for e in ALL for q in e.questions if q.type == "exists"} == {"yes", "no"}


def _check_captions(example: SceneExample) -> None:
    objects = Counter((o.color, o.shape) for o in example.scene.objects)
    size_of = {(o.color, o.shape): o.size for o in example.scene.objects}
    assert len(set(example.captions)) == len(example.captions) == 5
    for caption in example.captions:
        mentions = caption_attributes(caption)
        assert Counter((c, s) for _, c, s in mentions) == objects, caption
        assert all(size in (None, size_of[(c, s)]) for size, c, s in mentions), caption


def test_captions_round_trip_through_the_parser() -> None:
    for example in ALL:
        _check_captions(example)
    with_size = sum(all(s is not None for s, _, _ in caption_attributes(c)) for e in ALL for c in e.captions)
    assert with_size > len(ALL) * 3  # most captions state sizes


def test_caption_parser_on_free_text() -> None:
    assert caption_attributes("A Large RED circle next to two blue squares.") == [
        ("large", "red", "circle"),
        (None, "blue", "square"),
    ]
    assert caption_attributes("a dog on a big green field") == []


def test_written_files_have_the_documented_formats(tmp_path: Path) -> None:
    out = write_split(tmp_path, "test", 4, seed=1)
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert len(captions) == 4 and set(captions[0]) == {"image", "captions", "objects"}
    assert set(captions[0]["objects"][0]) == {"color", "shape", "size", "position", "bbox"}
    assert all((out / row["image"]).is_file() for row in captions)
    assert set(questions[0]) == {"image", "question", "answer", "type"}
    coco = json.loads((out / "captions_coco.json").read_text())
    assert len(coco["images"]) == 4 and len(coco["annotations"]) == 20
    vqa_q = json.loads((out / "vqa_questions.json").read_text())["questions"]
    vqa_a = json.loads((out / "vqa_annotations.json").read_text())["annotations"]
    assert len(vqa_q) == len(vqa_a) == len(questions)
    assert all(len(a["answers"]) == 10 and a["question_type"] for a in vqa_a)
