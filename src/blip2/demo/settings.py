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

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, small_cnn, tiny_config
from blip2.demo.text_llm import TextLLMSettings

# src/blip2/demo/settings.py -> the repository's configs/ (configs/ is not part of an installed wheel)
DEMO_YAML = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"
GEMMA_PLACEHOLDER_ID = 6  # "<unused0>": never produced by the tokenizer from ordinary text
_STAGES = ("stage1", "stage2")
LLM_CHOICES = ("demo", "gemma-3-270m")


@dataclass
class StageSettings:
    """One BLIP-2 training stage (stage 1 or stage 2)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    lr_multipliers: dict[str, float]  # parameter-name prefix -> lr factor


@dataclass
class EncoderSettings:
    """The frozen image encoder (`blip2.vision.SmallCNN`) and its supervised pretraining (`blip2.demo.encoder`)."""

    image_size: int
    width: int
    depth: int
    downsample: int
    position_features: int
    token_grid: int  # > 0: average-pool the feature map to token_grid x token_grid tokens
    objective: str  # "cells" (a head on the flattened tokens) or "tokens" (one head shared by every token)
    steps: int
    batch_size: int
    lr: float
    probe_steps: int  # full-batch steps of the linear probe that measures it


_SECTIONS = {"image_encoder": EncoderSettings, "text_llm": TextLLMSettings}


@dataclass
class DemoSettings:
    """The demo's run recipe; each field is documented where its value is, in ``configs/demo.yaml``."""

    seed: int
    n_train: int
    n_test: int
    n_compositional: int
    n_shifted: int
    render_size: int
    image_encoder: EncoderSettings
    llm: str  # "demo" (the text LLM pretrained here) or "gemma-3-270m"
    text_llm: TextLLMSettings
    num_query_tokens: int
    qformer_layers: int  # MiniLM-L6's first layers the Q-Former keeps (6: all)
    cross_attention_frequency: int
    qformer_dropout: float
    qformer_kv_init_std: float  # > 0: init std of the cross-attention key/value weights (0: BERT's 0.02)
    qformer_vocabulary: str  # "wordpiece" (MiniLM's) or "words" (the scenes' words; see `qformer_tokenizer`)
    tiny: bool
    stage1: StageSettings
    stage2: StageSettings
    max_text_tokens: int
    caption_prompt: str
    caption_generation: dict[str, Any]
    vqa_template: str
    vqa_generation: dict[str, Any]
    answer_words: int
    ceiling_images: int
    retrieval_k: int
    eval_batch_size: int
    caption_metrics: list[str]
    n_report: int
    targets: dict[str, float]

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
                if (
                    (key in _STAGES or key in _SECTIONS)
                    and isinstance(value, dict)
                    and isinstance(values.get(key), dict)
                ):
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
        for key, kind in _SECTIONS.items():
            section, names = values[key], [f.name for f in dataclasses.fields(kind)]
            if not isinstance(section, dict) or sorted(section) != sorted(names):
                raise ValueError(f"{where}: {key} needs exactly the keys {sorted(names)}, got {section!r}")
            values[key] = kind(**section)
        if values["llm"] not in LLM_CHOICES:
            raise ValueError(f"{where}: unknown llm {values['llm']!r}; expected one of {LLM_CHOICES}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def demo_config(
    settings: DemoSettings | None = None, with_llm: bool = True, llm_dir: str | Path | None = None
) -> Blip2Config:
    """The demo model: the frozen small CNN, a Q-Former with MiniLM-L6's sizes (tiny and random when
    ``settings.tiny``), and the frozen LLM: the demo's text LLM saved in ``llm_dir`` (`blip2.demo.text_llm`),
    or Gemma 3 270M. The visual prompt goes right after BOS, where the text LLM read descriptions in its
    pretraining. ``with_llm=False`` gives the stage-1 config (Q-Former with its text side)."""
    s = settings or DemoSettings.load()
    e = s.image_encoder
    vision = small_cnn(e.width, e.depth, e.downsample, e.position_features, e.image_size, e.token_grid)
    if s.tiny:
        tiny = tiny_config("opt", num_query_tokens=s.num_query_tokens)
        qformer = dataclasses.replace(tiny.qformer, encoder_hidden_size=vision.hidden_size)
    else:
        from blip2.checkpoints.offline import minilm_qformer_config

        qformer = minilm_qformer_config(
            num_query_tokens=s.num_query_tokens,
            encoder_hidden_size=vision.hidden_size,
            num_hidden_layers=s.qformer_layers,
            cross_attention_frequency=s.cross_attention_frequency,
            hidden_dropout_prob=s.qformer_dropout,
            attention_probs_dropout_prob=s.qformer_dropout,
        )
    assert isinstance(qformer, QFormerConfig)
    if s.qformer_vocabulary == "words" and not s.tiny:
        tokenizer = qformer_tokenizer(s)
        ids = tokenizer.convert_tokens_to_ids
        qformer = dataclasses.replace(
            qformer,
            vocab_size=len(tokenizer),
            bos_token_id=ids("[DEC]"),
            cls_token_id=ids("[CLS]"),
            sep_token_id=ids("[SEP]"),
            pad_token_id=ids("[PAD]"),
            tokenizer=None,
        )
    if not with_llm:
        return Blip2Config(vision=vision, qformer=dataclasses.replace(qformer, use_text=True), llm=None)
    return Blip2Config(
        vision=vision, qformer=dataclasses.replace(qformer, use_text=False), llm=demo_llm_config(s, llm_dir)
    )


