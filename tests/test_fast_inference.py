"""The fast inference paths give the same tokens as the plain ones and as transformers (tiny random models).

- prefix cache: the prompt runs once per row and its cache is copied to the beams (`Blip2.generate`);
- shared prefix: several questions about one image run the visual prompt once (`inference.answer`);
- oneDNN pre-packed linear layers (opt-in, CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_reference import left_padded_ids, make_hf_generation_model

from blip2.config import tiny_config
from blip2.inference import fast as fast_generate
from blip2.model import Blip2
from blip2.testing import tiny_llm_tokenizer

QUESTIONS = [
    "what color is the circle ?",
    "how many shapes ?",
    "is there a red square on the left of the large blue triangle ?",
    "where is the star ?",
    "what shape is on top ?",
]


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Blip2]:
    directory = tmp_path_factory.mktemp("hf_tiny_opt")
    cfg = tiny_config("opt", num_query_tokens=4, qformer_layers=3)
    hf = make_hf_generation_model(cfg, directory, seed=5)
    ours = Blip2.from_pretrained(directory).eval()
    ours.tokenizer = tiny_llm_tokenizer()
    return hf, ours


def _count_llm_rows(model: Blip2) -> tuple[list[int], Any]:
    """Record the batch size of every LLM forward that runs more than one position (the prompt passes)."""
    seen: list[int] = []

    def hook(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs.get("input_ids")
        if x is not None and x.shape[1] > 1:
            seen.append(int(x.shape[0]))

    return seen, model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


GENERATIONS = [
    {"num_beams": 1, "max_new_tokens": 8},
    {"num_beams": 3, "max_new_tokens": 8, "min_new_tokens": 4},
    {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0},
    {"num_beams": 4, "max_new_tokens": 6, "num_return_sequences": 2},
]


@pytest.mark.parametrize("gen", GENERATIONS)
def test_prefix_cache_same_tokens_as_plain_and_transformers(
    hf_and_ours: tuple[Any, Blip2], pixels: torch.Tensor, gen: dict[str, Any]
) -> None:
    hf, ours = hf_and_ours
    ids, mask = left_padded_ids(4, ours.config.llm.image_token_index)
    seen, handle = _count_llm_rows(ours)
    try:
        fast = ours.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **gen)
    finally:
        handle.remove()
    assert seen == [2], "the prompt should run once per row, not once per beam"
    plain = ours.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, prefix_cache=False, **gen)
    ref = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **gen)
    assert fast.tolist() == plain.tolist() == ref.tolist()


def test_prefix_cache_without_prompt_matches_transformers(hf_and_ours: tuple[Any, Blip2], pixels: torch.Tensor) -> None:
    hf, ours = hf_and_ours
    gen = {"num_beams": 5, "max_new_tokens": 12, "min_new_tokens": 8}
    fast = ours.generate(pixel_values=pixels, **gen)
    assert fast.tolist() == hf.generate(pixel_values=pixels, **gen).tolist()


def test_prefix_cache_prepended_visual_prompt(pixels: torch.Tensor) -> None:
    """Our own models' convention (no placeholders): the stand-in ids never reach the output."""
    cfg = tiny_config("opt")
    cfg.llm.image_token_index = None
    torch.manual_seed(0)
    model = Blip2(cfg).eval()
    ids, mask = left_padded_ids(4, None)
    for gen in GENERATIONS[:3]:
        fast = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **gen)
        plain = model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, prefix_cache=False, **gen)
        assert fast.tolist() == plain.tolist()
        assert fast[:, : ids.shape[1]].tolist() == ids.tolist()


def test_options_that_read_prompt_ids_use_the_plain_path(hf_and_ours: tuple[Any, Blip2], pixels: torch.Tensor) -> None:
    _, ours = hf_and_ours
    assert fast_generate.expansion_factor(ours.language_model, {"max_new_tokens": 5, "num_beams": 3}) == 3
    assert fast_generate.expansion_factor(ours.language_model, {"max_new_tokens": 5, "repetition_penalty": 1.3}) is None
    assert fast_generate.expansion_factor(ours.language_model, {"num_beams": 3}) is None  # no max_new_tokens
    ids, mask = left_padded_ids(4, ours.config.llm.image_token_index)
    gen = {"num_beams": 3, "max_new_tokens": 6, "repetition_penalty": 1.3}
    a = ours.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **gen)
    b = ours.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, prefix_cache=False, **gen)
    assert a.tolist() == b.tolist()


def test_common_prefix_length() -> None:
    assert fast_generate.common_prefix_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert fast_generate.common_prefix_length([[1, 2], [1, 2, 3]]) == 1  # every row keeps a token
    assert fast_generate.common_prefix_length([[7]]) == 0


