"""Tiny random transformers BLIP-2 models built from our tiny configs: the parity reference."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2QFormerConfig,
    Blip2VisionConfig,
)
from transformers import (
    Blip2Config as HFBlip2Config,
)

from blip2.config import Blip2Config


def hf_config(config: Blip2Config, retrieval: bool = False) -> HFBlip2Config:
    q = config.qformer
    qformer = Blip2QFormerConfig(
        vocab_size=q.vocab_size,
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size,
        max_position_embeddings=q.max_position_embeddings,
        cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=q.encoder_hidden_size,
        use_qformer_text_input=retrieval,
        pad_token_id=q.pad_token_id,
    )
    kwargs = {}
    if config.llm is not None and not retrieval:
        kwargs["text_config"] = AutoConfig.for_model(**config.llm.hf_config).to_dict()
        kwargs["image_token_index"] = config.llm.image_token_index
    cfg = HFBlip2Config(
        vision_config=Blip2VisionConfig(**config.vision.hf_config).to_dict(),
        qformer_config=qformer.to_dict(),
        num_query_tokens=q.num_query_tokens,
        image_text_hidden_size=q.embed_dim,
        **kwargs,
    )
    return cfg


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """transformers initialises some parts near zero (vision std 1e-10): use clearly non-trivial weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ("norm" in name.lower() or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise if p.ndim > 1 else 0.05 * noise)


def make_hf_generation_model(config: Blip2Config, directory: Path, seed: int = 0) -> Blip2ForConditionalGeneration:
    model = Blip2ForConditionalGeneration(hf_config(config)).eval()
    randomize(model, seed)
    model.save_pretrained(directory)
    return model


def make_hf_retrieval_model(config: Blip2Config, directory: Path, seed: int = 0) -> Blip2ForImageTextRetrieval:
    model = Blip2ForImageTextRetrieval(hf_config(config, retrieval=True)).eval()
    randomize(model, seed)
    model.save_pretrained(directory)
    return model


def left_padded_ids(q: int, image_token: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths, left-padded: [pad pad <img>*q text] and [<img>*q text]."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 90, (2, 7), generator=g)
    prefix = torch.full((2, q), image_token) if image_token is not None else torch.empty(2, 0, dtype=torch.long)
    ids = torch.cat([prefix, text], dim=1)
    mask = torch.ones_like(ids)
    ids[0] = torch.cat([torch.tensor([1, 1]), ids[0, :-2]])
    mask[0, :2] = 0
    return ids, mask
