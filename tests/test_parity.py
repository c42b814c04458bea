"""Parity with transformers' BLIP-2 on tiny random models: logits, losses, generations, ITM, ITC."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_reference import left_padded_ids, make_hf_generation_model, make_hf_retrieval_model

from blip2.checkpoints import init_qformer_from_bert
from blip2.checkpoints.lavis import lavis_to_ours, ours_to_lavis
from blip2.config import Blip2Config, from_name, tiny_config
from blip2.model import Blip2, Blip2QFormer
from blip2.testing import zero_key_bias

COMBOS = [(4, 2), (6, 1), (3, 3)]  # (num_query_tokens, cross_attention_frequency)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("llm", ["opt", "t5"])
@pytest.mark.parametrize("num_queries,freq", COMBOS)
def test_generation_model_parity(tmp_path: Path, pixels: torch.Tensor, llm: str, num_queries: int, freq: int) -> None:
    cfg = tiny_config(llm, num_query_tokens=num_queries, cross_attention_frequency=freq, qformer_layers=3)
    hf = make_hf_generation_model(cfg, tmp_path, seed=num_queries)
    ours = Blip2.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_ids(num_queries, cfg.llm.image_token_index)
    kwargs = {}
    if llm == "t5":
        kwargs["decoder_input_ids"] = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs).logits
        got = ours(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs).logits
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)

    # loss with labels: text positions only for the decoder, the suffix for encoder-decoder
    labels = ids.masked_fill((ids == cfg.llm.image_token_index) | (mask == 0), -100)
    if llm == "t5":
        labels = kwargs["decoder_input_ids"]
        kwargs = {}
    with torch.no_grad():
        ref_loss = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
        got_loss = ours(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
    torch.testing.assert_close(got_loss, ref_loss, atol=1e-4, rtol=0)

    for gen in ({"num_beams": 1, "do_sample": False}, {"num_beams": 3, "do_sample": False}):
        ref_tokens = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=8, **gen)
        got_tokens = ours.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=8, **gen)
        assert got_tokens.tolist() == ref_tokens.tolist(), gen
    # no prompt at all: transformers starts from placeholders + BOS (its T5 path fails: T5 has no BOS)
    got_tokens = ours.generate(pixel_values=pixels, max_new_tokens=6, num_beams=2)
    if llm == "opt":
        ref_tokens = hf.generate(pixel_values=pixels, max_new_tokens=6, num_beams=2)
        assert got_tokens.tolist() == ref_tokens.tolist()
    else:
        assert got_tokens.shape[0] == 2 and got_tokens.shape[1] >= 2


def test_prepending_equals_placeholders(tmp_path: Path, pixels: torch.Tensor) -> None:
    """Without placeholders the visual prompt is prepended: same text logits as the placeholder form."""
    cfg = tiny_config("opt")
    make_hf_generation_model(cfg, tmp_path)
    ours = Blip2.from_pretrained(tmp_path).eval()
    q = cfg.num_query_tokens
    ids, mask = left_padded_ids(q, cfg.llm.image_token_index)
    text_ids, text_mask = ids[1:, q:], mask[1:, q:]  # the unpadded row, without its placeholders
    with torch.no_grad():
        placeholder = ours(pixel_values=pixels[1:], input_ids=ids[1:], attention_mask=mask[1:]).logits[:, q:]
        prepended = ours(pixel_values=pixels[1:], input_ids=text_ids, attention_mask=text_mask).logits
    torch.testing.assert_close(prepended, placeholder, atol=1e-5, rtol=0)
    gen = {"max_new_tokens": 6, "num_beams": 3}
    with_placeholders = ours.generate(pixel_values=pixels[1:], input_ids=ids[1:], attention_mask=mask[1:], **gen)
    with_prepending = ours.generate(pixel_values=pixels[1:], input_ids=text_ids, attention_mask=text_mask, **gen)
    assert with_prepending[:, text_ids.shape[1] :].tolist() == with_placeholders[:, ids.shape[1] :].tolist()


def test_target_only_logits_loss_equals_full(tmp_path: Path, pixels: torch.Tensor) -> None:
    cfg = tiny_config("opt")
    make_hf_generation_model(cfg, tmp_path)
    ours = Blip2.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_ids(cfg.num_query_tokens, cfg.llm.image_token_index)
    labels = ids.masked_fill((ids == cfg.llm.image_token_index) | (mask == 0), -100)
    fast = ours(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
    full = ours(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, full_logits=True)
    assert fast.logits is None
    torch.testing.assert_close(fast.loss, full.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_queries,freq", COMBOS[:2])
def test_retrieval_parity(tmp_path: Path, pixels: torch.Tensor, num_queries: int, freq: int) -> None:
    cfg = tiny_config(None, num_query_tokens=num_queries, cross_attention_frequency=freq, qformer_layers=3)
    hf = make_hf_retrieval_model(cfg, tmp_path, seed=freq)
    ours = Blip2QFormer.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding, as BERT tokenizers pad
    with torch.no_grad():
        ref_itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        ref_itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    got_itm = ours.forward_itm(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    got_itc = ours.forward_itc(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got_itm, ref_itm.logits_per_image, atol=1e-4, rtol=0)
    assert got_itc.shape == (2, 2)
    torch.testing.assert_close(got_itc, ref_itc.logits_per_image, atol=1e-4, rtol=0)


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_lavis_state_dict_round_trip(tmp_path: Path, pixels: torch.Tensor, llm: str) -> None:
    cfg = tiny_config(llm)
    hf = make_hf_generation_model(cfg, tmp_path / "hf")
    zero_key_bias(hf)
    hf.save_pretrained(tmp_path / "hf")
    from_hf = Blip2.from_pretrained(tmp_path / "hf").eval()
    lavis = ours_to_lavis(from_hf.state_dict(), llm_prefix=llm)
    assert any(k.startswith("Qformer.bert.encoder.layer.0.crossattention.self.query") for k in lavis)
    assert any(k.endswith("attn.q_bias") for k in lavis) and f"{llm}_proj.weight" in lavis
    torch.save(lavis, tmp_path / "lavis.pth")
    from_lavis = Blip2.from_pretrained(tmp_path / "lavis.pth", config=from_hf.config).eval()
    # ln_vision keeps the eps of the checkpoint's origin: LAVIS's nn.LayerNorm default, the port's 1e-6
    assert (from_lavis.ln_vision.eps, from_hf.ln_vision.eps) == (1e-5, 1e-6)
    assert from_lavis.config.vision.ln_vision_eps == 1e-5 and from_hf.config.vision.ln_vision_eps is None
    from_lavis.ln_vision.eps = from_hf.ln_vision.eps  # the weights are the same: so are the logits
    ids, mask = left_padded_ids(cfg.num_query_tokens, cfg.llm.image_token_index)
    kwargs = {"decoder_input_ids": ids[:, :4]} if llm == "t5" else {}
    with torch.no_grad():
        a = from_hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs).logits
        b = from_lavis(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs).logits
    assert torch.equal(a, b)
    assert set(lavis_to_ours(lavis)) <= set(from_hf.state_dict())


def test_lavis_stage1_round_trip(tmp_path: Path, pixels: torch.Tensor) -> None:
    cfg = tiny_config(None)
    model = Blip2QFormer(cfg).eval()
    zero_key_bias(model)
    lavis = ours_to_lavis(model.state_dict())
    assert "Qformer.cls.predictions.decoder.weight" in lavis and "temp" in lavis and "vision_proj.weight" in lavis
    torch.save(lavis, tmp_path / "stage1.pth")
    loaded = Blip2QFormer.from_pretrained(tmp_path / "stage1.pth", config=cfg).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_own_format_round_trip(tmp_path: Path, pixels: torch.Tensor) -> None:
    model = Blip2(tiny_config("opt")).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = Blip2.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        assert torch.equal(
            model(pixel_values=pixels, input_ids=ids).logits, loaded(pixel_values=pixels, input_ids=ids).logits
        )


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'blip2-opt-99b'.*tiny-opt"):
        from_name("blip2-opt-99b")


def _tiny_bert(cfg: Blip2Config) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    q = cfg.qformer
    return BertModel(
        BertConfig(
            vocab_size=q.vocab_size - 1,
            hidden_size=q.hidden_size,
            num_hidden_layers=q.num_hidden_layers,
            num_attention_heads=q.num_attention_heads,
            intermediate_size=q.intermediate_size,
            max_position_embeddings=q.max_position_embeddings,
        ),
        add_pooling_layer=False,
    ).eval()


def test_qformer_from_bert_drops_token_types_as_lavis() -> None:
    """LAVIS's Q-Former embeddings have no token types: BERT's position rows are copied as they are."""
    cfg = tiny_config(None)
    bert = _tiny_bert(cfg)
    assert bert.embeddings.token_type_embeddings.weight.abs().sum() > 0
    model = Blip2QFormer(cfg)
    init_qformer_from_bert(model.qformer, bert.state_dict())
    got = model.qformer.embeddings.position_embeddings.weight
    assert torch.equal(got, bert.embeddings.position_embeddings.weight)


def test_qformer_from_bert_text_side_equals_bert() -> None:
    """A Q-Former initialised from BERT computes BERT's function on text (BERT's token types set to zero,
    since the Q-Former, as LAVIS's, has none)."""
    cfg = tiny_config(None)
    bert = _tiny_bert(cfg)
    with torch.no_grad():
        bert.embeddings.token_type_embeddings.weight.zero_()
    model = Blip2QFormer(cfg).eval()
    not_from_bert = init_qformer_from_bert(model.qformer, bert.state_dict())
    assert all(".cross_attn." in k or k.startswith("lm_head.") for k in not_from_bert), not_from_bert
    ids = torch.randint(3, 90, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got, _ = model.qformer(input_ids=ids, allowed=mask.bool()[:, None, :].expand(-1, 6, -1))
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    layer = model.qformer.layers[0]
    assert torch.equal(layer.ffn_query.fc1.weight, layer.ffn_text.fc1.weight)


def test_hub_id_goes_through_snapshot_download(tmp_path: Path, pixels: torch.Tensor, monkeypatch) -> None:  # noqa: ANN001
    """A hub id is fetched with huggingface_hub (stubbed here: no internet) and then loaded like a directory."""
    import huggingface_hub

    cfg = tiny_config("opt")
    hf = make_hf_generation_model(cfg, tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = Blip2.from_pretrained("Salesforce/blip2-opt-2.7b").eval()
    assert calls and calls[0][0] == "Salesforce/blip2-opt-2.7b" and "*.safetensors" in calls[0][1]
    ids, mask = left_padded_ids(cfg.num_query_tokens, cfg.llm.image_token_index)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits,
            hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits,
            atol=1e-4,
            rtol=0,
        )
