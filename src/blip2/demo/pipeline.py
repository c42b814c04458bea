"""`blip2 demo`: BLIP-2 pretrained end to end on a laptop-class CPU, offline, then evaluated, with a report.

Pipeline (each step cached under ``DIR/cache``, keyed by a hash of the settings it depends on, so a second run
reuses finished work and a killed run resumes training from its last checkpoint):

1. data:      synthetic scenes (`blip2.data.scenes`): a training split and the held-out test split, whose
              every image holds a (color, shape) pair never seen in training.
2. features:  a small ViT, CLIP-pretrained on the training split then frozen (`blip2.demo.encoder`),
              encodes every training image once (`blip2.data.feature_cache`).
3. stage 1:   Q-Former (from pretrained MiniLM-L6) on the cached features: ITC + ITM + ITG.
4. stage 2:   the Q-Former's queries → Linear → soft visual prompt of the frozen Gemma 3 270M, LM loss on
              captions only (no question is ever seen in training).
              Both stages train on the library's datasets and batches (`blip2.data.feature_cache`,
              `blip2.data.collate` via `blip2.train.recipes.collate_for_model`) with `blip2.train.loop`.
5. evaluate:  retrieval (ITC shortlist + ITM re-rank), captions (CIDEr, BLEU-4, attribute accuracy) and
              zero-shot VQA per question type, on the held-out split (`blip2.eval.runner.run_eval`).
6. outputs:   ``DIR/model`` (stage 2, ``Blip2.from_pretrained``), ``DIR/qformer`` (stage 1, for retrieval),
              ``DIR/metrics.json``, ``DIR/stage{1,2}_losses.png``, ``DIR/report.html``; the scenes in
              ``DIR/data``.

The run recipe is ``configs/demo.yaml`` (`DemoSettings.load`); ``quick=True`` applies its ``quick:`` section:
tiny random models and a few dozen images (for tests: seconds).

Reproducibility: the demo runs under ``torch.use_deterministic_algorithms(True)``, so a second run from scratch
on the same machine and thread count gives the same weights and figures. Without it, some CPU kernel that is
not deterministic by default (not pinned down) made stage-1 weights of two runs differ at 1e-7 after ~15
steps, and stage 2 amplified that into different captions and answers (zero-shot VQA 0.23 in one run, 0.07 in
the next). It cost nothing measurable.
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from blip2.checkpoints.offline import ensure_cached_dir
from blip2.data.datasets import ImageTextDataset
from blip2.data.feature_cache import CachedFeatureDataset
from blip2.data.scenes import detailed_caption
from blip2.demo.settings import DemoSettings, StageSettings, demo_config
from blip2.demo.stages import build_stage1_model, build_stage2_model, is_done, mark_done, train_stage, trainable_weights
from blip2.model import Blip2, Blip2QFormer
from blip2.train.recipes import collate_for_model

DEMO_VERSION = 5  # part of every cache key: bump when the pipeline changes what a cached step holds

MODEL_MARKER = "demo.json"


class Pipeline:
    def __init__(self, settings: DemoSettings, output: Path, keys: dict[str, str]) -> None:
        self.s = settings
        self.out = output
        self.cache = output / "cache"
        self.keys = keys
        self.log_every = 1 if settings.tiny else 5

    # ---------------------------------------------------------------------------------------- data
    def data(self) -> Path:
        """``DIR/data/{train,test}``: the scene files (rebuilt when the data settings change)."""
        from blip2.data.scenes import write_split

        s = self.s

        def build(tmp: Path) -> dict[str, Any]:
            write_split(tmp, "train", s.n_train, seed=s.seed, image_size=s.render_size)
            write_split(tmp, "test", s.n_test, seed=s.seed, image_size=s.render_size)
            return {"n_train": s.n_train, "n_test": s.n_test}

        return ensure_cached_dir(self.out / "data", build, expect={"config_hash": self.keys["data"]})

    # ---------------------------------------------------------------------------------------- features
    def features(self, data_dir: Path) -> dict[str, Any]:
        """The frozen ViT's weights ("vit") and its features of the training images ("train", (N, P, Dv), in
        `train_dataset` order), computed once into a `build_feature_cache` directory."""
        from blip2.data.feature_cache import build_feature_cache, image_paths_of, read_feature_cache
        from blip2.data.transforms import ImageProcessor
        from blip2.vision import build_vision_encoder

        s, train = self.s, self.train_dataset(data_dir)

        def build(tmp: Path) -> dict[str, Any]:
            config = demo_config(s, with_llm=False).vision
            torch.manual_seed(s.seed)
            vit = build_vision_encoder(config)  # seeded random init, then CLIP-pretrained and frozen
            processor = ImageProcessor.from_vision_config(config)
            losses = self._pretrain_vit(vit, processor, train)
            save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp / "vit.safetensors"))
            feats = build_feature_cache(vit, image_paths_of(train), processor, tmp)  # (N, P, Dv)
            return {"shape_per_image": list(feats.shape[1:]), "contrastive_losses": losses}

        key = self.keys["features"]
        directory = ensure_cached_dir(self.cache / f"features-{key}", build, expect={"config_hash": key})
        return {
            "vit": load_file(str(directory / "vit.safetensors")),
            "train": read_feature_cache(directory)[0],
            "data_dir": data_dir,
        }

    def _pretrain_vit(self, vit: torch.nn.Module, processor: Any, train: ImageTextDataset) -> list[float]:
        from blip2.data.feature_cache import image_paths_of
        from blip2.data.images import load_image
        from blip2.demo.encoder import pretrain_vit_contrastive

        pixels = processor([load_image(p) for p in image_paths_of(train)])  # (N, 3, H, W)
        st = self.s.vit_pretrain
        losses = pretrain_vit_contrastive(
            vit,
            pixels,
            [entry.captions for entry in train.images],
            st.steps,
            st.batch_size,
            lr=st.lr,
            warmup_steps=st.warmup_steps,
            min_lr=st.lr * st.min_lr_ratio,
            weight_decay=st.weight_decay,
            seed=self.s.seed,
        )
        return [round(x, 4) for x in losses]

    def train_dataset(self, data_dir: Path, detailed: bool = False) -> ImageTextDataset:
        """The training split, one item per image with one of its captions drawn per (seed, epoch, index):
        the scene file's captions (stage 1), or with ``detailed`` the one caption that names everything in
        the scene (stage 2, `detailed_caption`)."""
        split = data_dir / "train"
        records: Any = split / "captions.jsonl"
        if detailed:
            rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
            records = [{"image": r["image"], "captions": [detailed_caption(r["objects"])]} for r in rows]
        return ImageTextDataset(records, image_root=split, mode="random_caption", seed=self.s.seed)

    # ---------------------------------------------------------------------------------------- stages 1, 2
    def stage1(self, features: dict[str, Any]) -> Blip2QFormer:
        model = build_stage1_model(self.s, features["vit"])
        return self._train(model, "stage1", features, self.s.stage1, self.s.seed)

    def stage2(self, features: dict[str, Any], stage1: Blip2QFormer) -> Blip2:
        model = build_stage2_model(self.s, stage1)
        return self._train(model, "stage2", features, self.s.stage2, self.s.seed + 1)

    def _train(self, model: Any, stage: str, features: dict[str, Any], settings: StageSettings, seed: int) -> Any:
        """Train ``model`` on the cached features unless this stage's run is done; load its trained weights."""
        key = self.keys[stage]
        run_dir = self.cache / f"{stage}-{key}"
        if not is_done(run_dir, key):
            captions = self.train_dataset(features["data_dir"], detailed=stage == "stage2")
            dataset = CachedFeatureDataset(captions, features["train"])
            collate = collate_for_model(model, self.s.max_text_tokens, prompt=self.s.caption_prompt)
            last = train_stage(model, dataset, collate, settings, run_dir, seed, self.log_every)
            torch.save(trainable_weights(model), run_dir / "trainable.pt")
            mark_done(run_dir, key, {"last_metrics": last})
        model.load_state_dict(torch.load(run_dir / "trainable.pt", weights_only=True), strict=False)
        return model.eval()

    # ---------------------------------------------------------------------------------------- evaluation
    def evaluate(self, data_dir: Path, stage1: Blip2QFormer, stage2: Blip2) -> dict[str, Any]:
        from blip2.eval.runner import run_eval

        s, key = self.s, self.keys["eval"]
        path = self.cache / f"eval-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        results = run_eval(
            model=stage2,
            retrieval_model=stage1,
            scenes=data_dir / "test",
            caption_prompt=s.caption_prompt or None,
            caption_generation=s.caption_generation,
            vqa_template=s.vqa_template,
            vqa_generation=s.vqa_generation,
            answer_words=s.answer_words,
            retrieval_k=s.retrieval_k,
            caption_metric_names=s.caption_metrics,
            batch_size=s.eval_batch_size,
            keep_predictions=True,
        )
        if s.vqa_true_caption_images > 0:
            results["vqa_true_caption"] = true_description_ceiling(stage2, data_dir / "test", s)
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(path)
        return results

    # ---------------------------------------------------------------------------------------- outputs
    def save_models(self, stage1: Blip2QFormer, stage2: Blip2) -> None:
        """``DIR/qformer`` (stage 1) and ``DIR/model`` (stage 2, with the LLM's tokenizer); skipped when
        the directories already hold these weights. Loss plots are copied next to them."""
        for name, model, key in (("qformer", stage1, "stage1"), ("model", stage2, "stage2")):
            target = self.out / name
            marker = target / MODEL_MARKER
            if marker.is_file() and json.loads(marker.read_text()).get("config_hash") == self.keys[key]:
                continue
            shutil.rmtree(target, ignore_errors=True)
            model.save_pretrained(target)
            marker.write_text(json.dumps({"config_hash": self.keys[key], "settings": self.s.to_dict()}, indent=2))
        for stage in ("stage1", "stage2"):
            plot = self.cache / f"{stage}-{self.keys[stage]}" / "losses.png"
            if plot.is_file():
                shutil.copyfile(plot, self.out / f"{stage}_losses.png")

    def training_log(self, stage: str) -> list[dict[str, Any]]:
        path = self.cache / f"{stage}-{self.keys[stage]}" / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def metrics(self, results: dict[str, Any], times: dict[str, float], wall: float, rss: float) -> dict[str, Any]:
        training = {}
        for stage in ("stage1", "stage2"):
            log = self.training_log(stage)
            training[stage] = {
                "steps": getattr(self.s, stage).steps,
                "first": log[0] if log else None,
                "last": log[-1] if log else None,
                "train_time_s": log[-1].get("elapsed_s") if log else None,
            }
        return {
            "wall_time_s": round(wall, 1),
            "peak_rss_mb": rss,
            "timings_s": times,
            "headline": headline(results),
            "retrieval": results.get("retrieval"),
            "captions": results.get("captions"),
            "vqa": results.get("vqa"),
            "vqa_true_caption": results.get("vqa_true_caption"),
            "training": training,
            "settings": self.s.to_dict(),
            "cache_keys": self.keys,
            "torch_threads": torch.get_num_threads(),
        }

    def report(self, data_dir: Path, results: dict[str, Any], metrics: dict[str, Any]) -> Path:
        from blip2.demo.report import write_report

        plots = [p for p in (self.out / "stage1_losses.png", self.out / "stage2_losses.png") if p.is_file()]
        return write_report(self.out / "report.html", data_dir / "test", results, metrics, plots, self.s.n_report)


