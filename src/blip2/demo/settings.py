"""`blip2 demo`: BLIP-2 pretrained end to end on a laptop-class CPU, offline, then evaluated, with a report.

Pipeline (each step cached under ``DIR/cache``, keyed by a hash of the settings it depends on, so a second run
reuses finished work and a killed run resumes training from its last checkpoint):

1. data:      synthetic scenes (`blip2.data.scenes`): a training split and the held-out test split, whose
              every image holds a (color, shape) pair never seen in training.
2. features:  a small ViT, CLIP-pretrained on the training split then frozen (`DemoSettings.vision_init`),
              encodes every image once.
3. stage 1:   Q-Former (from pretrained MiniLM-L6) on the cached features: ITC + ITM + ITG.
4. stage 2:   the Q-Former's queries → Linear → soft visual prompt of the frozen Gemma 3 270M, LM loss on
              captions only (no question is ever seen in training).
5. evaluate:  retrieval (ITC shortlist + ITM re-rank), captions (CIDEr, BLEU-4, attribute accuracy) and
              zero-shot VQA per question type, on the held-out split (`blip2.eval.runner.run_eval`).
6. outputs:   ``DIR/model`` (stage 2, ``Blip2.from_pretrained``), ``DIR/qformer`` (stage 1, for retrieval),
              ``DIR/metrics.json``, ``DIR/stage{1,2}_losses.png``, ``DIR/report.html``; the scenes in
              ``DIR/data``.

The run recipe is `DemoSettings` (``configs/demo.yaml`` holds the same values); ``quick=True`` swaps in tiny
random models and a few dozen images (for tests: about a minute).

Reproducibility: the demo runs under ``torch.use_deterministic_algorithms(True)``, so a second run from scratch
on the same machine and thread count gives the same weights and figures. Without it, some CPU kernel that is
not deterministic by default (not pinned down) made stage-1 weights of two runs differ at 1e-7 after ~15
steps, and stage 2 amplified that into different captions and answers (zero-shot VQA 0.23 in one run, 0.07 in
the next). It cost nothing measurable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from blip2.config import Blip2Config, QFormerConfig, small_vit, tiny_config
from blip2.data.scenes import detailed_caption

DEMO_VERSION = 4  # part of every cache key: bump when the pipeline changes what a cached step holds
GEMMA_PLACEHOLDER_ID = 6  # "<unused0>": never produced by the tokenizer from ordinary text


@dataclass
class StageSettings:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> lr factor


@dataclass
class DemoSettings:
    """The demo's run recipe. The defaults are the full demo (``configs/demo.yaml``); see `quick_settings`."""

    seed: int = 0
    n_train: int = 2000
    n_test: int = 100
    render_size: int = 224  # scenes are drawn at this size, then resized to image_size by the processor
    # frozen image encoder: a small ViT (the official architecture at small width)
    image_size: int = 128
    patch_size: int = 16
    vit_width: int = 192
    vit_layers: int = 4
    vit_heads: int = 3
    vision_init: str = "contrastive"  # "random": seeded random init, frozen; "contrastive": CLIP-pretrained first
    vit_pretrain: StageSettings = field(default_factory=lambda: StageSettings(steps=300, batch_size=64, lr=1e-3))
    # Q-Former (MiniLM-L6 sizes unless tiny) and queries
    num_query_tokens: int = 8
    cross_attention_frequency: int = 2
    qformer_dropout: float = 0.0  # MiniLM's 0.1 is for long training; one epoch does not overfit
    tiny: bool = False  # quick mode: tiny random Q-Former and LLM with word-level tokenizers
    stage1: StageSettings = field(default_factory=lambda: StageSettings(steps=180, batch_size=16, lr=3e-4))
    # stage 2: the pretrained Q-Former at the paper's 1e-4, the new projection at 10x (measured: with 1e-3 for
    # both, stage 2 flattened the Q-Former's image dependence ~10x and captions lost their colors)
    stage2: StageSettings = field(
        default_factory=lambda: StageSettings(
            steps=150, batch_size=8, lr=1e-4, lr_multipliers={"language_projection": 10.0}
        )
    )
    max_text_tokens: int = 48
    stage2_train_qformer: bool = True  # False: stage 2 trains the projection only (Q-Former kept from stage 1)
    stage2_captions: str = "detailed"  # "detailed": one caption naming count, size, color, shape, position
    caption_prompt: str = ""  # text the caption continues in stage 2 and at inference (e.g. "a photo of")
    # evaluation
    caption_generation: dict[str, Any] = field(
        default_factory=lambda: {"num_beams": 1, "max_new_tokens": 32, "min_new_tokens": 2}
    )
    vqa_template: str = "Question: {} Answer:"
    vqa_generation: dict[str, Any] = field(
        default_factory=lambda: {"num_beams": 1, "max_new_tokens": 4, "min_new_tokens": 1}
    )
    answer_words: int = 1  # keep the first word of each normalised answer (0: keep all)
    vqa_caption_context: bool = False  # also report VQA with the model's own caption written before the question
    # The frozen LLM's own ceiling: VQA on the first N test images with the *true* scene description written
    # before the question (the visual prompt still there). 0 skips it.
    vqa_true_caption_images: int = 30
    retrieval_k: int = 8
    eval_batch_size: int = 32
    caption_metrics: list[str] = field(default_factory=lambda: ["BLEU", "CIDEr"])
    n_report: int = 8

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DemoSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown demo settings {sorted(unknown)}; known: {sorted(names)}")
        values = dict(values)
        for key in ("stage1", "stage2", "vit_pretrain"):
            if isinstance(values.get(key), dict):
                values[key] = StageSettings(**values[key])
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> DemoSettings:
        return cls.from_dict(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quick_settings() -> DemoSettings:
    """Tiny sizes for tests: the whole pipeline in well under a minute."""
    return DemoSettings(
        n_train=48,
        n_test=8,
        render_size=64,
        image_size=32,
        patch_size=8,
        vit_width=32,
        vit_layers=2,
        vit_heads=2,
        num_query_tokens=4,
        tiny=True,
        stage1=StageSettings(steps=6, batch_size=8, lr=1e-3, warmup_steps=1),
        stage2=StageSettings(steps=6, batch_size=4, lr=1e-3, warmup_steps=1),
        max_text_tokens=32,
        caption_generation={"num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 1},
        vqa_generation={"num_beams": 1, "max_new_tokens": 3, "min_new_tokens": 1},
        retrieval_k=4,
        n_report=3,
    )


# ------------------------------------------------------------------------------------------ the preset


def demo_config(settings: DemoSettings | None = None, with_llm: bool = True) -> Blip2Config:
    """The demo model: frozen small ViT, Q-Former with MiniLM-L6's sizes, frozen Gemma 3 270M (prepended
    visual prompt). ``with_llm=False`` gives the stage-1 config (Q-Former with its text side)."""
    s = settings or DemoSettings()
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


# ------------------------------------------------------------------------------------------ captions


def stage2_captions(settings: DemoSettings, rows: list[dict[str, Any]]) -> list[list[str]]:
    if settings.stage2_captions == "detailed":
        return [[detailed_caption(r["objects"])] for r in rows]
    if settings.stage2_captions == "dataset":
        return [r["captions"] for r in rows]
    raise ValueError(f"stage2_captions must be 'detailed' or 'dataset', got {settings.stage2_captions!r}")


# ------------------------------------------------------------------------------------------ caching


def _hash(*parts: Any) -> str:
    text = json.dumps([DEMO_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_keys(s: DemoSettings) -> dict[str, str]:
    """One key per cached step, each covering the settings that step and the steps before it depend on."""
    d = s.to_dict()
    data = _hash("data", s.seed, s.n_train, s.n_test, s.render_size)
    vision = ("vision", s.image_size, s.patch_size, s.vit_width, s.vit_layers, s.vit_heads, s.vision_init, s.tiny)
    if s.vision_init != "random":
        vision += (d["vit_pretrain"],)
    features = _hash(data, vision, s.seed)
    qformer = (s.num_query_tokens, s.cross_attention_frequency, s.qformer_dropout, s.max_text_tokens)
    stage1 = _hash(features, "stage1", d["stage1"], qformer)
    stage2 = _hash(stage1, "stage2", d["stage2"], s.stage2_captions, s.caption_prompt, s.stage2_train_qformer)
    keys = ("caption_generation", "vqa_template", "vqa_generation", "answer_words", "retrieval_k", "caption_metrics")
    keys += ("eval_batch_size", "vqa_caption_context", "vqa_true_caption_images")
    evaluation = _hash(stage2, "eval", {k: d[k] for k in keys})
    return {"data": data, "features": features, "stage1": stage1, "stage2": stage2, "eval": evaluation}


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def run(self, name: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        self.times[name] = round(time.perf_counter() - start, 2)
        return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024, 1)


# ------------------------------------------------------------------------------------------ the run


def run_demo(output: Path, quick: bool = False, settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run (or resume) the whole demo into ``output`` and return the metrics written to ``metrics.json``."""
    started = time.perf_counter()
    settings = settings or (quick_settings() if quick else DemoSettings())
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if settings.tiny:
        torch.set_num_threads(1)  # tiny matrices: thread start-up would cost more than it saves
    # Same figures on every run (see the module docstring); warn_only: an op without a deterministic kernel
    # warns instead of failing the demo.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run(Path(output), settings, started)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def _run(output: Path, settings: DemoSettings, started: float) -> dict[str, Any]:
    from blip2.demo.pipeline import Pipeline

    output.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(settings, output, cache_keys(settings))
    timer = _Timer()
    data_dir = timer.run("data", pipeline.data)
    features = timer.run("features", pipeline.features, data_dir)
    stage1 = timer.run("stage1", pipeline.stage1, features)
    stage2 = timer.run("stage2", pipeline.stage2, features, stage1)
    results = timer.run("evaluate", pipeline.evaluate, data_dir, stage1, stage2)
    timer.run("save_models", pipeline.save_models, stage1, stage2)
    metrics = pipeline.metrics(results, timer.times, time.perf_counter() - started, peak_rss_mb())
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    timer.run("report", pipeline.report, data_dir, results, metrics)
    metrics["timings_s"]["report"] = timer.times["report"]
    metrics["wall_time_s"] = round(time.perf_counter() - started, 1)
    metrics["peak_rss_mb"] = peak_rss_mb()
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def clean_cache(output: Path) -> None:
    """Remove the cached intermediate work of a demo directory (keeps the outputs)."""
    shutil.rmtree(Path(output) / "cache", ignore_errors=True)