@pytest.mark.parametrize("gen", [{}, {"num_beams": 3, "max_new_tokens": 6, "min_new_tokens": 2}])
def test_shared_prefix_answers_match_one_by_one_and_transformers(
    hf_and_ours: tuple[Any, Blip2], gen: dict[str, Any]
) -> None:
    """Five questions about one image: the same answers as asking transformers one question at a time."""
    from PIL import Image

    from blip2.inference.tasks import VQA_DEFAULTS, _generation_kwargs, llm_prompt_ids, pixel_values

    hf, ours = hf_and_ours
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    seen, handle = _count_llm_rows(ours)
    try:
        fast = ours.answer(image, QUESTIONS, **gen)
    finally:
        handle.remove()
    # the shared prefix (visual prompt + "question") once, then the five questions' own text once each
    assert seen == [1, 5]
    plain = ours.answer(image, QUESTIONS, shared_prefix=False, **gen)
    assert fast == plain
    kwargs = _generation_kwargs(VQA_DEFAULTS, gen)
    pixels = pixel_values(ours, [image])
    tok = ours.tokenizer
    for question, got in zip(QUESTIONS, fast, strict=True):
        ids, mask = llm_prompt_ids(ours, [f"Question: {question} Answer:"])
        ref = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs)
        assert tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True).strip() == got


def test_shared_prefix_several_images(hf_and_ours: tuple[Any, Blip2]) -> None:
    from PIL import Image

    _, ours = hf_and_ours
    g = torch.Generator().manual_seed(4)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]
    pairs = [images[0], images[1], images[0], images[1], images[0]]
    assert ours.answer(pairs, QUESTIONS) == ours.answer(pairs, QUESTIONS, shared_prefix=False)


def test_shared_prefix_refuses_rotary_style_positions() -> None:
    class Fake(torch.nn.Module):
        class config:  # noqa: N801 - mimics a transformers config
            model_type = "llama"

    with pytest.raises(ValueError, match="positions follow the attention mask"):
        fast_generate.shared_prefix_generate(
            Fake(), torch.zeros(1, 2, 4), [0, 0], torch.zeros(1, dtype=torch.long), [[1]], 0, 1
        )


@pytest.mark.skipif(not fast_generate.can_prepack(), reason="oneDNN is not available in this torch build")
def test_prepacked_linears_same_tokens(tmp_path: Path, pixels: torch.Tensor) -> None:
    cfg = tiny_config("opt", num_query_tokens=4, qformer_layers=3)
    make_hf_generation_model(cfg, tmp_path, seed=7)
    plain = Blip2.from_pretrained(tmp_path).eval()
    packed = Blip2.from_pretrained(tmp_path).eval()
    assert fast_generate.optimize_for_cpu_inference(packed) > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.language_model.modules())
    ids, mask = left_padded_ids(4, cfg.llm.image_token_index)
    with torch.no_grad():
        a = plain(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        b = packed(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for gen in GENERATIONS[:3]:
        x = plain.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **gen)
        y = packed.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **gen)
        assert x.tolist() == y.tolist()
    with pytest.raises(RuntimeError, match="inference only"):
        layer = next(m for m in packed.language_model.modules() if isinstance(m, fast_generate.PackedLinear))
        layer(torch.randn(2, layer.in_features, requires_grad=True))


def test_retrieve_scores_each_pair_once_and_matches_direct_itm() -> None:
    """ITM over the union of the two shortlists gives the scores ITM gives pair by pair."""
    from blip2.inference.tasks import qformer_text_ids, retrieve
    from blip2.model import Blip2QFormer
    from blip2.testing import tiny_bert_tokenizer

    torch.manual_seed(0)
    model = Blip2QFormer(tiny_config(None)).eval()
    model.tokenizer = tiny_bert_tokenizer()
    texts = [q.replace("?", "").strip() for q in QUESTIONS] + ["a red circle", "two blue squares"]
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embeds = model.encode_image(pixels)
    calls: list[int] = []
    original = model.itm_logits

    def counting(image_embeds: Any, *args: Any) -> torch.Tensor:
        from blip2.qformer import image_batch_size

        calls.append(image_batch_size(image_embeds))
        return original(image_embeds, *args)

    model.itm_logits = counting  # type: ignore[method-assign]
    out = retrieve(model, None, texts, k=3, image_embeds=embeds, itm_batch_size=5)
    shortlisted = torch.isfinite(out["i2t"]) | torch.isfinite(out["t2i"]).t()
    assert sum(calls) == int(shortlisted.sum())  # each distinct pair once
    model.itm_logits = original  # type: ignore[method-assign]
    ids, mask = qformer_text_ids(model, texts)
    with torch.no_grad():
        for i in range(4):
            for j in range(len(texts)):
                if not shortlisted[i, j]:
                    continue
                width = int(mask[j].sum())
                itm = model.itm_logits(embeds[i : i + 1], ids[j : j + 1, :width], mask[j : j + 1, :width])[0, 1]
                expected = itm + out["itc"][i, j]
                if torch.isfinite(out["i2t"][i, j]):
                    torch.testing.assert_close(out["i2t"][i, j], expected, atol=1e-5, rtol=0)
                if torch.isfinite(out["t2i"][j, i]):
                    torch.testing.assert_close(out["t2i"][j, i], expected, atol=1e-5, rtol=0)
