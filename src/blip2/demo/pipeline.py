"""The steps of `blip2.demo.settings.run_demo`, one method each, every one cached (layout: `blip2.demo.settings`)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from blip2.checkpoints.offline import ensure_cached_dir
from blip2.demo.settings import DemoSettings, demo_config, stage2_captions
from blip2.demo.stages import (
    FeatureCaptionDataset,
    Stage1Collator,
    Stage2Collator,
    build_stage1_model,
    build_stage2_model,
    extract_image_features,
    is_done,
    load_tensors,
    mark_done,
    read_scene_split,
    save_tensors,
    train_stage,
    trainable_weights,
)
from blip2.model import Blip2, Blip2QFormer

logger = logging.getLogger(__name__)

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
        """The frozen ViT's weights and its features of every image, computed once."""
        from blip2.data.transforms import ImageProcessor
        from blip2.vision import build_vision_encoder

        s = self.s

        def build(tmp: Path) -> dict[str, Any]:
            config = demo_config(s, with_llm=False).vision
            if s.vision_init not in ("random", "contrastive"):
                raise ValueError(f"vision_init must be 'random' or 'contrastive', got {s.vision_init!r}")
            torch.manual_seed(s.seed)
            vit = build_vision_encoder(config)  # seeded random init, frozen
            processor = ImageProcessor.from_vision_config(config)
            extra: dict[str, Any] = {}
            if s.vision_init == "contrastive":
                extra["contrastive_losses"] = self._pretrain_vit(vit, processor, data_dir)
            save_tensors(tmp / "vit.safetensors", vit.state_dict())
            for split in ("train", "test"):
                rows = read_scene_split(data_dir / split)
                feats = extract_image_features(vit, processor, [r["image"] for r in rows])  # (N, P, Dv)
                save_tensors(tmp / f"{split}.safetensors", {"features": feats})
            return {"shape_per_image": list(feats.shape[1:]), **extra}

        directory = ensure_cached_dir(
            self.cache / f"features-{self.keys['features']}", build, expect={"config_hash": self.keys["features"]}
        )
        return {
            "vit": load_tensors(directory / "vit.safetensors"),
            "train": load_tensors(directory / "train.safetensors")["features"],
            "train_rows": read_scene_split(data_dir / "train"),
        }

    def _pretrain_vit(self, vit: torch.nn.Module, processor: Any, data_dir: Path) -> list[float]:
        from blip2.data.images import load_image
        from blip2.demo.encoder import pretrain_vit_contrastive

        rows = read_scene_split(data_dir / "train")
        pixels = processor([load_image(r["image"]) for r in rows])  # (N, 3, H, W)
        st = self.s.vit_pretrain
        losses = pretrain_vit_contrastive(
            vit,
            pixels,
            [r["captions"] for r in rows],
            st.steps,
            st.batch_size,
            lr=st.lr,
            warmup_steps=st.warmup_steps,
            min_lr=st.lr * st.min_lr_ratio,
            weight_decay=st.weight_decay,
            seed=self.s.seed,
        )
        return [round(x, 4) for x in losses]

    # ---------------------------------------------------------------------------------------- stage 1
    def stage1(self, features: dict[str, Any]) -> Blip2QFormer:
        s, key = self.s, self.keys["stage1"]
        run_dir = self.cache / f"stage1-{key}"
        model = build_stage1_model(s, features["vit"])
        if not is_done(run_dir, key):
            captions = [r["captions"] for r in features["train_rows"]]
            dataset = FeatureCaptionDataset(features["train"], captions, seed=s.seed)
            collate = Stage1Collator(model.tokenizer, s.max_text_tokens)
            last = train_stage(model, dataset, collate, s.stage1, run_dir, s.seed, self.log_every)
            torch.save(trainable_weights(model), run_dir / "trainable.pt")
            mark_done(run_dir, key, {"last_metrics": last})
        weights = torch.load(run_dir / "trainable.pt", weights_only=True)
        model.load_state_dict(weights, strict=False)
        return model.eval()

    # ---------------------------------------------------------------------------------------- stage 2
    def stage2(self, features: dict[str, Any], stage1: Blip2QFormer) -> Blip2:
        s, key = self.s, self.keys["stage2"]
        run_dir = self.cache / f"stage2-{key}"
        model = build_stage2_model(s, stage1)
        if not is_done(run_dir, key):
            dataset = FeatureCaptionDataset(features["train"], stage2_captions(s, features["train_rows"]), s.seed)
            collate = Stage2Collator(model.tokenizer, model, s.caption_prompt, s.max_text_tokens)
            last = train_stage(model, dataset, collate, s.stage2, run_dir, s.seed + 1, self.log_every)
            torch.save(trainable_weights(model), run_dir / "trainable.pt")
            mark_done(run_dir, key, {"last_metrics": last})
        weights = torch.load(run_dir / "trainable.pt", weights_only=True)
        model.load_state_dict(weights, strict=False)
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
            "vqa_with_caption": results.get("vqa_with_caption"),
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
        "vqa_with_caption_overall": (results.get("vqa_with_caption") or {}).get("overall"),
        "vqa_with_caption_per_type": (results.get("vqa_with_caption") or {}).get("per_type"),
        "vqa_true_caption_overall": (results.get("vqa_true_caption") or {}).get("overall"),
        "vqa_true_caption_per_type": (results.get("vqa_true_caption") or {}).get("per_type"),
    }
