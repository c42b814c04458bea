"""blip2: BLIP-2 (Li et al., 2023) — model, two-stage pretraining, inference and tooling."""

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig, from_name

__all__ = ["Blip2Config", "LLMConfig", "QFormerConfig", "VisionConfig", "from_name"]
__version__ = "0.1.0"
