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
from blip2.demo.encoder import (
    ATTRIBUTES,
    TokenHead,
    cell_labels,
    linear_probe,
    pretrain_encoder,
    scene_batch,
    token_labels,
)
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
        chunk_probability=0.5,
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


def test_small_cnn_pools_to_a_token_grid() -> None:
    encoder = SmallCNN(small_cnn(width=16, depth=6, downsample=3, position_features=8, image_size=64, token_grid=3))
    out = encoder(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 9, 24) and encoder.grid == 3  # 8x8 map pooled to 3x3 tokens
    assert len({tuple(row.tolist()) for row in out[0, :, 16:]}) == 9  # one position code per token


def test_token_labels_name_the_object_centred_in_each_token() -> None:
    scene = make_example("train", 5, seed=0, image_size=64).scene
    labels = token_labels(scene.objects, grid=3, image_size=64)  # (9, 3)
    assert labels.shape == (9, len(ATTRIBUTES))
    assert int((labels[:, 0] > 0).sum()) == len(scene.objects)
    cell = {"top": 1, "left": 3, "center": 4, "right": 5, "bottom": 7}  # the scenes' positions, row-major
    for obj in scene.objects:
        row = labels[cell[obj.position]]
        assert ATTRIBUTES["color"][int(row[0]) - 1] == obj.color
        assert ATTRIBUTES["shape"][int(row[1]) - 1] == obj.shape
        assert ATTRIBUTES["size"][int(row[2]) - 1] == obj.size
    assert labels[[0, 2, 6, 8]].eq(0).all()  # no object is ever centred in a corner cell
    assert torch.equal(labels, token_labels([o.to_dict() for o in scene.objects], 3, 64))


def test_token_objective_trains_one_head_for_every_token() -> None:
    from blip2.data.transforms import ImageProcessor

    config = small_cnn(width=8, image_size=64, token_grid=3)
    encoder = SmallCNN(config)
    processor = ImageProcessor.from_vision_config(config)
    losses = pretrain_encoder(encoder, processor, 2, 4, 1e-3, seed=0, render_size=64, objective="tokens")
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    _, labels = scene_batch([0, 1], 0, 64, processor, token_grid=3)
    assert labels.shape == (2, 9, 3)
    head = TokenHead(16)
    assert [lg.shape for lg in head(torch.randn(2, 9, 16))] == [(2, 9, 9), (2, 9, 5), (2, 9, 3)]
    with pytest.raises(ValueError, match="objective"):
        pretrain_encoder(encoder, processor, 1, 2, 1e-3, seed=0, render_size=64, objective="pixels")


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


# ---------------------------------------------------------------------------------------------- Q-Former


def test_word_level_qformer_starts_from_minilm_embeddings() -> None:
    """``qformer_vocabulary: words``: each scene word's embedding is MiniLM's (the mean of its WordPieces), the
    ITG head scores only those words, and captions tokenize to known words in BERT's layout."""
    from blip2.checkpoints.offline import bert_state_dict, load_bert_tokenizer
    from blip2.demo.settings import DemoSettings, demo_config
    from blip2.demo.stages import build_stage1_model

    settings = DemoSettings.load()
    settings.qformer_vocabulary, settings.qformer_layers = "words", 2
    encoder = build_vision_encoder(demo_config(settings, with_llm=False).vision)
    model = build_stage1_model(settings, encoder.state_dict())
    tokenizer, q = model.tokenizer, model.config.qformer
    assert q.vocab_size == len(tokenizer) < 100 and q.bos_token_id == tokenizer.convert_tokens_to_ids("[DEC]")
    ids = tokenizer("two shapes: a small red circle on the left")["input_ids"]
    assert ids[0] == q.cls_token_id and ids[-1] == q.sep_token_id and tokenizer.unk_token_id not in ids
    wordpiece, bert = load_bert_tokenizer(), bert_state_dict()["embeddings.word_embeddings.weight"]
    table = model.qformer.embeddings.word_embeddings.weight
    for word in ("circle", "left", "[CLS]"):
        assert torch.equal(table[tokenizer.convert_tokens_to_ids(word)], bert[wordpiece.convert_tokens_to_ids(word)])
    batch = tokenizer(["a red square", "one shape: a large blue star"], padding="longest", return_tensors="pt")
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_features=torch.randn(2, 9, 48)
    )
    assert torch.isfinite(out.loss)


