"""Inference helpers over PIL images or file paths: caption, answer, retrieve, extract_features.

They batch internally, tokenise, call the tensor-level models, and decode. Generation defaults follow the
official BLIP-2 evaluation: captions with 5 beams, 8–30 new tokens; VQA with 5 beams, at most 10 new
tokens and a negative length penalty (short answers).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from blip2.config import CAPTION_DEFAULTS, VQA_DEFAULTS, VQA_PROMPT, check_question_template
from blip2.data.images import load_image
from blip2.data.transforms import ImageProcessor


def _generation_kwargs(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    kwargs = {**defaults, **given}
    if "min_new_tokens" in kwargs and "max_new_tokens" in kwargs:  # a short max lowers the default min
        kwargs["min_new_tokens"] = min(kwargs["min_new_tokens"], kwargs["max_new_tokens"])
    return kwargs


def _as_list(items: Any) -> list[Any]:
    return list(items) if isinstance(items, list | tuple) else [items]


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def processor_for(model: Any) -> ImageProcessor:
    if getattr(model, "image_processor", None) is None:
        model.image_processor = ImageProcessor.from_vision_config(model.config.vision)
    return model.image_processor


def pixel_values(model: Any, images: Sequence[Any]) -> torch.Tensor:
    """Load (paths, bytes or PIL images) and preprocess. → (B, 3, H, W) on the model's device."""
    loaded = [load_image(image) for image in images]
    return processor_for(model)(loaded).to(model.device)


def _tokenizer(model: Any) -> Any:
    if model.tokenizer is None:
        raise ValueError(
            "this model has no tokenizer: load it with from_pretrained from a directory that holds one, "
            "or set model.tokenizer"
        )
    return model.tokenizer


