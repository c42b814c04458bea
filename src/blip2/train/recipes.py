"""From a YAML run recipe to a trained model: builds the model, the data and the batches for stage 1 / 2.

``blip2 train --config configs/<recipe>.yaml key=value ...`` calls `train_from_config`. A recipe is a
`blip2.train.config.TrainConfig`; its typed ``model:`` (`ModelSection`) and ``data:`` (`DataSection`)
sections, documented field by field there, are read here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip2.config import Blip2Config, from_name
from blip2.data.collate import DecoderCollate, PrefixLMCollate, Stage1Collate
from blip2.data.transforms import ImageProcessor, TrainTransform
from blip2.distributed import pick_device
from blip2.llm import stop_token_id
from blip2.model import Blip2, Blip2QFormer
from blip2.train.config import DataSection, ModelSection, TrainConfig, TrainConfigError, from_mapping, load_config
from blip2.train.loop import check_device, run_training
from blip2.train.state import prepare_output_dir

# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def build_model(section: ModelSection | Mapping[str, Any], seed: int = 0) -> Blip2 | Blip2QFormer:
    """The recipe's model, its randomly initialised weights drawn from ``seed``.

    Seeded because torch seeds its default generator differently in every process: unseeded, each rank of a
    torchrun job (and each rerun) would build a different random frozen encoder, and the feature cache rank 0
    writes would not be the one the other ranks' encoders produce.
    """
    if not isinstance(section, ModelSection):
        section = from_mapping(ModelSection, section, "model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(section)
    configure_for_training(model, section)
    return model


def configure_for_training(model: nn.Module, section: ModelSection) -> None:
    """Apply the section's training switches (temperature clamp, ITC gradient, frozen-LLM mode) to a model."""
    if isinstance(model, Blip2QFormer):
        model.temp_clamp = section.temp_clamp
        model.itc_gather_grad = section.itc_gather_grad
    if isinstance(model, Blip2):
        model.frozen_llm_train_mode = section.frozen_llm_train_mode


def _build_model(section: ModelSection) -> Blip2 | Blip2QFormer:
    if not section.preset:
        raise TrainConfigError("the recipe's model section needs a 'preset' (see blip2.config.PRESETS)")
    from blip2.checkpoints.offline import resolve_offline

    config: Blip2Config = from_name(section.preset)
    if section.stage == 1:
        config.llm = None  # stage 1 has no LLM: nothing of it to fetch
    config = resolve_offline(config, llm=section.pretrained_llm)  # pip-installed weights -> local paths
    if section.pretrained_vision and config.vision.kind == "blip2":
        raise TrainConfigError(
            f"model.pretrained_vision=true, but preset {section.preset!r} uses the official EVA ViT-g (vision kind "
            "'blip2'), which cannot be loaded by id: set pretrained_vision: false and model.init_from to a checkpoint "
            "holding it (e.g. a transformers BLIP-2 directory, or one written by blip2 convert)"
        )
    if section.stage == 1:
        config.llm = None
        config.qformer.use_text = True
        model: Blip2 | Blip2QFormer = Blip2QFormer(config, pretrained_vision=section.pretrained_vision)
        init = section.qformer_init
        if init and init != "none":
            from blip2.checkpoints import init_qformer_from_bert
            from blip2.checkpoints.offline import bert_state_dict, load_bert_tokenizer, minilm_path

            path = minilm_path() if init == "minilm" else _local_bert(init)
            init_qformer_from_bert(model.qformer, bert_state_dict(path))
            model.tokenizer = load_bert_tokenizer(path)
        if section.init_from:
            load_vision_encoder_from(model, section.init_from)
    else:
        if config.llm is None:
            raise TrainConfigError(f"preset {section.preset!r} has no LLM; stage 2 needs one")
        config.qformer.use_text = False  # stage 2 uses the query side only
        model = Blip2(config, pretrained_vision=section.pretrained_vision, pretrained_llm=section.pretrained_llm)
        if section.init_from:
            load_stage1_into(model, section.init_from)
        if config.llm.model_id and section.pretrained_llm:
            from transformers import AutoTokenizer

            model.tokenizer = AutoTokenizer.from_pretrained(config.llm.model_id)
    if section.tokenizer:
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(section.tokenizer)
    return model


def load_vision_encoder_from(model: Blip2 | Blip2QFormer, source: str | os.PathLike[str]) -> None:
    """Stage 1: copy the frozen image encoder's weights from any checkpoint this project loads (ours, a
    transformers BLIP-2 directory or hub id). Only ``vision_model.*``: ln_vision, the queries and the
    Q-Former start fresh in stage 1, as in LAVIS. (The whole source model is loaded once to read them.)"""
    from blip2.checkpoints import load_any

    theirs = load_any(source).vision_model.state_dict()
    own = model.vision_model.state_dict()
    mismatch = sorted(k for k in own if k not in theirs or theirs[k].shape != own[k].shape)
    if mismatch:
        raise TrainConfigError(
            f"model.init_from={source}: its image encoder does not fit this preset's ({mismatch[:3]})"
        )
    model.vision_model.load_state_dict(theirs)


