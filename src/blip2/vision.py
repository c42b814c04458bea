"""Frozen image encoders behind one small interface.

Every encoder is an ``nn.Module`` with ``hidden_size`` and ``forward(pixel_values (B, 3, H, W)) -> (B, P, Dv)``:
patch (and class) features of the chosen layer, *before* the final LayerNorm, which BLIP-2 keeps on the
trainable side as ``ln_vision``. Encoders are never trained: `freeze` puts them in eval mode with
``requires_grad=False``, and the models call them under ``torch.no_grad()``.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import VisionConfig


class Blip2ViT(nn.Module):
    """The ViT of the official checkpoints (EVA ViT-g/14 at full size), or a small one for offline configs.

    Reuses transformers' ``Blip2VisionEmbeddings`` / ``Blip2Encoder`` so that official weights load by name
    (``vision_model.embeddings.*``, ``vision_model.encoder.*``); the final LayerNorm lives in ``ln_vision``.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        from transformers import Blip2VisionConfig
        from transformers.models.blip_2.modeling_blip_2 import Blip2Encoder, Blip2VisionEmbeddings

        hf_config = Blip2VisionConfig(**config.hf_config)
        hf_config._attn_implementation = "sdpa"
        self.hidden_size = hf_config.hidden_size
        self.embeddings = Blip2VisionEmbeddings(hf_config)
        self.encoder = Blip2Encoder(hf_config)
        _init_vit(self, hf_config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        interpolate = pixel_values.shape[-1] != self.embeddings.image_size
        hidden = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate)  # (B, 1 + P, Dv)
        return self.encoder(inputs_embeds=hidden).last_hidden_state


def _init_vit(vit: nn.Module, width: int) -> None:
    """Truncated-normal init (std 0.02) for a randomly initialised ViT; loaded weights overwrite it."""
    for module in vit.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    emb = vit.embeddings
    nn.init.trunc_normal_(emb.class_embedding, std=0.02)
    nn.init.trunc_normal_(emb.position_embedding, std=0.02)