def true_description_ceiling(model: Blip2, split_dir: Path, s: DemoSettings) -> dict[str, Any]:
    """The frozen LLM's ceiling: VQA on the first ``s.vqa_true_caption_images`` test images with the true scene
    description written before each question (the visual prompt still there)."""
    from blip2.data.scenes import detailed_caption
    from blip2.eval.runner import eval_vqa
    from blip2.eval.scenes import load_scenes_eval

    data = load_scenes_eval(split_dir)
    first = list(data["paths"])[: s.vqa_true_caption_images]
    first_set = set(first)
    told = {q: a for q, a in data["annotations"].items() if data["questions"][q]["image_id"] in first_set}
    report = eval_vqa(
        model,
        data["questions"],
        told,
        data["paths"],
        template=s.vqa_template,
        generation=s.vqa_generation,
        answer_words=s.answer_words,
        batch_size=s.eval_batch_size,
        context={i: detailed_caption(data["objects"][i]) for i in first},
    )
    report.update({"context": "true description", "n_images": len(first)})
    return report


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the demo is judged by."""
    retrieval = results.get("retrieval") or {}
    captions = results.get("captions") or {}
    vqa = results.get("vqa") or {}
    attributes = captions.get("attributes") or {}
    return {
        "i2t_r1": retrieval.get("i2t_r1"),
        "t2i_r1": retrieval.get("t2i_r1"),
        "caption_attribute_accuracy": attributes.get("object"),
        "caption_exact": attributes.get("exact"),
        "CIDEr": captions.get("CIDEr"),
        "BLEU-4": captions.get("BLEU-4"),
        "vqa_overall": vqa.get("overall"),
        "vqa_per_type": vqa.get("per_type"),
        "vqa_true_caption_overall": (results.get("vqa_true_caption") or {}).get("overall"),
        "vqa_true_caption_per_type": (results.get("vqa_true_caption") or {}).get("per_type"),
    }


# ------------------------------------------------------------------------------------------ caching


def _hash(*parts: Any) -> str:
    text = json.dumps([DEMO_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_keys(s: DemoSettings) -> dict[str, str]:
    """One key per cached step, each covering the settings that step and the steps before it depend on."""
    d = s.to_dict()
    data = _hash("data", s.seed, s.n_train, s.n_test, s.render_size)
    vision = ("vision", s.image_size, s.patch_size, s.vit_width, s.vit_layers, s.vit_heads, s.tiny, d["vit_pretrain"])
    features = _hash(data, vision, s.seed)
    qformer = (s.num_query_tokens, s.cross_attention_frequency, s.qformer_dropout, s.max_text_tokens)
    stage1 = _hash(features, "stage1", d["stage1"], qformer)
    stage2 = _hash(stage1, "stage2", d["stage2"], s.caption_prompt)
    keys = ("caption_generation", "vqa_template", "vqa_generation", "answer_words", "retrieval_k", "caption_metrics")
    keys += ("eval_batch_size", "vqa_true_caption_images")
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
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024, 1)


# ------------------------------------------------------------------------------------------ the run


def run_demo(output: Path, quick: bool = False, settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run (or resume) the whole demo into ``output`` and return the metrics written to ``metrics.json``."""
    started = time.perf_counter()
    settings = settings or DemoSettings.load(quick=quick)
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
    _write_json(output / "metrics.json", metrics)
    timer.run("report", pipeline.report, data_dir, results, metrics)
    metrics["timings_s"]["report"] = timer.times["report"]
    metrics["wall_time_s"] = round(time.perf_counter() - started, 1)
    metrics["peak_rss_mb"] = peak_rss_mb()
    _write_json(output / "metrics.json", metrics)
    return metrics


def _write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON without ever leaving a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)
