"""Frozen image encoders behind one interface: official-style ViT, any Hugging Face vision model, timm."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from blip2.config import Blip2Config, VisionConfig, tiny_config
from blip2.model import Blip2QFormer
from blip2.vision import build_vision_encoder


def _clip_config(width: int = 32) -> VisionConfig:
    return VisionConfig(
        kind="hf",
        hf_config=dict(
            model_type="clip_vision_model",
            hidden_size=width,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        image_size=32,
        hidden_size=width,
        feature_layer=-2,
    )


def test_hf_vision_encoder_gives_penultimate_layer_features() -> None:
    torch.manual_seed(0)
    encoder = build_vision_encoder(_clip_config())
    pixels = torch.randn(2, 3, 32, 32)
    feats = encoder(pixels)
    assert feats.shape == (2, 1 + 16, 32)
    ref = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(feats, ref)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


def test_stage1_model_on_a_clip_encoder_trains_without_touching_it() -> None:
    cfg: Blip2Config = tiny_config(None)
    cfg.vision = _clip_config()
    model = Blip2QFormer(cfg).train()
    assert not model.vision_model.training  # frozen parts stay in eval mode
    before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    out = model(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=torch.randn(2, 3, 32, 32))
    out.loss.backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    for k, v in model.vision_model.state_dict().items():
        assert torch.equal(v, before[k])


def test_width_mismatch_is_reported() -> None:
    cfg = _clip_config()
    cfg.hidden_size = 64
    with pytest.raises(ValueError, match="vision encoder width is 32 but VisionConfig.hidden_size says 64"):
        build_vision_encoder(cfg)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown vision encoder kind 'resnet'"):
        build_vision_encoder(VisionConfig(kind="resnet"))  # type: ignore[arg-type]


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_kind_without_timm_says_how_to_install() -> None:
    with pytest.raises(ImportError, match=r"pip install 'blip2\[timm\]'"):
        build_vision_encoder(VisionConfig(kind="timm", model_id="vit_small_patch16_224", hidden_size=384))


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is an optional extra")
def test_timm_encoder() -> None:
    encoder = build_vision_encoder(VisionConfig(kind="timm", model_id="vit_tiny_patch16_224", hidden_size=192))
    assert encoder(torch.randn(1, 3, 224, 224)).shape[-1] == 192
