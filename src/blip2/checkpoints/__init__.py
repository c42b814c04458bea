"""Checkpoint formats: this project's, transformers' BLIP-2 port, LAVIS, and the BERT the Q-Former starts from.

Weights are only ever read with safetensors or ``torch.load(weights_only=True)``.
"""

from blip2.checkpoints.core import CheckpointError, convert, init_qformer_from_bert, load_any, load_for_inference

__all__ = ["CheckpointError", "convert", "init_qformer_from_bert", "load_any", "load_for_inference"]
