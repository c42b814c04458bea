"""Checkpoint formats, one module each: this project's (`ours`), transformers' BLIP-2 port (`hf`), LAVIS
(`lavis`: one key table read both ways) and the BERT the Q-Former starts from (`bert`); `loading` loads any
of them and converts between them, on `state` (safe reading, checked copying, atomic writing).

Weights are only ever read with safetensors or ``torch.load(weights_only=True)``.
"""

from blip2.checkpoints.bert import init_qformer_from_bert
from blip2.checkpoints.loading import convert, load_any, load_for_inference
from blip2.checkpoints.state import CheckpointError

__all__ = ["CheckpointError", "convert", "init_qformer_from_bert", "load_any", "load_for_inference"]