def test_cross_attention_init_is_scaled_for_a_narrow_encoder() -> None:
    from blip2.config import Blip2Config, minilm_l6_qformer
    from blip2.demo.stages import scale_cross_attention_init
    from blip2.model import Blip2QFormer

    qformer = minilm_l6_qformer(num_query_tokens=4, encoder_hidden_size=48, num_hidden_layers=2)
    model = Blip2QFormer(Blip2Config(vision=small_cnn(width=32), qformer=qformer, llm=None))
    before = model.qformer.layers[0].cross_attn.key.weight.std().item()
    scale_cross_attention_init(model, 0.108)
    for layer in model.qformer.layers:
        if layer.cross_attn is not None:
            for linear in (layer.cross_attn.key, layer.cross_attn.value):
                assert linear.weight.std().item() == pytest.approx(0.108, rel=0.05)
    assert before == pytest.approx(0.02, rel=0.1)
    assert model.qformer.layers[0].self_attn.key.weight.std().item() == pytest.approx(0.02, rel=0.1)  # untouched


def test_narrow_vocabulary_means_the_rows() -> None:
    from blip2.checkpoints.bert import narrow_vocabulary

    state = {
        "embeddings.word_embeddings.weight": torch.arange(12.0).view(4, 3),
        "cls.predictions.bias": torch.arange(4.0),
    }
    out = narrow_vocabulary(state, [[0], [1, 3]])
    assert torch.equal(out["embeddings.word_embeddings.weight"], torch.tensor([[0.0, 1, 2], [6, 7, 8]]))
    assert torch.equal(out["cls.predictions.bias"], torch.tensor([0.0, 2.0]))
    assert state["embeddings.word_embeddings.weight"].shape == (4, 3)  # the input is not changed
    with pytest.raises(ValueError, match="at least one"):
        narrow_vocabulary(state, [[0], []])


def test_chunked_descriptions_average_their_words() -> None:
    """A chunked document reads its description in consecutive groups of 1-4 words (one position each, the mean
    of their embeddings); everything after the description stays one word per position, and the loss stays on
    the answers and captions."""
    from blip2.demo.text_llm import chunk_description, corpus_batch, embed_groups

    groups = chunk_description(random.Random(0), 11)
    assert [p for g in groups for p in g] == list(range(1, 12)) and all(1 <= len(g) <= 4 for g in groups)
    tokenizer = build_tokenizer()
    settings = tiny_llm_settings()
    settings.chunk_probability = 1.0
    batch = corpus_batch(random.Random(0), settings, tokenizer.get_vocab())
    first = batch["groups"][0]  # (L, G)
    assert first[0, 0] == tokenizer.bos_token_id and (first[:, 1:] >= 0).any()  # some position holds 2+ words
    multi = (first[:, 1:] >= 0).any(-1)  # (L,) positions holding several words
    assert (batch["labels"][0][multi] == -100).all() and (batch["labels"][0] != -100).any()
    embedding = torch.nn.Embedding(len(tokenizer), 4)
    vectors = embed_groups(embedding, batch["groups"])  # (B, L, 4)
    position = int((first[:, 1] >= 0).nonzero()[0])
    ids = first[position][first[position] >= 0]
    assert torch.allclose(vectors[0, position], embedding.weight[ids].mean(0))
    settings.chunk_probability = 0.0
    plain = corpus_batch(random.Random(0), settings, tokenizer.get_vocab())
    assert plain["groups"].shape[-1] == 1  # one word per position
