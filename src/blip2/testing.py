"""Tiny self-contained models (with tokenizers) for tests, examples and the API/CLI smoke runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch

from blip2.config import tiny_config
from blip2.data.word_tokenizers import WORDS, tiny_bert_tokenizer, tiny_llm_tokenizer, word_tokenizer

ModelT = TypeVar("ModelT", bound=torch.nn.Module)

__all__ = [
    "WORDS",
    "make_tiny_model",
    "pretrain_tiny_llm",
    "tiny_bert_tokenizer",
    "tiny_llm_tokenizer",
    "word_tokenizer",
]


def make_tiny_model(directory: str | Path | None = None, llm: str | None = "opt", seed: int = 0) -> Any:
    """A random tiny `Blip2` (``llm`` "opt"/"t5") or `Blip2QFormer` (``llm=None``) with a tokenizer;
    saved to ``directory`` when given."""
    from blip2.model import Blip2, Blip2QFormer

    torch.manual_seed(seed)
    cfg = tiny_config(llm)  # type: ignore[arg-type]
    if llm is None:
        model: Any = Blip2QFormer(cfg)
        model.tokenizer = tiny_bert_tokenizer()
    else:
        if llm == "opt":
            cfg.llm.image_token_index = None  # prepend the visual prompt (our own models' convention)
        model = Blip2(cfg)
        model.tokenizer = tiny_llm_tokenizer()
    model.eval()
    if directory is not None:
        model.save_pretrained(directory)
    return model


def zero_key_bias(model: ModelT) -> ModelT:
    """Zero the key part of each ViT qkv bias: EVA (LAVIS) has query and value biases only, so only such a
    model can be written in LAVIS's format."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                d = p.shape[0] // 3  # (3D,) = query, key, value
                p[d : 2 * d] = 0
    return model


def pretrain_tiny_llm(model: Any, texts: list[str], steps: int = 150, lr: float = 1e-2, seed: int = 0) -> None:
    """Give a tiny random LLM some language first (plain LM on ``texts``), then freeze it again.

    Stage 2 assumes a *pretrained* frozen LLM: a randomly initialised one barely reacts to its inputs, so
    no visual prompt can lower its loss. Smoke tests use this to get a small but real frozen LLM.
    """
    lm = model.language_model
    tok = model.tokenizer
    g = torch.Generator().manual_seed(seed)
    lm.requires_grad_(True)
    lm.train()
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    for _ in range(steps):
        batch = [texts[int(i)] for i in torch.randint(len(texts), (16,), generator=g)]
        enc = tok([t + (tok.eos_token or "") for t in batch], padding=True, return_tensors="pt", padding_side="right")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        if lm.config.is_encoder_decoder:
            out = lm(input_ids=enc["input_ids"][:, :2], labels=labels)
        else:
            out = lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    lm.eval()
    lm.requires_grad_(False)
