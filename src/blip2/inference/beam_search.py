"""A compact greedy / beam search over any step function with a KV cache (used for Q-Former ITG).

LLM generation goes through the LLM's own ``generate`` (transformers), which is what parity requires;
this search serves the Q-Former's text decoder, which is our own module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

StepFn = Callable[[torch.Tensor, Any, torch.Tensor], tuple[torch.Tensor, Any]]


@torch.no_grad()
def beam_search(
    step: StepFn,
    start: torch.Tensor,  # (B, t0) prompt tokens
    init_past: Any,
    reorder: Callable[[Any, torch.Tensor], Any],
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int = 30,
    min_new_tokens: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """Returns (B, t0 + n) tokens: the best hypothesis per row, padded with ``pad_token_id`` after EOS.

    ``step(new_tokens (N, t), past, rows (N,))`` returns next-token logits (N, V) and the new past; ``rows``
    maps each hypothesis to its input row. ``reorder(past, index (N,))`` selects hypotheses from the past.
    Finished hypotheses stay in the beam and only extend with padding at no cost; the final choice uses
    the sum of log-probabilities divided by length ** length_penalty.
    """
    b, t0 = start.shape
    k = num_beams
    device = start.device
    rows = torch.arange(b, device=device).repeat_interleave(k)  # (N,)
    tokens = start.repeat_interleave(k, dim=0)  # (N, t)
    scores = torch.zeros(b, k, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    finished = torch.zeros(b * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(b * k, device=device)
    logits, past = step(tokens, init_past, rows)
    for i in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        vocab = logprobs.shape[-1]
        if i < min_new_tokens:
            logprobs[:, eos_token_id] = float("-inf")
        logprobs[finished] = float("-inf")
        logprobs[finished, pad_token_id] = 0.0
        candidates = (scores.view(-1, 1) + logprobs).view(b, k * vocab)
        top_scores, top_index = candidates.topk(k, dim=1)  # (B, K)
        source = (top_index // vocab + torch.arange(b, device=device)[:, None] * k).view(-1)  # (N,)
        next_token = (top_index % vocab).view(-1)
        tokens = torch.cat([tokens[source], next_token[:, None]], dim=1)
        was_finished = finished[source]
        lengths = lengths[source] + (~was_finished).float()
        finished = was_finished | (next_token == eos_token_id)
        scores = top_scores
        if bool(finished.all()):
            break
        past = reorder(past, source)
        logits, past = step(next_token[:, None], past, rows)
    normalised = scores.view(-1) / lengths.clamp(min=1) ** length_penalty
    best = normalised.view(b, k).argmax(dim=1) + torch.arange(b, device=device) * k
    return tokens[best]
