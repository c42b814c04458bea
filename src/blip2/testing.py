"""Tiny self-contained models (with tokenizers) for tests, examples and the API/CLI smoke runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch

from blip2.config import tiny_config

ModelT = TypeVar("ModelT", bound=torch.nn.Module)

WORDS = (
    "a an the of and to in on with is are there what how many color shape where left right top bottom center "
    "red green blue yellow purple orange white black circle square triangle star small large one two three "
    "yes no photo picture shapes shape question answer : ? . ,"
).split()


def word_tokenizer(specials: dict[str, int], vocab_size: int) -> Any:
    """A whitespace word-level fast tokenizer over `WORDS` (ids after the special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(specials)
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    while len(vocab) < vocab_size:  # filler words, so that every id a tiny model emits decodes to something
        vocab[f"w{len(vocab)}"] = len(vocab)
    unk = "<unk>" if "<unk>" in specials else "[UNK]"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk)


def tiny_llm_tokenizer() -> Any:
    tok = word_tokenizer({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, vocab_size=98)
    tok.add_special_tokens({"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>"})
    tok.padding_side = "left"
    return tok


def tiny_bert_tokenizer() -> Any:
    tok = word_tokenizer({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3}, vocab_size=99)
    tok.add_special_tokens({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"})
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    return tok


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
