"""The pieces of the offline demo's pipeline: frozen image features, feature datasets, collators, the two
pretraining stages (through `blip2.train.loop.run_training`), and building/loading the demo models.

Everything here trains from *cached frozen features* (B, P, Dv): the image encoder is frozen and the demo
uses no augmentation (positional captions forbid flips; random crops could cut objects out), so each image's
features are computed once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from blip2.config import Blip2Config
from blip2.data.images import load_image
from blip2.data.transforms import ImageProcessor
from blip2.model import Blip2, Blip2QFormer
from blip2.train.loop import TrainConfig, run_training

if TYPE_CHECKING:
    from blip2.demo.settings import DemoSettings, StageSettings

DONE_FILE = "done.json"


# ------------------------------------------------------------------------------------------ scene files


def read_scene_split(directory: Path) -> list[dict[str, Any]]:
    """Rows of ``captions.jsonl``: {"image": absolute path, "captions": [...], "objects": [...]}."""
    rows = []
    with open(directory / "captions.jsonl", encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            row["image"] = str(directory / row["image"])
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ features


@torch.no_grad()
def extract_image_features(
    vision_model: torch.nn.Module, processor: ImageProcessor, paths: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """Frozen encoder features of every image, before ln_vision. → (N, P, Dv) float32."""
    vision_model.eval()
    out = []
    for start in tqdm(range(0, len(paths), batch_size), desc="image features", leave=False):
        pixels = processor([load_image(p) for p in paths[start : start + batch_size]])  # (b, 3, H, W)
        out.append(vision_model(pixels))  # (b, P, Dv)
    return torch.cat(out)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ------------------------------------------------------------------------------------------ datasets


class FeatureCaptionDataset(Dataset):
    """One item per image: its cached features and one of its captions, picked per (seed, epoch, index),
    so an interrupted run resumes to the same batches."""

    def __init__(self, features: torch.Tensor, captions: Sequence[Sequence[str]], seed: int = 0) -> None:
        if features.shape[0] != len(captions):
            raise ValueError(f"{features.shape[0]} feature rows for {len(captions)} caption lists")
        self.features = features  # (N, P, Dv)
        self.captions = [list(c) for c in captions]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        options = self.captions[index]
        pick = random.Random(f"{self.seed}/{self.epoch}/{index}").randrange(len(options))
        return {"image_features": self.features[index], "text": options[pick]}


class Stage1Collator:
    """Features + BERT-tokenised captions ([CLS] ... [SEP]) for `Blip2QFormer.forward`."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [it["text"] for it in items],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "image_features": torch.stack([it["image_features"] for it in items]),  # (B, P, Dv)
            "input_ids": enc["input_ids"],  # (B, T)
            "attention_mask": enc["attention_mask"],  # (B, T)
        }


class Stage2Collator:
    """Features + LLM token ids ``[bos] prompt caption [eos]`` (right-padded), labels on caption + eos only.

    The image's visual prompt goes where `blip2.inference.tasks.with_placeholders` puts it at inference (prepended
    by the model, or at placeholder ids after BOS), so the LLM sees in training exactly what it sees when it
    captions or answers.
    """

    def __init__(self, tokenizer: Any, model: Blip2, prompt: str, max_length: int) -> None:
        from blip2.inference.tasks import with_placeholders

        self.tokenizer = tokenizer
        bos_token_id = getattr(model.language_model.config, "bos_token_id", None)
        self.bos = with_placeholders(model, [bos_token_id] if bos_token_id is not None else [])
        self.prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        self.space = " " if prompt else ""
        self.max_length = max_length
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, caption: str) -> tuple[list[int], int]:
        """(token ids, number of leading non-target tokens)."""
        target = self.tokenizer(self.space + caption, add_special_tokens=False)["input_ids"] + [self.eos]
        head = self.bos + self.prompt_ids
        return (head + target)[: self.max_length], len(head)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(it["text"]) for it in items]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(items), width), self.pad, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)  # (B, L)
        labels = torch.full((len(items), width), -100, dtype=torch.long)  # (B, L)
        for row, (ids, n_head) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, n_head : len(ids)] = torch.tensor(ids[n_head:])
        return {
            "image_features": torch.stack([it["image_features"] for it in items]),  # (B, P, Dv)
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }


