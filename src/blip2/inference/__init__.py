"""Inference: the task API (caption, answer, retrieve, extract_features), beam search, prefix-cached generation
and CPU weight pre-packing. Functions here take a loaded model; they never import the model classes."""

from blip2.inference.fast import optimize_for_cpu_inference
from blip2.inference.tasks import answer, caption, extract_features, retrieve

__all__ = ["answer", "caption", "extract_features", "optimize_for_cpu_inference", "retrieve"]
