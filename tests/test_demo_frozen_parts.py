"""The demo's two frozen parts, each pretrained in its own stage: the small CNN image encoder
(`blip2.vision.SmallCNN`, `blip2.demo.encoder`) and the text-only LLM (`blip2.demo.text_llm`)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from blip2.config import small_cnn
from blip2.data.scene_files import write_split
from blip2.data.scenes import HELD_OUT_PAIRS, POSITIONS, make_example, scene_vocabulary, text_tokens
from blip2.demo.encoder import ATTRIBUTES, cell_labels, linear_probe, pretrain_encoder, scene_batch
from blip2.demo.text_llm import (
    BOS,
    IMAGE,
    STOP,
    TextLLMSettings,
    build_tokenizer,
    corpus_document,
    description_ceiling,
    pretrain_text_llm,
)
from blip2.vision import SmallCNN, build_vision_encoder


def tiny_llm_settings(steps: int = 2) -> TextLLMSettings:
    return TextLLMSettings(
        layers=1,
        steps=steps,
        batch_size=4,
        lr=1e-3,
        warmup_steps=1,
        min_lr_ratio=0.1,
        weight_decay=0.0,
        caption_probability=0.5,
        max_questions=4,
    )


# ---------------------------------------------------------------------------------------------- image encoder


def test_small_cnn_gives_grid_tokens_with_position_features() -> None:
    config = small_cnn(width=16, depth=6, downsample=3, position_features=8, image_size=64)
    encoder = build_vision_encoder(config)
    assert isinstance(encoder, SmallCNN) and encoder.hidden_size == 24 == config.hidden_size
    out = encoder(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 64, 24)  # an 8x8 grid of 16 conv + 8 position features
    position = out[0, :, 16:]
    assert torch.equal(position, out[1, :, 16:])  # fixed, the same for every image
    assert len({tuple(row.tolist()) for row in position}) == 64  # one distinct code per grid cell
    assert not any(p.requires_grad for p in encoder.parameters())  # built frozen


def test_small_cnn_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        SmallCNN(small_cnn(position_features=6))
    with pytest.raises(ValueError, match="depth"):
        SmallCNN(small_cnn(depth=4, downsample=3))


def test_cell_labels_name_each_cell() -> None:
    scene = make_example("train", 3, seed=0, image_size=64).scene
    labels = cell_labels(scene.objects)
    assert labels.shape == (len(POSITIONS), len(ATTRIBUTES))
    assert int((labels[:, 0] > 0).sum()) == len(scene.objects)
    for obj in scene.objects:
        row = labels[POSITIONS.index(obj.position)]
        assert ATTRIBUTES["color"][int(row[0]) - 1] == obj.color
        assert ATTRIBUTES["shape"][int(row[1]) - 1] == obj.shape
    assert torch.equal(labels, cell_labels([o.to_dict() for o in scene.objects]))  # dicts as in captions.jsonl


def test_encoder_pretraining_runs_and_freezes() -> None:
    config = small_cnn(width=8, image_size=64)
    encoder = SmallCNN(config)
    from blip2.data.transforms import ImageProcessor

    processor = ImageProcessor.from_vision_config(config)
    losses = pretrain_encoder(encoder, processor, steps=3, batch_size=4, lr=1e-3, seed=0, render_size=64)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    pixels, labels = scene_batch([0, 1], 0, 64, processor, backgrounds=(90, 90))
    assert pixels.shape == (2, 3, 64, 64) and labels.shape == (2, len(POSITIONS), 3)
    corner = pixels[0, :, 0, 0]  # a corner pixel is background: grey 90 after normalisation
    assert torch.allclose(corner, (torch.full((3,), 90 / 255) - 0.5) / 0.25, atol=1e-4)


def test_linear_probe_scores_per_object() -> None:
    """On features that carry the labels linearly the probe is perfect; on noise it is not."""
    generator = torch.Generator().manual_seed(0)
    scenes = [make_example("train", i, seed=0, image_size=64).scene for i in range(800)]
    labels = torch.stack([cell_labels(s.objects) for s in scenes])  # (N, cells, 3)
    onehot = torch.cat([torch.nn.functional.one_hot(labels[..., a], 9).float() for a in range(3)], dim=-1)
    features = onehot.view(len(scenes), 1, -1)  # (N, 1, cells * 27)
    perfect = linear_probe(features[:600], labels[:600], features[600:], labels[600:], steps=200)
    assert perfect["color"] == perfect["shape"] == perfect["size"] == perfect["position"] == 1.0
    noise = torch.randn(features.shape, generator=generator)
    chance = linear_probe(noise[:600], labels[:600], noise[600:], labels[600:], steps=200)
    assert chance["object"] < 0.5


# ---------------------------------------------------------------------------------------------- text LLM


def test_tokenizer_covers_the_scene_texts() -> None:
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    assert all(word in vocab for word in scene_vocabulary())
    ids = tokenizer("Question: what color is the circle? Answer:", add_special_tokens=False)["input_ids"]
    words = tokenizer.convert_ids_to_tokens(ids)
    assert words == ["question", ":", "what", "color", "is", "the", "circle", "?", "answer", ":"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == "question : what color is the circle? answer :"
    for special in (BOS, IMAGE, STOP):
        assert tokenizer.convert_tokens_to_ids(special) != tokenizer.unk_token_id


def test_corpus_documents_are_text_about_training_scenes() -> None:
    rng = random.Random(0)
    vocab = build_tokenizer().get_vocab()
    for _ in range(200):
        words, in_loss = corpus_document(rng, tiny_llm_settings())
        assert words[0] == BOS and len(words) == len(in_loss)
        end = min(i for i, w in enumerate(words) if w in ("question", "caption"))  # where the description ends
        description = words[1:end]
        assert not any(in_loss[:end])  # the description is read, not written
        for i, word in enumerate(words):
            if word in ("question", "caption") and words[i + 1] == ":":
                assert not in_loss[i] and not in_loss[i + 1]  # prompts are read too
            if word == "answer" and words[i + 1] == ":":
                assert in_loss[i + 2] and not in_loss[i - 1]  # the answer is the target; the question is not
        assert in_loss[-1] and all(w in vocab for w in words)
        text = " ".join(words)
        assert IMAGE not in words  # never an image, never a visual prompt
        assert not any(f"{c} {s}" in text for c, s in HELD_OUT_PAIRS)
        assert description == text_tokens(" ".join(description))


def test_text_llm_saves_a_transformers_model_the_demo_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blip2.demo.settings import DemoSettings, demo_llm_config

    losses = pretrain_text_llm(tiny_llm_settings(steps=3), seed=0, directory=tmp_path / "llm")
    assert len(losses) == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "llm")
    assert model.config.model_type == "bert" and model.config.is_decoder
    assert len(tokenizer) == model.config.vocab_size

    config = demo_llm_config(DemoSettings.load(quick=True), tmp_path / "llm")
    assert config.image_token_index == tokenizer.convert_tokens_to_ids(IMAGE)
    assert config.stop_token_id == tokenizer.convert_tokens_to_ids(STOP)
    assert config.visual_prompt_after_bos

    split = write_split(tmp_path / "scenes", "test", 3, seed=0, image_size=64)
    report = description_ceiling(model, tokenizer, split, "Question: {} Answer:", 2, [config.stop_token_id])
    assert report["n_images"] == 2 and 0.0 <= report["overall"] <= 1.0
    assert set(report["per_type"]) <= {"color", "count", "exists", "position", "shape"}


def test_bert_decoders_generate_on_the_plain_path(tmp_path: Path) -> None:
    """The prefix-cache fast path is not exact for BERT decoders (positions of left-padded rows): plain path."""
    from blip2.demo.text_llm import decoder_from_minilm
    from blip2.inference.fast import expansion_factor

    model = decoder_from_minilm(tiny_llm_settings(), build_tokenizer())
    assert expansion_factor(model, {"num_beams": 1, "max_new_tokens": 2}) is None
