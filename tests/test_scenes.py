"""Synthetic scenes: determinism, the five splits (held-out compositions, shifted drawing and wordings), geometry,
and that every question has one answer."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from blip2.data.scene_files import write_split
from blip2.data.scenes import (
    COLORS,
    HELD_OUT_PAIRS,
    HELD_OUT_WORDINGS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    SPLITS,
    TRAIN_WORDINGS,
    Question,
    Scene,
    SceneExample,
    SceneObject,
    caption_attributes,
    detailed_caption,
    make_example,
    make_split,
    position_of,
    relation,
    render,
    sample_questions,
    scene_vocabulary,
    text_tokens,
)

TRAIN = make_split("train", 300, seed=0)
VAL = make_split("val", 100, seed=0)
TEST = make_split("test", 150, seed=0)
COMPOSITIONAL = make_split("compositional", 150, seed=0)
SHIFTED = make_split("shifted", 150, seed=0)
TRAINING_DISTRIBUTION = TRAIN + VAL + TEST + COMPOSITIONAL  # drawn alike; only the pairs differ
ALL = TRAINING_DISTRIBUTION + SHIFTED


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
    for split, examples in (("test", TEST), ("compositional", COMPOSITIONAL), ("shifted", SHIFTED)):
        assert make_example(split, 7, seed=0) == examples[7]
    # Each split has its own seeds: no two splits share a scene.
    scenes = [e.scene.objects for part in (TRAIN, TEST, COMPOSITIONAL, SHIFTED) for e in part[:100]]
    assert len(set(scenes)) == len(scenes)


def test_held_out_pairs_only_in_the_compositional_split() -> None:
    for example in TRAIN + VAL + TEST + SHIFTED:
        assert not {(o.color, o.shape) for o in example.scene.objects} & HELD_OUT_PAIRS
        for q in example.questions:
            assert not any(f"{c} {s}" in q.question for c, s in HELD_OUT_PAIRS), q.question
            assert not any(f"{c} {s}" in caption for caption in example.captions for c, s in HELD_OUT_PAIRS)


def test_every_compositional_image_has_a_held_out_pair() -> None:
    for example in COMPOSITIONAL:
        assert {(o.color, o.shape) for o in example.scene.objects} & HELD_OUT_PAIRS
    seen = {(o.color, o.shape) for e in COMPOSITIONAL for o in e.scene.objects}
    assert seen >= HELD_OUT_PAIRS


def test_backgrounds_are_drawn_per_scene() -> None:
    for examples, levels in ((TRAINING_DISTRIBUTION, range(112, 145)), (SHIFTED, [*range(92, 105), *range(152, 165)])):
        greys = [e.scene.background for e in examples]
        assert all(r == g == b and g in levels for r, g, b in greys)
        assert len(set(greys)) > 10
    shifted = {g for g, _, _ in (e.scene.background for e in SHIFTED)}
    assert min(shifted) < 112 and max(shifted) > 144  # both the darker and the lighter range occur


def test_vocabulary_is_covered() -> None:
    objects = [o for e in TRAIN for o in e.scene.objects]
    assert {o.color for o in objects} == set(COLORS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {len(e.scene.objects) for e in TRAIN} == {1, 2, 3}


def _check_geometry(example: SceneExample) -> None:
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


def _sides(examples: list[SceneExample], size: str) -> list[int]:
    return [o.bbox[2] - o.bbox[0] for e in examples for o in e.scene.objects if o.size == size]


def test_geometry_is_clean() -> None:
    assert max(_sides(TRAINING_DISTRIBUTION, "small")) * 1.5 < min(_sides(TRAINING_DISTRIBUTION, "large"))
    assert max(_sides(SHIFTED, "small")) * 1.4 < min(_sides(SHIFTED, "large"))
    for example in ALL:
        _check_geometry(example)


def test_shifted_placement_is_wider() -> None:
    """Shifted sizes reach outside the training ranges, and shifted centres stray further from their cell's
    centre (in cell sides) -- yet every centre stays in its named cell (checked in `_check_geometry`)."""
    cell = 224 / 3
    small, large = _sides(TRAINING_DISTRIBUTION, "small"), _sides(TRAINING_DISTRIBUTION, "large")
    assert min(_sides(SHIFTED, "small")) < min(small) and max(_sides(SHIFTED, "large")) > max(large)

    def offsets(examples: list[SceneExample]) -> list[float]:
        return [abs(o.center[0] / cell % 1 - 0.5) for e in examples for o in e.scene.objects if o.position == "center"]

    assert max(offsets(TRAINING_DISTRIBUTION)) <= 0.3 + 0.01 < max(offsets(SHIFTED)) <= 0.4 + 0.01


@pytest.mark.parametrize("split", SPLITS)
def test_small_images_work_for_every_split(split: str) -> None:
    """The demo renders at 64 px: rejection sampling succeeds, geometry holds, every object is visible."""
    for example in make_split(split, 200, seed=5, image_size=64):
        _check_geometry(example)
        image = render(example.scene)
        assert image.size == (64, 64)
        for obj in example.scene.objects:
            cx, cy = (int(v) for v in obj.center)
            assert image.getpixel((cx, cy)) == COLORS[obj.color]


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
    for example in ALL[:30] + SHIFTED[:30]:
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


def _pattern(template: str) -> re.Pattern[str]:
    """A wording template as a regex: {shape} and {color} capture a word, {object} an article and two words."""
    fields = {
        "shape": "(?P<shape>[a-z]+)",
        "color": "(?P<color>[a-z]+)",
        "object": "an? (?P<color>[a-z]+) (?P<shape>[a-z]+)",
    }
    return re.compile(re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**fields))


def _wording(question: Question) -> tuple[str, re.Match[str]]:
    """("train", match) or ("held_out", match) for the one wording of `question.type` that `question` matches."""
    found = [
        (table, m)
        for table, wordings in (("train", TRAIN_WORDINGS), ("held_out", HELD_OUT_WORDINGS))
        for template in wordings[question.type]
        if (m := _pattern(template).fullmatch(question.question))
    ]
    assert len(found) == 1, question
    return found[0]


def _oracle(question: Question, scene: Scene) -> set[str]:
    """All answers consistent with the scene; an unambiguous question has exactly one."""
    objs = scene.objects
    _, m = _wording(question)
    fields = m.groupdict()
    if question.type == "count":
        return {NUMBER_WORDS[len(objs)]}
    if question.type == "color":
        return {o.color for o in objs if o.shape == fields["shape"]}
    if question.type == "shape":
        return {o.shape for o in objs if o.color == fields["color"]}
    if question.type == "exists":
        return {"yes" if any((o.color, o.shape) == (fields["color"], fields["shape"]) for o in objs) else "no"}
    if question.type == "position":
        pair = (fields["color"], fields["shape"])
        return {position_of(o.center, scene.image_size) for o in objs if (o.color, o.shape) == pair}
    raise AssertionError(f"unexpected question {question!r}")


def _check_questions(scene: Scene, questions: tuple[Question, ...]) -> Counter[str]:
    assert len({q.question for q in questions}) == len(questions)
    assert [q.answer for q in questions if q.type == "exists"] == ["yes", "no"]
    for q in questions:
        assert _oracle(q, scene) == {q.answer}, q
        assert re.fullmatch(r"[a-z]+", q.answer)
    return Counter(q.type for q in questions)


def test_every_question_has_exactly_one_answer() -> None:
    types: Counter[str] = Counter()
    for example in ALL:
        types += _check_questions(example.scene, example.questions)
    assert set(types) == {"color", "shape", "count", "exists", "position"}


def test_splits_use_canonical_wordings_and_shifted_held_out_ones() -> None:
    canonical = {wordings[0] for wordings in TRAIN_WORDINGS.values()}
    for example in TRAINING_DISTRIBUTION:
        for q in example.questions:
            table, m = _wording(q)
            assert table == "train" and m.re.pattern in {_pattern(t).pattern for t in canonical}, q
    used: Counter[str] = Counter()
    for example in SHIFTED:
        for q in example.questions:
            table, m = _wording(q)
            assert table == "held_out", q
            used[m.re.pattern] += 1
    assert len(used) == sum(map(len, HELD_OUT_WORDINGS.values()))  # every held-out wording is asked


def test_sampled_questions_vary_over_training_wordings() -> None:
    rng = random.Random(0)
    used: Counter[str] = Counter()
    for example in TRAIN[:200]:
        questions = sample_questions(example.scene, rng)
        assert [(q.type, q.answer) for q in questions] == [(q.type, q.answer) for q in example.questions]
        _check_questions(example.scene, questions)
        for q in questions:
            table, m = _wording(q)
            assert table == "train"
            used[m.re.pattern] += 1
            assert not any(f"{c} {s}" in q.question for c, s in HELD_OUT_PAIRS), q.question
    assert len(used) == sum(map(len, TRAIN_WORDINGS.values()))
    held_out = sample_questions(TRAIN[0].scene, rng, wordings="held_out")
    assert all(_wording(q)[0] == "held_out" for q in held_out)
    with pytest.raises(ValueError, match="unknown wording"):
        sample_questions(TRAIN[0].scene, rng, wordings="odd")


def test_wording_tables() -> None:
    assert set(TRAIN_WORDINGS) == set(HELD_OUT_WORDINGS) == {"count", "color", "shape", "position", "exists"}
    assert all(3 <= len(w) <= 4 for w in TRAIN_WORDINGS.values())
    assert all(2 <= len(w) <= 3 for w in HELD_OUT_WORDINGS.values())
    for kind, held_out in HELD_OUT_WORDINGS.items():
        assert not set(held_out) & {t for ts in TRAIN_WORDINGS.values() for t in ts}, kind


def test_held_out_wordings_use_only_words_seen_in_training_texts() -> None:
    """New arrangements, not new words: every word of a held-out wording is in a training wording, caption or
    detailed caption."""
    training_words: set[str] = set()
    for templates in TRAIN_WORDINGS.values():
        for template in templates:
            training_words.update(text_tokens(template))
    for example in TRAIN:
        for caption in example.captions:
            training_words.update(text_tokens(caption))
        objects = [o.to_dict() for o in example.scene.objects]
        training_words.update(text_tokens(detailed_caption(objects)))
    for templates in HELD_OUT_WORDINGS.values():
        for template in templates:
            new = set(text_tokens(template)) - training_words - {"shape", "color", "object"}
            assert not new, (template, new)


def test_scene_vocabulary_covers_every_text() -> None:
    vocabulary = scene_vocabulary()
    assert vocabulary == sorted(set(vocabulary)) and {"?", ".", ",", ":"} <= set(vocabulary)
    rng = random.Random(1)
    seen: set[str] = set()
    for example in ALL:
        texts = [*example.captions, detailed_caption([o.to_dict() for o in example.scene.objects])]
        for q in (*example.questions, *sample_questions(example.scene, rng)):
            texts += [q.question, q.answer]
        for text in texts:
            tokens = text_tokens(text)
            assert "".join(tokens) == re.sub(r"\s", "", text.lower()), text  # no character is dropped
            seen.update(tokens)
    assert seen <= set(vocabulary), seen - set(vocabulary)
    assert len(seen) > 0.9 * len(vocabulary)


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


@pytest.mark.parametrize("split", SPLITS)
def test_written_files_have_the_documented_formats(tmp_path: Path, split: str) -> None:
    from blip2.eval.scenes import load_scenes_eval

    out = write_split(tmp_path, split, 4, seed=1, image_size=64)
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert len(captions) == 4 and set(captions[0]) == {"image", "captions", "objects", "background"}
    examples = make_split(split, 4, seed=1, image_size=64)
    assert [row["background"] for row in captions] == [list(e.scene.background) for e in examples]
    assert set(captions[0]["objects"][0]) == {"color", "shape", "size", "position", "bbox"}
    assert all((out / row["image"]).is_file() for row in captions)
    assert set(questions[0]) == {"image", "question", "answer", "type"}
    coco = json.loads((out / "captions_coco.json").read_text())
    assert len(coco["images"]) == 4 and len(coco["annotations"]) == 20
    vqa_q = json.loads((out / "vqa_questions.json").read_text())["questions"]
    vqa_a = json.loads((out / "vqa_annotations.json").read_text())["annotations"]
    assert len(vqa_q) == len(vqa_a) == len(questions)
    assert all(len(a["answers"]) == 10 and a["question_type"] for a in vqa_a)
    data = load_scenes_eval(out)
    assert len(data["paths"]) == 4 and len(data["questions"]) == len(questions)