class HFVisionEncoder(nn.Module):
    """Any Hugging Face vision model (CLIP, SigLIP, DINOv2 ...): hidden state ``feature_layer``."""

    def __init__(self, config: VisionConfig, pretrained: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pretrained:
            if not config.model_id:
                raise ValueError("VisionConfig(kind='hf') needs model_id to load pretrained weights")
            model = AutoModel.from_pretrained(config.model_id)
        else:
            cfg = dict(config.hf_config)
            if "model_type" not in cfg:
                raise ValueError("VisionConfig(kind='hf').hf_config needs a 'model_type'")
            model = AutoModel.from_config(AutoConfig.for_model(**cfg))
        if hasattr(model, "vision_model"):  # a dual-encoder (CLIPModel, SiglipModel): keep the image tower
            model = model.vision_model
        self.model = model
        self.feature_layer = config.feature_layer
        self.hidden_size = int(model.config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer]


class TimmVisionEncoder(nn.Module):
    """A timm model (optional extra ``blip2[timm]``): tokens of block ``feature_layer``."""

    def __init__(self, config: VisionConfig, pretrained: bool = False) -> None:
        super().__init__()
        if importlib.util.find_spec("timm") is None:
            raise ImportError("VisionConfig(kind='timm') needs timm: pip install 'blip2[timm]'")
        import timm

        if not config.model_id:
            raise ValueError("VisionConfig(kind='timm') needs model_id (a timm model name)")
        self.model = timm.create_model(config.model_id, pretrained=pretrained, num_classes=0)
        self.feature_layer = config.feature_layer
        self.hidden_size = int(self.model.num_features)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n = len(self.model.blocks)
        index = self.feature_layer % n
        intermediates = self.model.forward_intermediates(
            pixel_values, indices=[index], output_fmt="NLC", intermediates_only=True
        )
        return intermediates[0]


class SmallCNN(nn.Module):
    """A small convolutional image encoder (``VisionConfig(kind="cnn")``, preset `blip2.config.small_cnn`).

    ``depth`` 3x3 conv layers, each BatchNorm + ReLU; of the first ``2 * downsample`` layers every second one has
    stride 2. The last feature map (B, width, h, w) becomes h*w tokens, each with ``position_features`` fixed
    2-D sin/cos features of its grid cell appended: the Q-Former's cross-attention has no position information
    of its own, and a convolutional feature map holds little (a ViT adds learned position embeddings instead).
    ``token_grid`` > 0 average-pools the last feature map to that many rows and columns first (fewer, coarser
    tokens: each summarises a region, as a ViT patch does).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        cfg = config.hf_config
        width, depth, downsample = int(cfg["width"]), int(cfg["depth"]), int(cfg["downsample"])
        self.position_features = int(cfg.get("position_features", 16))
        if self.position_features % 4:
            raise ValueError(f"SmallCNN position_features must be a multiple of 4, got {self.position_features}")
        if depth < 2 * downsample:
            raise ValueError(f"SmallCNN depth {depth} is less than 2 * downsample ({2 * downsample})")
        layers: list[nn.Module] = []
        channels = 3
        for index in range(depth):
            stride = 2 if index % 2 == 1 and index < 2 * downsample else 1
            layers += [nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.layers = nn.Sequential(*layers)
        self.hidden_size = width + self.position_features
        self.token_grid = int(cfg.get("token_grid", 0))
        self.grid = self.token_grid or config.image_size // 2**downsample

    def position_table(self, h: int, w: int) -> torch.Tensor:
        """(h * w, position_features): sin/cos of row and column at geometric frequencies, row-major."""
        quarter = self.position_features // 4
        freqs = torch.pi * 2.0 ** torch.arange(quarter, dtype=torch.float32) / 2  # (F/4,)
        rows = (torch.arange(h, dtype=torch.float32) + 0.5) / h  # (h,)
        cols = (torch.arange(w, dtype=torch.float32) + 0.5) / w  # (w,)
        r = rows[:, None, None] * freqs  # (h, 1, F/4)
        c = cols[None, :, None] * freqs  # (1, w, F/4)
        table = torch.cat(
            [r.sin().expand(h, w, -1), r.cos().expand(h, w, -1), c.sin().expand(h, w, -1), c.cos().expand(h, w, -1)],
            dim=-1,
        )  # (h, w, F)
        return table.reshape(h * w, self.position_features)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.layers(pixel_values)  # (B, width, h, w)
        if self.token_grid:
            feats = F.adaptive_avg_pool2d(feats, self.token_grid)  # (B, width, g, g)
        b, _, h, w = feats.shape
        tokens = feats.flatten(2).transpose(1, 2)  # (B, h*w, width)
        position = self.position_table(h, w).to(tokens)  # (h*w, F)
        return torch.cat([tokens, position.expand(b, -1, -1)], dim=-1)  # (B, h*w, width + F)


def build_vision_encoder(config: VisionConfig, pretrained: bool = False) -> nn.Module:
    """The frozen image encoder described by ``config`` (random weights unless ``pretrained``)."""
    if config.kind == "blip2":
        encoder: nn.Module = Blip2ViT(config)
    elif config.kind == "hf":
        encoder = HFVisionEncoder(config, pretrained=pretrained)
    elif config.kind == "timm":
        encoder = TimmVisionEncoder(config, pretrained=pretrained)
    elif config.kind == "cnn":
        encoder = SmallCNN(config)
    else:
        raise ValueError(f"unknown vision encoder kind {config.kind!r}; expected 'blip2', 'hf', 'timm' or 'cnn'")
    if encoder.hidden_size != config.hidden_size:
        raise ValueError(
            f"vision encoder width is {encoder.hidden_size} but VisionConfig.hidden_size says {config.hidden_size}"
        )
    return freeze(encoder)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module
