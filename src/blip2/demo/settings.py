"""The demo's run recipe, read from ``configs/demo.yaml`` (its single source), and the demo model's config.

`DemoSettings` names and types every setting; the values live in the YAML file only. ``quick=True`` applies
the file's ``quick:`` section (tiny random models and a few dozen images, for tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from blip2.config import Blip2Config, QFormerConfig, small_vit, tiny_config

# src/blip2/demo/settings.py -> the repository's configs/ (configs/ is not part of an installed wheel)
DEMO_YAML = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"
GEMMA_PLACEHOLDER_ID = 6  # "<unused0>": never produced by the tokenizer from ordinary text
_STAGES = ("vit_pretrain", "stage1", "stage2")


@dataclass
class StageSettings:
    """One training stage (the ViT's contrastive pretraining, stage 1 or stage 2)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    lr_multipliers: dict[str, float]  # parameter-name prefix -> lr factor


@dataclass
class DemoSettings:
    """The demo's run recipe; each field is documented where its value is, in ``configs/demo.yaml``."""

    seed: int
    n_train: int
    n_test: int
    render_size: int
    image_size: int
    patch_size: int
    vit_width: int
    vit_layers: int
    vit_heads: int
    vit_pretrain: StageSettings
    num_query_tokens: int
    cross_attention_frequency: int
    qformer_dropout: float
    tiny: bool
    stage1: StageSettings
    stage2: StageSettings
    max_text_tokens: int
    caption_prompt: str
    caption_generation: dict[str, Any]
    vqa_template: str
    vqa_generation: dict[str, Any]
    answer_words: int
    vqa_true_caption_images: int
    retrieval_k: int
    eval_batch_size: int
    caption_metrics: list[str]
    n_report: int

    @classmethod
    def load(cls, path: str | Path | None = None, quick: bool = False) -> DemoSettings:
        """The settings in ``path`` (default: ``configs/demo.yaml``); with ``quick``, its ``quick:`` section
        applied on top (top-level keys replaced, stage sections key by key)."""
        path = Path(path) if path is not None else DEMO_YAML
        if not path.is_file():
            raise FileNotFoundError(
                f"demo settings file {path} not found: run from a source checkout of blip2 (it holds configs/), "
                "or pass the path of a copy of configs/demo.yaml"
            )
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        overrides = values.pop("quick", None) or {}
        if quick:
            for key, value in overrides.items():
                if key in _STAGES and isinstance(value, dict) and isinstance(values.get(key), dict):
                    values[key] = {**values[key], **value}
                else:
                    values[key] = value
        return cls.from_dict(values, where=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "demo settings") -> DemoSettings:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown, missing = sorted(set(values) - set(names)), [n for n in names if n not in values]
        if unknown or missing:
            raise ValueError(f"{where}: unknown settings {unknown}, missing settings {missing}; see configs/demo.yaml")
        values = dict(values)
        stage_names = [f.name for f in dataclasses.fields(StageSettings)]
        for key in _STAGES:
            section = values[key]
            if not isinstance(section, dict) or sorted(section) != sorted(stage_names):
                raise ValueError(f"{where}: {key} needs exactly the keys {stage_names}, got {section!r}")
            values[key] = StageSettings(**section)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def demo_config(settings: DemoSettings | None = None, with_llm: bool = True) -> Blip2Config:
    """The demo model: frozen small ViT, Q-Former with MiniLM-L6's sizes, frozen Gemma 3 270M with the visual
    prompt after BOS (tiny random Q-Former and LLM when ``settings.tiny``). ``with_llm=False`` gives the
    stage-1 config (Q-Former with its text side)."""
    s = settings or DemoSettings.load()
    vision = small_vit(s.vit_width, s.vit_layers, s.vit_heads, s.image_size, s.patch_size)
    if s.tiny:
        tiny = tiny_config("opt", num_query_tokens=s.num_query_tokens)
        qformer = dataclasses.replace(tiny.qformer, encoder_hidden_size=s.vit_width)
        llm = tiny.llm
    else:
        from blip2.checkpoints.offline import gemma3_llm_config, minilm_qformer_config

        qformer = minilm_qformer_config(
            num_query_tokens=s.num_query_tokens,
            encoder_hidden_size=s.vit_width,
            cross_attention_frequency=s.cross_attention_frequency,
            hidden_dropout_prob=s.qformer_dropout,
            attention_probs_dropout_prob=s.qformer_dropout,
        )
        llm = gemma3_llm_config() if with_llm else None
    assert isinstance(qformer, QFormerConfig)
    if not with_llm:
        return Blip2Config(vision=vision, qformer=dataclasses.replace(qformer, use_text=True), llm=None)
    assert llm is not None
    # The visual prompt goes right after BOS, at placeholder positions: Gemma ignores whatever precedes its BOS
    # (measured: a caption given as text before <bos> leaves the LM loss of that caption at 3.3 nats/token,
    # after <bos> 1.3), so the BLIP-2/OPT order [visual prompt][bos][text] would hide the image from it.
    placeholder = None if s.tiny else GEMMA_PLACEHOLDER_ID
    llm = dataclasses.replace(llm, image_token_index=placeholder, visual_prompt_after_bos=not s.tiny)
    return Blip2Config(vision=vision, qformer=dataclasses.replace(qformer, use_text=False), llm=llm)
