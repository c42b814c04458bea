"""One stop token for training and generation (blip2.llm.stop_token_id), for every LLM.

BLIP-2's OPT models stop on "\\n" (LAVIS appends it to every stage-2 target and generates with it as EOS),
while OPT's tokenizer says ``eos_token="</s>"``. A collator that appended the tokenizer's EOS taught a stop
token that generation, configured with "\\n", never stopped on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config
from PIL import Image

from blip2.config import LLMConfig, opt_2_7b, tiny_config
from blip2.llm import generation_stop_ids, stop_token_id
from blip2.model import Blip2
from blip2.testing import tiny_llm_tokenizer


def test_stop_token_comes_from_one_field() -> None:
    assert stop_token_id(opt_2_7b()) == 50118  # "\n", as LAVIS blip2_opt.py
    assert stop_token_id(LLMConfig(hf_config={"eos_token_id": [1, 106]})) == 1
    assert generation_stop_ids(LLMConfig(hf_config={"eos_token_id": [1, 106]})) == [1, 106]
    explicit = LLMConfig(hf_config={"eos_token_id": 2}, stop_token_id=7)
    assert stop_token_id(explicit) == 7 and generation_stop_ids(explicit) == [7, 2]
    with pytest.raises(ValueError, match="stop_token_id"):
        stop_token_id(LLMConfig(hf_config={}))


def test_built_model_generates_with_the_stop_token() -> None:
    cfg = tiny_config("opt")
    cfg.llm.stop_token_id = 53
    model = Blip2(cfg)
    assert model.language_model.generation_config.eos_token_id == [53, 2]


def test_opt_trained_with_the_stage2_recipe_stops_where_it_learned_to(tmp_path: Path) -> None:
    """A tiny OPT whose config stops on "." (standing in for OPT's "\\n") while its tokenizer's EOS is "</s>":
    trained with the stage-2 recipe on one repeated caption, saved and reloaded, it generates the caption
    and the stop token, and stops. (The tiny LLM is unfrozen here so that a few steps can teach it the caption;
    a random frozen one barely reacts to its visual prompt. What is tested is which token ends the targets.)"""
    from tokenizers import processors

    from blip2.inference.tasks import pixel_values
    from blip2.train.recipes import train

    tok = tiny_llm_tokenizer()  # "<s> caption": a BOS first, as OPT's tokenizer adds one
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    stop = tok.convert_tokens_to_ids(".")
    cfg = tiny_config("opt")
    cfg.llm.image_token_index = None
    cfg.llm.hf_config["eos_token_id"] = stop  # like opt_2_7b(): the config's EOS is not the tokenizer's
    torch.manual_seed(0)
    model = Blip2(cfg)
    model.tokenizer = tok
    model.language_model.requires_grad_(True)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 100, 200)).save(data / f"{i}.png")
    records = "".join(json.dumps({"image": f"{i}.png", "caption": "a red circle"}) + "\n" for i in range(4))
    (data / "captions.jsonl").write_text(records)
    data_section = {"kind": "jsonl", "annotations": str(data / "captions.jsonl"), "images": str(data)}
    train_cfg = tiny_train_config(
        tmp_path / "run",
        max_steps=25,
        lr=2e-2,
        min_lr=2e-3,
        warmup_steps=0,
        log_every=25,
        seed=42,
        model={"stage": 2},
        data=data_section,
    )
    train(train_cfg, model)

    loaded = Blip2.from_pretrained(tmp_path / "run" / "model").eval()
    pixels = pixel_values(loaded, [Image.open(data / "0.png")])
    tokens = loaded.generate(pixel_values=pixels, max_new_tokens=10, num_beams=1)[0, 1:]  # after the BOS
    assert tok.convert_ids_to_tokens(tokens.tolist()) == ["a", "red", "circle", "."]
