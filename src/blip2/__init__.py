"""blip2: BLIP-2 (Li et al., 2023) — model, two-stage pretraining, inference and tooling."""

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig, from_name
from blip2.model import Blip2, Blip2QFormer

__all__ = ["Blip2", "Blip2Config", "Blip2QFormer", "LLMConfig", "QFormerConfig", "VisionConfig", "from_name"]
__version__ = "0.1.0"
