"""The run configuration: `TrainConfig` with typed `ModelSection` / `DataSection`, read from a YAML recipe.

One validator (`from_mapping`) builds all three dataclasses: it rejects unknown keys by name and coerces
YAML values to the field types (YAML 1.1 reads ``1e-4`` as a string). Every error a user can make in a recipe
or an override raises `TrainConfigError` (a ValueError) with one line naming the key, the file and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import yaml

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
LrSchedule = Literal["cosine_per_step", "lavis_epoch_cosine"]
WeightDecayRule = Literal["no_decay_norm_bias", "lavis"]
DataKind = Literal["jsonl", "csv", "json", "coco", "webdataset", "scenes"]

T = TypeVar("T")


class TrainConfigError(ValueError):
    """A training recipe, override or run setting the user can fix (one line: what is wrong and the fix)."""


@dataclass
class ModelSection:
    """``model:`` in a recipe: which model `blip2.train.recipes.build_model` builds and how it trains.

    ``temp_clamp`` and ``frozen_llm_train_mode`` are applied to any model the recipe trains, also one the
    caller passes in. LAVIS (the authors' code) clamps nothing and leaves the frozen LLM in train mode.
    """

    stage: int = 1  # 1: Q-Former on a frozen image encoder (ITC+ITM+ITG); 2: + frozen LLM (LM loss)
    preset: str = ""  # a name from blip2.config.PRESETS (the architecture); required
    qformer_init: str = "none"  # stage 1: "minilm" | a BERT directory or hub id | "none" (random)
    # stage 2: the stage-1 model to start from; stage 1: a checkpoint to take the frozen image encoder from
    init_from: str | None = None
    # Load the image encoder's weights from VisionConfig.model_id ("hf" / "timm" encoders). The official
    # EVA ViT-g (kind "blip2") has no loader by id: true is rejected for it rather than silently ignored.
    pretrained_vision: bool = False
    pretrained_llm: bool = True  # stage 2: load the LLM's weights from LLMConfig.model_id
    tokenizer: str | None = None  # path or hub id overriding the tokenizer the model comes with
    # Stage 1: clamp the ITC temperature into [low, high] before every forward (BLIP-1 did; LAVIS's BLIP-2
    # does not); null: never clamp.
    temp_clamp: tuple[float, float] | None = (0.001, 0.5)
    # Stage 2: keep the frozen LLM in train mode (its dropout active) as LAVIS does (runner_base.py calls
    # model.train() and blip2_opt/t5 do not pin the LLM to eval); false: eval mode, no dropout.
    frozen_llm_train_mode: bool = False
    # Stage 1: ITC gathers the other side's features with gradient, so both terms train both towers (true), or
    # without, so the image->text term trains the image side and text->image the text side (false: LAVIS).
    itc_gather_grad: bool = False

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise TrainConfigError(f"model.stage must be 1 or 2, got {self.stage!r}")
        if self.temp_clamp is not None:
            low, high = (float(v) for v in self.temp_clamp)
            if not 0 < low < high:
                raise TrainConfigError(f"model.temp_clamp must be [low, high] with 0 < low < high, got {low}, {high}")
            self.temp_clamp = (low, high)


@dataclass
class DataSection:
    """``data:`` in a recipe: the training data `blip2.train.recipes.build_dataset` reads."""

    kind: DataKind = "jsonl"
    annotations: str | None = None  # jsonl / csv / json / coco: the annotation file
    images: str | None = None  # image root the annotations' paths are relative to
    urls: list[str] = field(default_factory=list)  # webdataset: shard URLs or brace patterns
    n: int = 256  # scenes: how many synthetic images to write
    seed: int = 0  # augmentation, prefix-LM split points, scenes, webdataset shuffling
    augment: bool = False  # random resized crop + flip (the feature cache needs false)
    hflip: bool = True  # with augment: also flip horizontally
    feature_cache: str | None = None  # directory of cached frozen-encoder features (map-style data only)
    max_length: int = 32  # text tokens per caption
    prompt: str = ""  # stage 2, decoder-only LLM: text before the caption (not in the loss)
    # webdataset: samples held in the streaming shuffle buffer (0: no shuffling). Formerly ``shuffle``.
    shuffle_buffer: int = 1000
    # LAVIS's caption cleaning (`blip2.data.text.clean_caption`: lower-case, .!"()*#:;~ to spaces, whitespace
    # collapsed), on in the paper recipes; captions cut to max_words words.
    clean_captions: bool = False
    max_words: int = 50

    def __post_init__(self) -> None:
        if self.max_length < 2 or self.n < 1 or self.shuffle_buffer < 0:
            raise TrainConfigError("data.max_length must be >= 2, data.n >= 1 and data.shuffle_buffer >= 0")


_RENAMED = {DataSection: {"shuffle": "shuffle_buffer"}}  # old key -> new key, still accepted


@dataclass
class TrainConfig:
    """One training run. Defaults are this project's; the paper recipes in ``configs/`` set the authors'.

    ``batch_size`` is per process and per micro-step: the global batch of one optimiser step is
    ``batch_size * world_size * grad_accum_steps``. ``precision`` applies on CUDA only; CPU runs are fp32.
    ``resume``: ``False`` (fresh), ``True`` (the newest valid checkpoint in ``output_dir`` if any, else fresh),
    or a path to a checkpoint file or a directory holding one.
    """

    output_dir: str = "runs/blip2"
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum_steps: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 2000
    # lr of the first warm-up update rises linearly from here (LAVIS: warmup_lr 1e-6).
    warmup_start_lr: float = 0.0
    # cosine_per_step: warm-up, then a half-cosine to min_lr at max_steps, updated every step.
    # lavis_epoch_cosine: LAVIS's linear_warmup_cosine_lr: warm-up within epoch 0 only, then the lr of
    # epoch e is cosine(e / max_epochs), constant through the epoch (needs steps_per_epoch or map-style data).
    lr_schedule: LrSchedule = "cosine_per_step"
    steps_per_epoch: int | None = None  # lavis_epoch_cosine only; null: derived from a map-style dataset
    weight_decay: float = 0.05
    # no_decay_norm_bias: no decay on biases, norms, 0/1-d params (temp), embeddings and query_tokens.
    # lavis: no decay only on 1-d params and names ending ".bias" (blip2.py get_optimizer_params): the
    # 0-d temperature, embeddings and query_tokens are decayed.
    weight_decay_rule: WeightDecayRule = "no_decay_norm_bias"
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0  # max global grad norm; null: no clipping (the norm is still logged)
    # Parameter-name prefix -> lr multiplier (the longest matching prefix wins), e.g. a newly initialised
    # projection trained faster than a pretrained Q-Former: {"language_projection": 10.0}.
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    precision: Precision = "bf16"
    grad_checkpointing: bool = False
    save_every: int = 1000
    keep_last: int = 3  # checkpoints kept on disk; 0 keeps all
    log_every: int = 10
    seed: int = 42
    num_workers: int = 4
    shuffle: bool = True  # map-style data: a new sample order every epoch (from seed and epoch)
    # CPU/CUDA kernels run under torch.use_deterministic_algorithms(True, warn_only=True) for the run, so two
    # runs of one command on one machine give equal weights (the caller's setting is restored afterwards).
    deterministic: bool = True
    resume: bool | str = False
    device: str = "auto"  # "auto": cuda:<local rank> when available, else cpu
    find_unused_parameters: bool = False  # DDP: needed when some trainable params get no gradient
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            self.model = from_mapping(ModelSection, self.model, "model")
        if isinstance(self.data, Mapping):
            self.data = from_mapping(DataSection, self.data, "data")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        for name in ("max_steps", "batch_size", "grad_accum_steps", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise TrainConfigError(f"need 0 <= min_lr <= lr and lr > 0; got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.warmup_start_lr <= self.lr:
            raise TrainConfigError(f"need 0 <= warmup_start_lr <= lr; got {self.warmup_start_lr}")
        if self.warmup_steps < 0 or self.num_workers < 0 or self.keep_last < 0:
            raise TrainConfigError("warmup_steps, num_workers and keep_last must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise TrainConfigError(f"grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise TrainConfigError(f"steps_per_epoch must be >= 1 or null, got {self.steps_per_epoch}")
        if not isinstance(self.lr_multipliers, dict):
            raise TrainConfigError(
                f"lr_multipliers must map parameter-name prefixes to numbers, got {self.lr_multipliers!r}"
            )
        for prefix, mult in self.lr_multipliers.items():
            if not isinstance(mult, int | float) or isinstance(mult, bool) or mult <= 0:
                raise TrainConfigError(f"lr_multipliers[{prefix!r}] must be a positive number, got {mult!r}")
        self.lr_multipliers = {str(k): float(v) for k, v in self.lr_multipliers.items()}

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe values (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------ the validator


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check/convert one YAML value against a field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise TrainConfigError(f"{name} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if hint == bool | str:  # resume
            if isinstance(value, bool | str):
                return value
            raise TrainConfigError(f"{name} must be true/false or a path, got {value!r}")
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise TrainConfigError(f"{name} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(name, v, t) for v, t in zip(value, args, strict=True))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise TrainConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"{name} must be a mapping, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        try:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise TrainConfigError(f"{name} must be a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise TrainConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise TrainConfigError(f"{name} must be a mapping of {hint.__name__} fields, got {value!r}")
        return from_mapping(hint, value, name)
    return value


def from_mapping(kind: type[T], raw: Mapping[str, Any], where: str = "config", source: str = "") -> T:
    """Build dataclass ``kind`` from ``raw``: unknown keys are an error naming them; values are coerced.

    ``where`` prefixes key names in messages (``data.urls``), ``source`` names the file or "overrides".
    """
    hints = typing.get_type_hints(kind)
    raw = dict(raw)
    for old, new in _RENAMED.get(kind, {}).items():  # type: ignore[call-overload]
        if old in raw:
            logger.warning("%s.%s is now called %s.%s; please rename it", where, old, where, new)
            raw[new] = raw.pop(old)  # the old name was given: it wins over a default under the new one
    unknown = sorted(set(raw) - set(hints))
    prefix = "" if where == "config" else f"{where}."
    if unknown:
        also = "" if len(unknown) == 1 else f" (also unknown: {', '.join(unknown[1:])})"
        in_source = f" in {source}" if source else ""
        close = difflib.get_close_matches(unknown[0], list(hints), n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise TrainConfigError(
            f"unknown training option {prefix}{unknown[0]!r}{in_source}{also}; {hint}"
            f"known options: {', '.join(sorted(hints))}"
        )
    values = {k: _coerce(f"{prefix}{k}", v, hints[k]) for k, v in raw.items()}
    try:
        return kind(**values)
    except TrainConfigError as e:
        raise TrainConfigError(f"{e} (in {source})" if source else str(e)) from None


def config_from_dict(raw: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a TrainConfig from a plain mapping (``model`` / ``data`` as nested mappings)."""
    return from_mapping(TrainConfig, raw, "config", source)


_SECTIONS = ("model", "data")


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``key=value`` / ``section.key=value`` strings (values parsed with ``yaml.safe_load``)."""
    values = cfg.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TrainConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise TrainConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
        head, *rest = key.split(".")
        if head in _SECTIONS and len(rest) == 1:
            values[head][rest[0]] = value
        elif rest:
            raise TrainConfigError(
                f"override {item!r}: only model.<key> and data.<key> take a dotted key (one level deep)"
            )
        else:
            values[head] = value  # an unknown head is reported by from_mapping
    return config_from_dict(values, source="overrides")


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML run recipe (TrainConfig fields at the top level, plus ``model:`` / ``data:``)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}; fix the syntax there") from None
    except (FileNotFoundError, IsADirectoryError):
        raise TrainConfigError(f"training recipe {path} does not exist or is not a file") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: expected a mapping of training options at the top level")
    return apply_overrides(config_from_dict(raw, source=str(path)), overrides)