def llm_prompt_ids(model: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise LLM prompts, left-padded; with image placeholders in front when the config uses them.

    → (input_ids (B, L), attention_mask (B, L))
    """
    tok = _tokenizer(model)
    # T5's tokenizer adds no BOS and appends EOS, as the official processor does; OPT's adds BOS in front.
    rows = [with_placeholders(model, tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids.to(model.device), mask.to(model.device)


def with_placeholders(model: Any, ids: list[int]) -> list[int]:
    """A tokenised prompt with the Q image placeholders inserted (when the config uses placeholders): in
    front, or right after a leading BOS with ``LLMConfig.visual_prompt_after_bos``."""
    llm = model.config.llm
    if llm.image_token_index is None:
        return list(ids)
    placeholders = [llm.image_token_index] * model.config.num_query_tokens
    bos = getattr(model.language_model.config, "bos_token_id", None)
    if llm.visual_prompt_after_bos and bos is not None and ids[:1] == [bos]:
        return [bos, *placeholders, *ids[1:]]
    return [*placeholders, *ids]


def _decode(model: Any, generated: torch.Tensor, prompt_len: int) -> list[str]:
    tok = _tokenizer(model)
    new = generated if model.is_encoder_decoder else generated[:, prompt_len:]
    return [text.strip() for text in tok.batch_decode(new, skip_special_tokens=True)]


@torch.no_grad()
def caption(
    model: Any, images: Any, prompt: str | None = None, batch_size: int = 8, **generation_kwargs: Any
) -> list[str]:
    """One caption per image (optionally continuing ``prompt``, e.g. "a photo of")."""
    images = _as_list(images)
    out: list[str] = []
    for part in _chunks(len(images), batch_size):
        out.extend(caption_pixels(model, pixel_values(model, images[part]), prompt, **generation_kwargs))
    return out


@torch.no_grad()
def caption_pixels(model: Any, pixels: torch.Tensor, prompt: str | None = None, **generation_kwargs: Any) -> list[str]:
    """Captions of preprocessed images ``pixels`` (B, 3, H, W): B * num_return_sequences strings, the
    sequences of one image next to each other (as transformers returns them)."""
    kwargs = _generation_kwargs(CAPTION_DEFAULTS, generation_kwargs)
    if prompt:
        ids, mask = llm_prompt_ids(model, [prompt] * pixels.shape[0])
        generated = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs)
        return _decode(model, generated, ids.shape[1])
    generated = model.generate(pixel_values=pixels, **kwargs)
    return _decode(model, generated, 0 if model.is_encoder_decoder else _default_prompt_len(model))


def _default_prompt_len(model: Any) -> int:
    llm = model.config.llm
    n = model.config.num_query_tokens if llm.image_token_index is not None else 0
    return n + (1 if getattr(model.language_model.config, "bos_token_id", None) is not None else 0)


@torch.no_grad()
def answer(
    model: Any,
    images: Any,
    questions: Any,
    prompt_template: str = VQA_PROMPT,
    batch_size: int = 8,
    shared_prefix: bool = True,
    **generation_kwargs: Any,
) -> list[str]:
    """Zero-shot VQA: one answer per question. One image with several questions is encoded once.

    The default prompt is the short ``VQA_PROMPT`` ("Question: {} Answer:", transformers' documentation).
    The authors' zero-shot VQAv2 evaluation uses ``LAVIS_VQA_PROMPT`` ("Question: {} Short answer:") on
    lower-cased questions without ``.!"()*#:;~``, 5 beams, at most 10 new tokens, length penalty 0 for OPT
    and -1 for FlanT5; ``blip2 eval`` (`blip2.eval.protocol`) uses those settings.

    With ``shared_prefix`` (decoder-only LLMs whose positions follow the attention mask, e.g. OPT), the
    LLM also runs the part of the prompt the questions share (the image's visual prompt and the template's
    leading text) once per image, and each question's prompt once rather than once per beam
    (`blip2.inference.fast.shared_prefix_generate`; the same answers as asking one by one).
    """
    check_question_template(prompt_template)  # before any image is encoded
    questions = _as_list(questions)
    images = _as_list(images)
    for q in questions:
        if not isinstance(q, str) or not q.strip():
            raise ValueError("a question is empty; every question needs some text")
    if len(images) == 1 and len(questions) > 1:
        images = images * len(questions)
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images and {len(questions)} questions; give one image per question")
    kwargs = _generation_kwargs(VQA_DEFAULTS, generation_kwargs)
    # encode each distinct image once (the same object or path asked several questions)
    keys = [id(im) if not isinstance(im, str | bytes) else im for im in images]
    unique: dict[Any, int] = {}
    for key in keys:
        unique.setdefault(key, len(unique))
    distinct = [None] * len(unique)
    for key, im in zip(keys, images, strict=True):
        distinct[unique[key]] = im
    prompts_all = []
    for part in _chunks(len(distinct), batch_size):
        prompts_all.append(model.visual_prompt(pixel_values(model, distinct[part])))
    visual = torch.cat(prompts_all)  # (N_unique, Q, H)
    out: list[str] = []
    for part in _chunks(len(questions), batch_size):
        rows = torch.tensor([unique[k] for k in keys[part]], device=visual.device)
        prompts = [prompt_template.format(q.strip()) for q in questions[part]]
        if shared_prefix and (answers := _answer_shared_prefix(model, visual, rows, prompts, kwargs)) is not None:
            out.extend(answers)
            continue
        ids, mask = llm_prompt_ids(model, prompts)
        generated = model.generate(input_ids=ids, attention_mask=mask, visual_prompt=visual[rows], **kwargs)
        out.extend(_decode(model, generated, ids.shape[1]))
    return out


def _answer_shared_prefix(
    model: Any, visual: torch.Tensor, rows: torch.Tensor, prompts: list[str], kwargs: dict[str, Any]
) -> list[str] | None:
    """Answers through `shared_prefix_generate`, or None when that path does not apply to this model."""
    from blip2.inference.fast import (
        common_prefix_length,
        expansion_factor,
        positions_follow_mask,
        shared_prefix_generate,
    )

    lm = model.language_model
    if model.is_encoder_decoder or not positions_follow_mask(lm):
        return None
    expand = expansion_factor(lm, kwargs)
    if expand is None:
        return None
    tok = _tokenizer(model)
    texts = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if any(len(t) == 0 for t in texts):
        return None
    n = common_prefix_length(texts)
    images, local = torch.unique(rows, return_inverse=True)  # the distinct images of this batch
    common = torch.tensor([with_placeholders(model, texts[0][:n])], dtype=torch.long, device=visual.device)
    common = common.repeat(images.shape[0], 1)
    prefix_embeds, _, offset = model._llm_inputs(visual[images], common, None)  # (N, P, H)
    prefix_ids = [0] * offset + common[0].tolist()  # stand-ins at prepended positions (never embedded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else lm.config.pad_token_id
    new = shared_prefix_generate(
        lm, prefix_embeds, prefix_ids, local, [t[n:] for t in texts], pad_token_id=pad or 0, expand=expand, **kwargs
    )
    return [text.strip() for text in tok.batch_decode(new, skip_special_tokens=True)]


def qformer_text_ids(model: Any, texts: Sequence[str], max_length: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
    tok = _tokenizer(model)
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError("a text is empty; retrieval needs non-empty texts")
    enc = tok(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)


@torch.no_grad()
def extract_features(
    model: Any, images: Any = None, texts: Any = None, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """Normalised ITC features: ``image_embeds`` (N, Q, E), ``text_embeds`` (M, E); with both (N == M),
    ``multimodal_embeds`` (N, Q, D), the query outputs of the joint image-text pass."""
    out: dict[str, torch.Tensor] = {}
    image_embeds = None
    if images is not None:
        images = _as_list(images)
        feats, embeds = [], []
        for part in _chunks(len(images), batch_size):
            e = model.encode_image(pixel_values(model, images[part]))
            embeds.append(e)
            feats.append(model.image_embeddings(e)[0])
        out["image_embeds"] = torch.cat(feats)
        image_embeds = torch.cat(embeds)
    if texts is not None:
        texts = _as_list(texts)
        ids, mask = qformer_text_ids(model, texts)
        out["text_embeds"] = torch.cat(
            [model.text_embeddings(ids[p], mask[p]) for p in _chunks(len(texts), batch_size)]
        )
        if image_embeds is not None:
            if len(texts) != image_embeds.shape[0]:
                raise ValueError("multimodal features need as many texts as images")
            out["multimodal_embeds"] = model.multimodal_embeddings(image_embeds, ids, mask)
    return out


@torch.no_grad()
def retrieve(
    model: Any,
    images: Any,
    texts: Any,
    k: int = 16,
    batch_size: int = 32,
    image_feats: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    itm_batch_size: int = 256,
) -> dict[str, Any]:
    """Image↔text retrieval: ITC shortlist of ``k`` candidates, re-ranked by ITM (as LAVIS evaluates).

    Returns ``itc`` (N_img, N_txt) similarities, ``i2t`` / ``t2i`` final score matrices (candidates outside
    the shortlist get -inf) and ``i2t_ranking`` / ``t2i_ranking`` (indices, best first, length k).
    Precomputed ``image_feats`` (N, Q, E) and ``image_embeds`` (N, P, Dv) skip the image encoder. ITM runs
    once per distinct (image, text) pair of the two shortlists, ``itm_batch_size`` pairs at a time.
    """
    texts = _as_list(texts)
    if image_embeds is None:
        images = _as_list(images)
        embeds = [model.encode_image(pixel_values(model, images[p])) for p in _chunks(len(images), batch_size)]
        image_embeds = torch.cat(embeds)
    if image_feats is None:
        image_feats = torch.cat(
            [model.image_embeddings(image_embeds[p])[0] for p in _chunks(image_embeds.shape[0], batch_size)]
        )
    ids, mask = qformer_text_ids(model, texts)
    text_feats = torch.cat([model.text_embeddings(ids[p], mask[p]) for p in _chunks(len(texts), batch_size)])
    from blip2.losses import itc_similarities

    itc = itc_similarities(image_feats, text_feats)[0]  # (N_img, N_txt)
    n_img, n_txt = itc.shape
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    i2t = torch.full_like(itc, float("-inf"))
    t2i = torch.full_like(itc.t(), float("-inf"))
    top_t = itc.topk(k_i2t, dim=1).indices  # (N_img, k)
    img_rows = torch.arange(n_img, device=itc.device)[:, None].expand(-1, k_i2t).reshape(-1)
    top_i = itc.t().topk(k_t2i, dim=1).indices  # (N_txt, k)
    txt_rows = torch.arange(n_txt, device=itc.device)[:, None].expand(-1, k_t2i).reshape(-1)
    # a pair short-listed in both directions is scored once: ITM over the union of the two shortlists
    pair_image = torch.cat([img_rows, top_i.reshape(-1)])
    pair_text = torch.cat([top_t.reshape(-1), txt_rows])
    pairs, where = torch.unique(pair_image * n_txt + pair_text, return_inverse=True)  # sorted by image
    scores = _itm_scores(model, image_embeds, ids, mask, pairs // n_txt, pairs % n_txt, itm_batch_size)[where]
    n_i2t = img_rows.shape[0]
    i2t[img_rows, top_t.reshape(-1)] = scores[:n_i2t] + itc[img_rows, top_t.reshape(-1)]
    t2i[txt_rows, top_i.reshape(-1)] = scores[n_i2t:] + itc[top_i.reshape(-1), txt_rows]
    return {
        "itc": itc,
        "i2t": i2t,
        "t2i": t2i,
        "i2t_ranking": i2t.topk(k_i2t, dim=1).indices,
        "t2i_ranking": t2i.topk(k_t2i, dim=1).indices,
    }


def _itm_scores(
    model: Any,
    image_embeds: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """ITM "match" logit for each (image_index[i], text_index[i]) pair, batched. → (N,)"""
    from blip2.qformer import select_image_kv

    out = []
    for p in _chunks(image_index.shape[0], batch_size):
        t_ids, t_mask = ids[text_index[p]], mask[text_index[p]]
        width = int(t_mask.sum(dim=1).max())  # trim padding shared by this batch
        # project each distinct image of the batch once for cross-attention, then share it across its texts
        distinct, rows = image_index[p].unique(return_inverse=True)
        image_kv = select_image_kv(model.qformer.image_kv(image_embeds[distinct]), rows)
        logits = model.itm_logits(image_kv, t_ids[:, :width], t_mask[:, :width])
        out.append(logits[:, 1])
    return torch.cat(out)
