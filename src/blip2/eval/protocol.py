"""Evaluation settings: the authors' protocol (LAVIS, salesforce/LAVIS 506965b) per LLM family, and a fast one.

Zero-shot VQAv2 (``lavis/projects/blip2/eval/vqav2_zeroshot_opt_eval.yaml`` and ``..._flant5xl_eval.yaml``):
prompt "Question: {} Short answer:" for OPT and FlanT5 alike, 5 beams, at most 10 new tokens (``max_len``),
``min_len: 1``; questions cleaned by ``BlipQuestionProcessor`` (`blip2.data.text.clean_question`). The length
penalty is not in the configs but in each model's ``predict_answers`` default: 0 for OPT
(``blip2_opt.py``), -1 for FlanT5 (``blip2_t5.py``). ``min_len`` reaches Hugging Face ``generate`` as
``min_length``, which counts a decoder-only model's new tokens (the prompt is given as embeddings) but an
encoder-decoder's decoder start token as well: at least 1 new token for OPT, no minimum for T5.
Retrieval (``ret_coco_eval.yaml``): the ITC top ``k_test`` = 128 candidates re-ranked by ITM. Captioning
(``caption_coco_*_eval.yaml``): 5 beams, 8 to 30 tokens, the library's default (`blip2.config.CAPTION_DEFAULTS`).

The "fast" protocol keeps the prompts and question cleaning and uses greedy decoding and a re-ranking
shortlist of 16: a quick check, not comparable with the paper's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blip2.config import CAPTION_DEFAULTS, LAVIS_VQA_PROMPT

PROTOCOLS = ("lavis", "fast")
LAVIS_RETRIEVAL_K = 128  # ret_coco_eval.yaml / ret_flickr_eval.yaml `k_test`
FAST_RETRIEVAL_K = 16

# Per `LLMConfig.kind`: decoder (OPT) and encoder_decoder (FlanT5).
_LAVIS_VQA_GENERATION: dict[str, dict[str, Any]] = {
    "decoder": {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0},
    "encoder_decoder": {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 0, "length_penalty": -1.0},
}


@dataclass(frozen=True)
class EvalProtocol:
    """The settings `blip2.eval.runner.run_eval` evaluates with."""

    name: str
    vqa_template: str = LAVIS_VQA_PROMPT
    vqa_generation: dict[str, Any] = field(default_factory=dict)
    clean_questions: bool = True
    caption_generation: dict[str, Any] = field(default_factory=lambda: dict(CAPTION_DEFAULTS))
    retrieval_k: int = LAVIS_RETRIEVAL_K


def lavis_vqa_generation(llm_kind: str) -> dict[str, Any]:
    """The authors' zero-shot VQA generation settings for an LLM family (``LLMConfig.kind``)."""
    if llm_kind not in _LAVIS_VQA_GENERATION:
        raise ValueError(f"unknown LLM kind {llm_kind!r}; expected one of {sorted(_LAVIS_VQA_GENERATION)}")
    return dict(_LAVIS_VQA_GENERATION[llm_kind])


def eval_protocol(llm_kind: str | None, name: str = "lavis") -> EvalProtocol:
    """The ``name`` protocol ("lavis": the authors', "fast": greedy, k=16) for an LLM family; ``llm_kind``
    None (a stage-1 model, retrieval only) uses the decoder settings for the unused VQA part."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    vqa = lavis_vqa_generation(llm_kind or "decoder")
    if name == "lavis":
        return EvalProtocol(name=name, vqa_generation=vqa)
    return EvalProtocol(
        name=name,
        vqa_generation=vqa | {"num_beams": 1},
        caption_generation=dict(CAPTION_DEFAULTS) | {"num_beams": 1},
        retrieval_k=FAST_RETRIEVAL_K,
    )
