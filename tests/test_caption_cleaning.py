"""LAVIS's caption / question cleaning (blip2.data.text) and the recipes' ``data.clean_captions`` switch.

The expected strings were checked against LAVIS's own ``BlipCaptionProcessor`` / ``BlipQuestionProcessor``
(506965b); tests/test_lavis_parity.py (slow, needs LAVIS) compares the two on 2,000+ random strings.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml
from PIL import Image
from torch.utils.data import IterableDataset

from blip2.data.datasets import SkippedSample
from blip2.data.text import CLEANED_PUNCTUATION, clean_caption, clean_captions, clean_question

REPO = Path(__file__).resolve().parents[1]


def test_the_character_set_is_lavis() -> None:
    assert sorted(CLEANED_PUNCTUATION) == sorted('.!"()*#:;~')


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A Dog on the Beach.", "a dog on the beach"),
        ('He said "Hi!" (twice); *wow* #1: ok~', "he said hi twice wow 1 ok"),
        ("commas, apostrophes' and questions? stay - also a/b", "commas, apostrophes' and questions? stay - also a/b"),
        ("  spaces   collapse  ", "spaces collapse"),
        ("a.b", "a b"),  # replaced by a space, not removed
        ("one\ttab and one\nnewline stay", "one\ttab and one\nnewline stay"),  # only runs of 2+ collapse
        ("trailing newline\n", "trailing newline"),
        ("...", ""),
        ("ÉCOLE Straße", "école straße"),
    ],
)
def test_clean_caption(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_clean_caption_keeps_at_most_max_words() -> None:
    assert clean_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert clean_caption("a b c d", max_words=2) == "a b"
    assert clean_caption("a b", max_words=2) == "a b"
    with pytest.raises(ValueError, match="max_words"):
        clean_caption("a", max_words=0)


def test_clean_question_removes_the_characters() -> None:
    assert clean_question("What color is the (big) Car?  ") == "what color is the big car?"
    assert clean_question("a.b") == "ab"  # removed, not replaced by a space
    assert clean_question("q " * 60).split(" ")[-1] == "q" and len(clean_question("q " * 60).split(" ")) == 50


class _Items:
    def __init__(self) -> None:
        self.epoch = -1
        self.items = [
            {"image": 0, "text": "A Cat.", "captions": ["A Cat.", "The CAT!"], "image_id": 1},
            SkippedSample("bad.jpg", "truncated"),
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> object:
        return self.items[index]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class _Stream(IterableDataset):
    def __iter__(self):  # noqa: ANN204
        yield {"image": 0, "text": "Two  Dogs."}
        yield None


def test_clean_captions_wraps_map_and_stream_datasets() -> None:
    inner = _Items()
    data = clean_captions(inner)
    assert len(data) == 2
    assert data[0] == {"image": 0, "text": "a cat", "captions": ["a cat", "the cat"], "image_id": 1}
    assert isinstance(data[1], SkippedSample)  # skipped samples pass through untouched
    data.set_epoch(3)
    assert inner.epoch == 3 and data.items is inner.items  # attributes reach the wrapped dataset
    assert pickle.loads(pickle.dumps(data))[0]["text"] == "a cat"  # DataLoader workers get a copy
    stream = clean_captions(_Stream())
    assert isinstance(stream, IterableDataset)
    assert list(stream) == [{"image": 0, "text": "two dogs"}, None]


def test_recipe_switch_cleans_the_training_captions(tmp_path: Path) -> None:
    from blip2.testing import make_tiny_model
    from blip2.train.recipes import build_dataset

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "caption": "A RED Square."}) + "\n")
    model = make_tiny_model(None, llm=None)
    section = {"kind": "jsonl", "annotations": str(tmp_path / "c.jsonl"), "images": str(tmp_path)}
    raw, _ = build_dataset(section, model, tmp_path)
    assert raw[0]["text"] == "A RED Square."  # off unless the recipe asks
    cleaned, _ = build_dataset({**section, "clean_captions": True, "max_words": 2}, model, tmp_path)
    assert cleaned[0]["text"] == "a red"


@pytest.mark.parametrize("recipe", ["stage1_vitg.yaml", "stage2_opt2.7b.yaml", "stage2_flant5xl.yaml"])
def test_paper_recipes_clean_captions(recipe: str) -> None:
    data = yaml.safe_load((REPO / "configs" / recipe).read_text())["data"]
    assert data["clean_captions"] is True and data.get("max_words", 50) == 50