def _local_bert(name_or_path: str) -> Path:
    """A BERT directory for ``model.qformer_init``: a local folder as it is, a hub id (``bert-base-uncased``)
    downloaded (weights, config and tokenizer)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, no safetensors: one line either way
        raise TrainConfigError(
            f"model.qformer_init {name_or_path!r} is not a local folder and could not be downloaded ({exc}); "
            "give a BERT directory holding config.json, model.safetensors and the tokenizer"
        ) from exc


def load_stage1_into(model: Blip2, stage1: str | os.PathLike[str] | Blip2QFormer) -> None:
    """Start stage 2 from a stage-1 model: image encoder, ln_vision, queries and the Q-Former's query side."""
    source = stage1 if isinstance(stage1, Blip2QFormer) else Blip2QFormer.from_pretrained(stage1)
    own = model.state_dict()
    shared = {
        k: v
        for k, v in source.state_dict().items()
        if k in own and k.startswith(("vision_model.", "ln_vision.", "query_tokens", "qformer."))
    }
    mismatch = [k for k, v in shared.items() if own[k].shape != v.shape]
    if mismatch:
        raise ValueError(f"stage-1 checkpoint does not fit this stage-2 model: {mismatch[:5]}")
    image_side = [k for k in own if not k.startswith(("language_model.", "language_projection."))]
    missing = [k for k in image_side if k not in shared]
    if missing:
        raise ValueError(f"the stage-1 model lacks image-side weights this stage-2 model needs: {missing[:5]}")
    with torch.no_grad():
        for k, v in shared.items():
            own[k].copy_(v)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def _run_id() -> str:
    """An id shared by the processes of one launch: a marker left by an earlier run never counts as ready."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or (
        f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
    )


def _rank0_first(
    marker: Path, build: Callable[[], Any], load: Callable[[], Any] | None = None, timeout_s: float = 3600.0
) -> Any:
    """Under torchrun, rank 0 builds shared files (data, feature cache) while the others wait for its marker,
    then everyone reads them: no two processes write the same file, and no process reads a half-written one.
    The process group does not exist yet here (the training loop creates it), so the ranks coordinate through
    the file system; the marker holds the launch's run id, so a marker left by an earlier run is not taken
    for this one's."""
    import time

    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return build()
    run_id = _run_id()
    if rank == 0:
        marker.unlink(missing_ok=True)
        result = build()
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(run_id)
        os.replace(tmp, marker)
        return result
    deadline = time.monotonic() + timeout_s
    while not (marker.exists() and marker.read_text() == run_id):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank} waited {timeout_s:.0f}s for rank 0 to write {marker}")
        time.sleep(0.2)
    return (load or build)()


def build_dataset(
    section: DataSection | Mapping[str, Any],
    model: Blip2 | Blip2QFormer,
    work_dir: Path,
    device: torch.device | None = None,
) -> tuple[Any, dict[str, torch.Generator]]:
    """The training dataset and the generators the loop must checkpoint (for exact resume; none today: the
    datasets derive their randomness from (seed, epoch, index))."""
    from blip2.data.datasets import CocoCaptionsDataset, ImageTextDataset
    from blip2.data.webdataset import WebDatasetShards

    if not isinstance(section, DataSection):
        section = from_mapping(DataSection, section, "data")
    vcfg = model.config.vision
    seed = section.seed
    transform: Any = (
        TrainTransform.from_vision_config(vcfg, hflip=section.hflip)
        if section.augment
        else ImageProcessor.from_vision_config(vcfg)
    )
    if section.kind in ("jsonl", "csv", "json", "coco") and not section.annotations:
        raise TrainConfigError(f"data.kind={section.kind} needs data.annotations (the annotation file)")
    if section.kind == "scenes":
        from blip2.data.scene_files import write_split

        root = _rank0_first(
            work_dir / "data" / ".train.ready",
            lambda: write_split(work_dir / "data", "train", section.n, seed=seed, image_size=vcfg.image_size),
            load=lambda: work_dir / "data" / "train",
        )
        dataset: Any = ImageTextDataset(root / "captions.jsonl", image_root=root, transform=transform, seed=seed)
    elif section.kind == "coco":
        dataset = CocoCaptionsDataset(section.annotations, image_root=section.images, transform=transform, seed=seed)
    elif section.kind == "webdataset":
        if not section.urls:
            raise TrainConfigError("data.kind=webdataset needs data.urls (a list of shard URLs or patterns)")
        if section.feature_cache:
            raise TrainConfigError("data.feature_cache needs a map-style dataset; webdataset shards stream")
        shards = WebDatasetShards(section.urls, transform=transform, shuffle_buffer=section.shuffle_buffer, seed=seed)
        return _cleaned(shards, section), {}
    else:  # jsonl, csv, json
        dataset = ImageTextDataset(section.annotations, image_root=section.images, transform=transform, seed=seed)
    if section.feature_cache:
        if section.augment:
            raise TrainConfigError("data.feature_cache needs data.augment=false: cached features cannot be augmented")
        dataset = cached(dataset, model, Path(section.feature_cache), device=device)
    return _cleaned(dataset, section), {}


