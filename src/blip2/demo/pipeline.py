"""`blip2 demo`: BLIP-2 pretrained end to end on a laptop-class CPU, offline, then evaluated, with a report.

BLIP-2's premise is two *competent* frozen unimodal models bridged by a Q-Former. No pretrained vision weights
install offline, and the one small LLM that does (Gemma 3 270M) cannot answer questions about a scene it is
told in words (its measured ceiling is in the README), so the demo pretrains both frozen parts first, each in
its own stage and on its own modality, then runs BLIP-2's two stages as in the paper.

Pipeline (each step cached under ``DIR/cache``, keyed by a hash of the settings it depends on, so a second run
reuses finished work and a killed run resumes training from its last checkpoint):

1. data:          synthetic scenes (`blip2.data.scenes`): ``train``; ``test`` (unseen scenes of the training
                  distribution: every headline figure); ``compositional`` (each scene holds a colour-shape pair
                  never seen in training); ``shifted`` (other background shades and placements, question
                  wordings never seen in training).
2. image encoder: a small CNN pretrained on fresh training-split scenes, supervised by their descriptions, then
                  frozen (`blip2.demo.encoder`); a linear probe measures it alone; it encodes every training
                  image once (`blip2.data.feature_cache`).
3. LLM:           MiniLM-L6's first layers as a causal decoder, pretrained further on text only (descriptions,
                  captions, questions and answers about described scenes), then frozen (`blip2.demo.text_llm`);
                  its ceiling (the true description in words, then the question) measures it alone. Or Gemma 3
                  270M (``llm: gemma-3-270m``).
4. stage 1:       Q-Former (from pretrained MiniLM-L6) on the cached features: ITC + ITM + ITG.
5. stage 2:       the Q-Former's queries -> Linear -> soft visual prompt of the frozen LLM, LM loss on captions
                  only: no question is ever paired with an image in training.
6. evaluate:      retrieval (ITC shortlist + ITM re-rank), captions (attribute accuracy, CIDEr, BLEU-4) and
                  zero-shot VQA per question type on each evaluation split (`blip2.eval.runner.run_eval`).
7. outputs:       ``DIR/model`` (stage 2, ``Blip2.from_pretrained``), ``DIR/qformer`` (stage 1, for retrieval),
                  ``DIR/metrics.json``, ``DIR/report.html``; the scenes in ``DIR/data``.

The run recipe is ``configs/demo.yaml`` (`DemoSettings.load`); ``quick=True`` applies its ``quick:`` section:
tiny models and a few dozen images (for tests: seconds).

Reproducibility: the demo runs under ``torch.use_deterministic_algorithms(True)``, so a second run from scratch
on the same machine and thread count gives the same weights and figures (without it, an earlier version's
stage-1 weights of two runs differed at 1e-7 after ~15 steps, and stage 2 amplified that into different
answers).
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

from blip2.checkpoints.offline import MARKER_FILE, ensure_cached_dir
from blip2.data.datasets import ImageTextDataset
from blip2.data.feature_cache import CachedFeatureDataset
from blip2.data.scenes import detailed_caption
from blip2.demo.results import ceiling_summary, curve, headline, held_out_pair_scores, without_predictions
from blip2.demo.settings import DemoSettings, StageSettings, demo_config
from blip2.demo.stages import build_stage1_model, build_stage2_model, is_done, mark_done, train_stage, trainable_weights
from blip2.model import Blip2, Blip2QFormer
from blip2.train.recipes import collate_for_model

DEMO_VERSION = 6  # part of every cache key: bump when the pipeline changes what a cached step holds

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
        """``DIR/data/{train,test,compositional,shifted}``: the scene files (rebuilt when the data settings
        change)."""
        from blip2.data.scene_files import write_split

        s = self.s

        def build(tmp: Path) -> dict[str, Any]:
            for split, n in self.split_sizes().items():
                write_split(tmp, split, n, seed=s.seed, image_size=s.render_size)
            return self.split_sizes()

        return ensure_cached_dir(self.out / "data", build, expect={"config_hash": self.keys["data"]})

    def split_sizes(self) -> dict[str, int]:
        s = self.s
        return {"train": s.n_train, "test": s.n_test, "compositional": s.n_compositional, "shifted": s.n_shifted}

    # ---------------------------------------------------------------------------------------- image encoder
    def image_encoder(self, data_dir: Path) -> dict[str, Any]:
        """Pretrain the CNN (supervised, fresh training-split scenes), freeze it, probe it, and encode every
        training image once. Returns its weights ("weights"), the training features ("train", (N, P, Dv), in
        `train_dataset` order), the probe's accuracies and the pretraining losses."""
        from blip2.data.feature_cache import build_feature_cache, encode_images, image_paths_of, read_feature_cache
        from blip2.data.transforms import ImageProcessor
        from blip2.demo.encoder import cell_labels, linear_probe, pretrain_encoder
        from blip2.vision import build_vision_encoder

        s, train = self.s, self.train_dataset(data_dir)

        def build(tmp: Path) -> dict[str, Any]:
            config = demo_config(s, with_llm=False).vision
            torch.manual_seed(s.seed)
            encoder = build_vision_encoder(config)  # seeded random init, then pretrained here and frozen
            processor = ImageProcessor.from_vision_config(config)
            e = s.image_encoder
            started = time.perf_counter()
            losses = pretrain_encoder(
                encoder, processor, e.steps, e.batch_size, e.lr, s.seed, s.render_size, objective=e.objective
            )
            train_time = round(time.perf_counter() - started, 1)
            save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp / "encoder.safetensors"))
            feats = build_feature_cache(encoder, image_paths_of(train), processor, tmp)  # (N, P, Dv)
            test = self.train_dataset(data_dir, split="test")
            test_feats, _ = encode_images(encoder, image_paths_of(test), processor)  # (M, P, Dv)
            probe = linear_probe(
                feats,
                torch.stack([cell_labels(objects) for objects in _objects_of(data_dir / "train")]),
                test_feats,
                torch.stack([cell_labels(objects) for objects in _objects_of(data_dir / "test")]),
                steps=e.probe_steps,
                seed=s.seed,
            )
            probe.update({"n_train": len(feats), "n_test": len(test_feats)})
            return {"losses": losses, "probe": probe, "train_time_s": train_time}

        key = self.keys["image_encoder"]
        directory = ensure_cached_dir(self.cache / f"image-encoder-{key}", build, expect={"config_hash": key})
        marker = json.loads((directory / MARKER_FILE).read_text())
        return {
            "weights": load_file(str(directory / "encoder.safetensors")),
            "train": read_feature_cache(directory)[0],
            "data_dir": data_dir,
            "probe": marker["probe"],
            "losses": marker["losses"],
            "train_time_s": marker["train_time_s"],
        }

    # ---------------------------------------------------------------------------------------- LLM
    def llm(self, data_dir: Path) -> dict[str, Any]:
        """The frozen LLM: the demo's text LLM pretrained here (cached directory, transformers layout), or
        Gemma 3 270M; with its ceiling on the test split (true description in words, then the question)."""
        from blip2.demo.text_llm import pretrain_text_llm

        s = self.s
        llm_dir = None
        info: dict[str, Any] = {"losses": [], "train_time_s": 0.0}
        if s.llm == "demo":

            def build(tmp: Path) -> dict[str, Any]:
                started = time.perf_counter()
                losses = pretrain_text_llm(s.text_llm, s.seed, tmp)
                return {"losses": losses, "train_time_s": round(time.perf_counter() - started, 1)}

            key = self.keys["llm"]
            llm_dir = ensure_cached_dir(self.cache / f"llm-{key}", build, expect={"config_hash": key})
            info = json.loads((llm_dir / MARKER_FILE).read_text())
        config = demo_config(s, with_llm=True, llm_dir=llm_dir).llm
        assert config is not None
        ceiling_path = self.cache / f"llm-ceiling-{self.keys['llm']}.json"
        if s.ceiling_images > 0 and not ceiling_path.is_file():
            _write_json(ceiling_path, self._ceiling(config, data_dir))
        ceiling = json.loads(ceiling_path.read_text()) if ceiling_path.is_file() else None
        return {"dir": llm_dir, "config": config, "ceiling": ceiling, **info}

    def _ceiling(self, config: Any, data_dir: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from blip2.demo.text_llm import description_ceiling
        from blip2.llm import generation_stop_ids

        assert config.model_id
        model = AutoModelForCausalLM.from_pretrained(config.model_id, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(config.model_id)
        s = self.s
        return description_ceiling(
            model,
            tokenizer,
            data_dir / "test",
            template=s.vqa_template,
            n_images=s.ceiling_images,
            stop_ids=generation_stop_ids(config),
            answer_words=s.answer_words,
            max_new_tokens=int(s.vqa_generation.get("max_new_tokens", 4)),
        )

    def train_dataset(self, data_dir: Path, detailed: bool = False, split: str = "train") -> ImageTextDataset:
        """The training split, one item per image with one of its captions drawn per (seed, epoch, index):
        the scene file's captions (stage 1), or with ``detailed`` the one caption that names everything in
        the scene (stage 2, `detailed_caption`)."""
        split_dir = data_dir / split
        records: Any = split_dir / "captions.jsonl"
        if detailed:
            rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
            records = [{"image": r["image"], "captions": [detailed_caption(r["objects"])]} for r in rows]
        return ImageTextDataset(records, image_root=split_dir, mode="random_caption", seed=self.s.seed)

    # ---------------------------------------------------------------------------------------- stages 1, 2
    def stage1(self, features: dict[str, Any]) -> Blip2QFormer:
        model = build_stage1_model(self.s, features["weights"])
        return self._train(model, "stage1", features, self.s.stage1, self.s.seed)

    def stage2(self, features: dict[str, Any], llm: dict[str, Any], stage1: Blip2QFormer) -> Blip2:
        model = build_stage2_model(self.s, stage1, llm["dir"])
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
    def evaluate(self, data_dir: Path, stage1: Blip2QFormer, stage2: Blip2) -> dict[str, dict[str, Any]]:
        """`run_eval` on every evaluation split (retrieval, captions, zero-shot VQA), predictions kept."""
        from blip2.eval.runner import run_eval
        from blip2.eval.scenes import load_scenes_eval

        s, key = self.s, self.keys["eval"]
        path = self.cache / f"eval-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        results = {}
        for split in EVAL_SPLITS:
            if self.split_sizes()[split] == 0:
                continue
            data = load_scenes_eval(data_dir / split)  # read once: both retrieval protocols and run_eval
            results[split] = run_eval(
                model=stage2,
                retrieval_model=stage1,
                data=data,
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
            results[split]["retrieval_captions"] = results[split]["retrieval"]
            results[split]["retrieval"] = self._description_retrieval(stage1, data)
            if split == "compositional":
                results[split]["held_out_pairs"] = held_out_pair_scores(data_dir / split, results[split])
        self.cache.mkdir(parents=True, exist_ok=True)
        _write_json(path, results)
        return json.loads(path.read_text())  # the same (JSON) keys on a fresh run as on a cached one

    def _description_retrieval(self, stage1: Blip2QFormer, data: Any) -> dict[str, Any]:
        """Retrieval with one text per image, its full description (`detailed_caption`: every object's size,
        colour, shape and position), so every text is true of exactly one image of the split.

        The scenes' five captions per image are a poor retrieval pool: many leave out sizes and positions, and on
        the test split 32 of 100 images share a caption word for word with another image ("a picture of a
        small red circle"), so a retrieval that ranks every true text equally counts those images as misses.
        That protocol's figures are kept beside these (``retrieval_captions``). ``data``: the split as
        `blip2.eval.scenes.load_scenes_eval` reads it."""
        from blip2.eval.runner import RETRIEVAL_TOP, eval_retrieval

        ids = list(data["references"])
        return eval_retrieval(
            stage1,
            [data["paths"][i] for i in ids],
            [[detailed_caption(data["objects"][i])] for i in ids],
            k=self.s.retrieval_k,
            batch_size=self.s.eval_batch_size,
            top=RETRIEVAL_TOP,
        )

    # ---------------------------------------------------------------------------------------- outputs
    def save_models(self, stage1: Blip2QFormer, stage2: Blip2) -> None:
        """``DIR/qformer`` (stage 1) and ``DIR/model`` (stage 2, with the LLM's tokenizer); skipped when
        the directories already hold these weights."""
        for name, model, key in (("qformer", stage1, "stage1"), ("model", stage2, "stage2")):
            target = self.out / name
            marker = target / MODEL_MARKER
            if marker.is_file() and json.loads(marker.read_text()).get("config_hash") == self.keys[key]:
                continue
            shutil.rmtree(target, ignore_errors=True)
            model.save_pretrained(target)
            marker.write_text(json.dumps({"config_hash": self.keys[key], "settings": self.s.to_dict()}, indent=2))

    def training_log(self, stage: str) -> list[dict[str, Any]]:
        path = self.cache / f"{stage}-{self.keys[stage]}" / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def losses(self, encoder: dict[str, Any], llm: dict[str, Any]) -> dict[str, list[float]]:
        """The loss curves of the four stages, for the report."""
        return {
            "image encoder": list(encoder.get("losses") or []),
            "language model": list(llm.get("losses") or []),
            "stage 1": [row["loss"] for row in self.training_log("stage1") if "loss" in row],
            "stage 2": [row["loss"] for row in self.training_log("stage2") if "loss" in row],
        }

    def metrics(
        self,
        results: dict[str, dict[str, Any]],
        encoder: dict[str, Any],
        llm: dict[str, Any],
        times: dict[str, float],
        wall: float,
        rss: float,
    ) -> dict[str, Any]:
        llm_steps = self.s.text_llm.steps if self.s.llm == "demo" else 0
        training: dict[str, Any] = {
            "image_encoder": curve(encoder["losses"], self.s.image_encoder.steps, encoder["train_time_s"]),
            "llm": curve(llm.get("losses") or [], llm_steps, llm.get("train_time_s")),
        }
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
            "headline": headline(results.get("test") or {}),
            "targets": dict(self.s.targets),
            "image_encoder_probe": encoder["probe"],
            "llm_name": LLM_NAMES[self.s.llm],
            "llm_ceiling": ceiling_summary(llm.get("ceiling"), LLM_NAMES[self.s.llm]),
            "splits": {split: without_predictions(r) for split, r in results.items()},
            "training": training,
            "settings": self.s.to_dict(),
            "cache_keys": self.keys,
            "torch_threads": torch.get_num_threads(),
        }

    def report(
        self, data_dir: Path, results: dict[str, Any], metrics: dict[str, Any], losses: dict[str, list[float]]
    ) -> Path:
        from blip2.demo.report import write_report

        split_dirs = {split: data_dir / split for split in results}
        return write_report(self.out / "report.html", split_dirs, results, metrics, losses, self.s.n_report)


EVAL_SPLITS = ("test", "compositional", "shifted")
LLM_NAMES = {
    "demo": "MiniLM-L6 layers as a causal decoder, pretrained here on text only",
    "gemma-3-270m": "Gemma 3 270M",
}


# ------------------------------------------------------------------------------------------ caching


def _hash(*parts: Any) -> str:
    text = json.dumps([DEMO_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_keys(s: DemoSettings) -> dict[str, str]:
    """One key per cached step, each covering the settings that step and the steps before it depend on."""
    d = s.to_dict()
    data = _hash("data", s.seed, s.n_train, s.n_test, s.n_compositional, s.n_shifted, s.render_size)
    image_encoder = _hash(data, "image_encoder", d["image_encoder"], s.seed)
    text_llm = d["text_llm"] if s.llm == "demo" else None
    llm = _hash("llm", s.llm, text_llm, s.seed, data, s.ceiling_images, s.vqa_template, s.answer_words)
    qformer = (s.num_query_tokens, s.qformer_layers, s.cross_attention_frequency, s.qformer_dropout)
    qformer += (s.max_text_tokens, s.tiny, s.qformer_vocabulary, s.qformer_kv_init_std)
    stage1 = _hash(image_encoder, "stage1", d["stage1"], qformer)
    stage2 = _hash(stage1, llm, "stage2", d["stage2"], s.caption_prompt)
    keys = ("caption_generation", "vqa_template", "vqa_generation", "answer_words", "retrieval_k", "caption_metrics")
    keys += ("eval_batch_size",)
    evaluation = _hash(stage2, "eval", {k: d[k] for k in keys})
    return {
        "data": data,
        "image_encoder": image_encoder,
        "llm": llm,
        "stage1": stage1,
        "stage2": stage2,
        "eval": evaluation,
    }


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


def run_demo(
    output: Path, quick: bool = False, settings: DemoSettings | None = None, llm: str | None = None
) -> dict[str, Any]:
    """Run (or resume) the whole demo into ``output`` and return the metrics written to ``metrics.json``.
    ``llm`` overrides the settings' frozen LLM ("demo" or "gemma-3-270m")."""
    started = time.perf_counter()
    settings = settings or DemoSettings.load(quick=quick)
    if llm is not None:
        settings = DemoSettings.from_dict({**settings.to_dict(), "llm": llm})
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
    encoder = timer.run("image_encoder", pipeline.image_encoder, data_dir)
    llm = timer.run("llm", pipeline.llm, data_dir)
    stage1 = timer.run("stage1", pipeline.stage1, encoder)
    stage2 = timer.run("stage2", pipeline.stage2, encoder, llm, stage1)
    results = timer.run("evaluate", pipeline.evaluate, data_dir, stage1, stage2)
    timer.run("save_models", pipeline.save_models, stage1, stage2)
    metrics = pipeline.metrics(results, encoder, llm, timer.times, time.perf_counter() - started, peak_rss_mb())
    _write_json(output / "metrics.json", metrics)
    timer.run("report", pipeline.report, data_dir, results, metrics, pipeline.losses(encoder, llm))
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


def _objects_of(split_dir: Path) -> list[list[dict[str, Any]]]:
    """Each image's objects, in the order of the split's captions.jsonl (the order of its datasets)."""
    lines = (split_dir / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["objects"] for line in lines if line.strip()]