def qformer_tokenizer(settings: DemoSettings) -> Any:
    """The Q-Former's tokenizer: MiniLM's WordPiece, or with ``qformer_vocabulary: words`` a word-level one over
    the scenes' words (`blip2.data.word_tokenizers.bert_word_tokenizer`), whose embeddings start from MiniLM's
    (`blip2.checkpoints.bert.narrow_vocabulary`). The word-level ITG head scores 73 ids instead of 30,523: measured,
    stage-1 steps ran 1.3x faster (README, "Offline demo")."""
    if settings.qformer_vocabulary == "words":
        from blip2.data.scenes import scene_vocabulary
        from blip2.data.word_tokenizers import bert_word_tokenizer

        return bert_word_tokenizer(scene_vocabulary())
    if settings.qformer_vocabulary != "wordpiece":
        raise ValueError(f"unknown qformer_vocabulary {settings.qformer_vocabulary!r}; expected wordpiece or words")
    from blip2.checkpoints.offline import load_bert_tokenizer

    return load_bert_tokenizer()


def demo_llm_config(settings: DemoSettings, llm_dir: str | Path | None) -> LLMConfig:
    """The frozen LLM's config: the text LLM in ``llm_dir`` or Gemma 3 270M (converted on first use)."""
    if settings.llm == "gemma-3-270m":
        from blip2.checkpoints.offline import gemma3_llm_config

        # Gemma ignores whatever precedes its BOS (measured: a caption given as text before <bos> leaves the LM
        # loss of that caption at 3.3 nats/token, after <bos> 1.3), so the visual prompt goes after BOS.
        llm = gemma3_llm_config()
        return dataclasses.replace(llm, image_token_index=GEMMA_PLACEHOLDER_ID, visual_prompt_after_bos=True)
    if llm_dir is None:
        raise ValueError("the demo's text LLM config needs the directory it was saved in (llm_dir)")
    from transformers import AutoConfig, AutoTokenizer

    from blip2.demo.text_llm import IMAGE, STOP

    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    hf_config = AutoConfig.from_pretrained(str(llm_dir)).to_dict()
    return LLMConfig(
        kind="decoder",
        hf_config=hf_config,
        model_id=str(llm_dir),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        visual_prompt_after_bos=True,
        stop_token_id=tokenizer.convert_tokens_to_ids(STOP),
    )