def _cleaned(dataset: Any, section: DataSection) -> Any:
    """The dataset with LAVIS's caption cleaning applied when the recipe asks for it (``clean_captions``)."""
    if not section.clean_captions:
        return dataset
    from blip2.data.text import clean_captions

    return clean_captions(dataset, max_words=section.max_words)


def cached(dataset: Any, model: Blip2 | Blip2QFormer, directory: Path, device: torch.device | None = None) -> Any:
    """``dataset`` with its images replaced by the frozen encoder's features, encoded once on ``device``
    (default: where the model is) by rank 0 and read by the others."""
    from blip2.data.feature_cache import CachedFeatureDataset, build_feature_cache, image_paths_of

    processor = ImageProcessor.from_vision_config(model.config.vision)
    paths = image_paths_of(dataset)

    def build(reuse_only: bool = False) -> torch.Tensor:
        return build_feature_cache(
            model.vision_model, paths, processor, directory, device=device or model.device, reuse_only=reuse_only
        )

    # rank 0 encodes; the other ranks read its cache (and refuse one that does not match their encoder)
    features = _rank0_first(directory / ".ready", build, load=lambda: build(reuse_only=True))
    import json

    bad = json.loads((directory / "meta.json").read_text()).get("bad_images", [])
    return CachedFeatureDataset(dataset, features, bad)


def decoder_head_ids(model: Blip2) -> list[int]:
    """The ids every stage-2 row of a decoder-only LLM starts with: its BOS, with the image placeholders where
    inference puts them (`blip2.inference.tasks.with_placeholders`: in front, or after BOS with
    ``LLMConfig.visual_prompt_after_bos``; none when the visual prompt is prepended as embeddings)."""
    from blip2.inference.tasks import with_placeholders

    bos = getattr(model.language_model.config, "bos_token_id", None)
    return with_placeholders(model, [bos] if bos is not None else [])


def collate_for_model(
    model: Blip2 | Blip2QFormer, max_length: int = 32, prompt: str = "", seed: int = 0
) -> Callable[[list[Any]], dict]:
    """The batches ``model`` trains on: `Stage1Collate` for a stage-1 model; for stage 2, `DecoderCollate`
    (decoder-only LLM, ``prompt`` before each caption) or `PrefixLMCollate` (encoder-decoder, split drawn
    from ``seed``)."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: set model.tokenizer (or model.qformer_init / llm.model_id)")
    if isinstance(model, Blip2QFormer):
        return Stage1Collate(model.tokenizer, max_length)
    if model.is_encoder_decoder:
        return PrefixLMCollate(model.tokenizer, max_length, seed=seed)
    assert model.config.llm is not None  # a stage-2 model
    stop = stop_token_id(model.config.llm)  # the token generation stops on ends every target
    return DecoderCollate(model.tokenizer, max_length, prompt=prompt, head_ids=decoder_head_ids(model), stop_id=stop)


def build_collate(section: Mapping[str, Any], model: Blip2 | Blip2QFormer) -> Callable[[list[Any]], dict]:
    """`collate_for_model` with the recipe's ``data`` section (``max_length``, ``prompt``, ``seed``)."""
    return collate_for_model(
        model,
        int(section.get("max_length", 32)),
        prompt=str(section.get("prompt", "")),
        seed=int(section.get("seed", 0)),
    )


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def train_from_config(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), model: nn.Module | None = None
) -> dict[str, Any]:
    """Load a recipe, build everything, train, and save the final model to ``output_dir/model``."""
    return train(load_config(path, overrides), model)


def train(cfg: TrainConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """Build the recipe's model (unless given), data and batches, and train.

    The device and ``output_dir`` are checked first, so that a bad one fails in a second, not after the
    models are built. The recipe's training switches (``model.temp_clamp``, ``model.frozen_llm_train_mode``)
    also apply to a ``model`` passed in.
    """
    if isinstance(cfg.model, Mapping):  # sections assigned as plain mappings after construction
        cfg.model = from_mapping(ModelSection, cfg.model, "model")
    if isinstance(cfg.data, Mapping):
        cfg.data = from_mapping(DataSection, cfg.data, "data")
    check_device(cfg.device)
    prepare_output_dir(cfg.output_dir, cfg.resume)
    if model is None:
        model = build_model(cfg.model, seed=cfg.seed)
    else:
        configure_for_training(model, cfg.model)
    out = Path(cfg.output_dir)
    # the frozen-feature cache is encoded on the run's device (the loop moves the model there only later)
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dataset, generators = build_dataset(cfg.data, model, out, device=device)
    collate = build_collate(dataclasses.asdict(cfg.data), model)
    metrics = run_training(cfg, model, dataset, collate, rng_generators=generators)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        model.save_pretrained(out / "model")
    return dict(metrics)