# ------------------------------------------------------------------------------------------ models


def load_llm_tokenizer(settings: DemoSettings, config: Blip2Config) -> Any:
    if settings.tiny:
        from blip2.testing import tiny_llm_tokenizer

        return tiny_llm_tokenizer()
    from transformers import AutoTokenizer

    assert config.llm is not None and config.llm.model_id
    return AutoTokenizer.from_pretrained(config.llm.model_id)


def build_stage1_model(settings: DemoSettings, vit_state: dict[str, torch.Tensor]) -> Blip2QFormer:
    """The stage-1 model: the demo's frozen ViT (given weights), a Q-Former from MiniLM (or tiny, random)."""
    from blip2.checkpoints import init_qformer_from_bert
    from blip2.demo.settings import demo_config

    config = demo_config(settings, with_llm=False)
    torch.manual_seed(settings.seed)
    model = Blip2QFormer(config)
    model.vision_model.load_state_dict(vit_state)
    if settings.tiny:
        from blip2.testing import tiny_bert_tokenizer

        model.tokenizer = tiny_bert_tokenizer()
    else:
        from blip2.checkpoints.offline import bert_state_dict, load_bert_tokenizer

        init_qformer_from_bert(model.qformer, bert_state_dict())
        model.tokenizer = load_bert_tokenizer()
    return model


def build_stage2_model(settings: DemoSettings, stage1: Blip2QFormer) -> Blip2:
    """The stage-2 model: the stage-1 image side (ViT, ln_vision, queries, Q-Former) and the frozen LLM."""
    from blip2.demo.settings import demo_config

    config = demo_config(settings, with_llm=True)
    torch.manual_seed(settings.seed + 1)
    model = Blip2(config, pretrained_llm=not settings.tiny)
    own = model.state_dict()
    image_side = {k: v for k, v in stage1.state_dict().items() if k in own}
    missing = [k for k in own if not k.startswith(("language_model.", "language_projection.")) and k not in image_side]
    if missing:
        raise RuntimeError(f"the stage-1 model lacks image-side weights the stage-2 model needs: {missing[:5]}")
    model.load_state_dict(image_side, strict=False)
    if not settings.stage2_train_qformer:
        for name, param in model.named_parameters():
            if not name.startswith("language_projection."):
                param.requires_grad_(False)
    model.tokenizer = load_llm_tokenizer(settings, config)
    return model


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ training


def train_stage(
    model: torch.nn.Module,
    dataset: Dataset,
    collate_fn: Any,
    stage: StageSettings,
    run_dir: Path,
    seed: int,
    log_every: int,
) -> dict[str, float]:
    """Train with `run_training` in ``run_dir`` (resuming a killed run from its last checkpoint)."""
    cfg = TrainConfig(
        output_dir=str(run_dir),
        max_steps=stage.steps,
        batch_size=stage.batch_size,
        lr=stage.lr,
        min_lr=stage.lr * stage.min_lr_ratio,
        warmup_steps=stage.warmup_steps,
        weight_decay=stage.weight_decay,
        lr_multipliers=dict(stage.lr_multipliers),
        precision="fp32",
        save_every=max(stage.steps // 4, 1),
        keep_last=1,
        log_every=log_every,
        seed=seed,
        num_workers=0,
        resume=True,
        device="cpu",
    )
    return run_training(cfg, model, dataset, collate_fn)


def is_done(run_dir: Path, config_hash: str) -> bool:
    try:
        return json.loads((run_dir / DONE_FILE).read_text())["config_hash"] == config_hash
    except (OSError, ValueError, KeyError):
        return False


def mark_done(run_dir: Path, config_hash: str, extra: dict[str, Any]) -> None:
    tmp = run_dir / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps({"config_hash": config_hash, **extra}, indent=2))
    tmp.replace(run_dir / DONE_FILE)
