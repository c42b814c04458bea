"""The official architectures instantiate, match transformers' parameter counts, and caption on CPU."""

from __future__ import annotations

import time

import pytest
import torch
from hf_reference import hf_config
from PIL import Image

from blip2.config import from_name
from blip2.model import Blip2, Blip2QFormer

# The hub's Salesforce/blip2-opt-2.7b has 3,744,679,936 parameters: ours is exactly that. For
# Salesforce/blip2-flan-t5-xl (about 3.94B on the hub) transformers 5 always ties T5's lm_head to the shared
# embeddings, so a model built from the config has 65,798,144 (32128 × 2048) fewer; the tests compare with
# transformers' own model built from the same config, which is exact, and print the breakdown.
PRESETS = ["blip2-opt-2.7b", "blip2-flan-t5-xl"]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_official_parameter_counts_match_transformers(preset: str) -> None:
    from transformers import Blip2ForConditionalGeneration

    cfg = from_name(preset)
    with torch.device("meta"):
        ours = Blip2(cfg)
        ref = Blip2ForConditionalGeneration(hf_config(cfg))
    n_ours, n_ref = _count(ours), _count(ref)
    parts = {
        "vision": _count(ours.vision_model) + _count(ours.ln_vision),
        "qformer": _count(ours.qformer) + ours.query_tokens.numel(),
        "projection": _count(ours.language_projection),
        "llm": _count(ours.language_model),
    }
    print(f"{preset}: ours {n_ours:,} transformers {n_ref:,} parts {parts}")
    assert n_ours == n_ref
    if preset == "blip2-opt-2.7b":
        assert n_ours == 3_744_679_936
    assert 980e6 < parts["vision"] < 990e6  # EVA ViT-g/14 without its last block: ~986M
    assert 100e6 < parts["qformer"] < 110e6  # 12 layers × 768, cross-attention every other layer: ~105M


def test_stage1_official_parameter_count() -> None:
    from transformers import Blip2ForImageTextRetrieval

    cfg = from_name("blip2-stage1-vit-g")
    with torch.device("meta"):
        ours = Blip2QFormer(cfg)
        ref = Blip2ForImageTextRetrieval(hf_config(cfg, retrieval=True))
    # ours also holds the ITG head (LM head transform + bias) and the temperature, which transformers drops
    extra = _count(ours.qformer.lm_head) + 1
    print(f"stage 1: ours {_count(ours):,} transformers {_count(ref):,} (+ITG head {extra:,})")
    assert _count(ours) - extra == _count(ref)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_official_size_captions_on_cpu(preset: str) -> None:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = Blip2(from_name(preset)).eval()
    built = time.perf_counter() - start
    image = Image.new("RGB", (224, 224), (200, 30, 30))
    from blip2.inference.tasks import pixel_values

    pixels = pixel_values(model, [image])
    assert pixels.shape == (1, 3, 224, 224)
    start = time.perf_counter()
    tokens = model.generate(pixel_values=pixels, num_beams=1, max_new_tokens=5)
    print(
        f"{preset}: {_count(model):,} parameters, built in {built:.0f}s, 5 greedy tokens in "
        f"{time.perf_counter() - start:.0f}s: {tokens.tolist()}"
    )
    assert tokens.shape[0] == 1 and tokens.shape[1] >= 2
