"""Official LAVIS checkpoints: files shaped like the released ones load, with the frozen parts from their sources.

LAVIS saves only parameters with ``requires_grad=True`` (and buffers) under ``"model"`` (``runner_base.py``
``_save_checkpoint``): ``blip2_pretrained.pth`` has no ``visual_encoder.*``, the stage-2 OPT / FlanT5 files
have no LLM and no Q-Former text parts. The expected LAVIS names below are written out from LAVIS's modules
(``Qformer.py``, ``blip2_qformer.py``, ``blip2_opt.py``, ``blip2_t5.py``), not from our key table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip2.checkpoints import CheckpointError
from blip2.checkpoints.lavis import ours_to_lavis
from blip2.cli import main
from blip2.config import Blip2Config, tiny_config
from blip2.model import Blip2, Blip2QFormer
from blip2.testing import zero_key_bias

WB = ("weight", "bias")


def lavis_qformer_names(cfg: Blip2Config, text: bool) -> set[str]:
    """The Q-Former names of a LAVIS state dict (BertLMHeadModel from LAVIS's Qformer.py)."""
    q = cfg.qformer
    names = {f"Qformer.bert.embeddings.LayerNorm.{p}" for p in WB} | {"Qformer.bert.embeddings.position_ids"}
    if text:  # stage 1; LAVIS's stage-2 models set these modules to None
        names |= {
            "Qformer.bert.embeddings.word_embeddings.weight",
            "Qformer.bert.embeddings.position_embeddings.weight",
        }
        names |= {"Qformer.cls.predictions.bias", "Qformer.cls.predictions.decoder.weight"}
        names |= {"Qformer.cls.predictions.decoder.bias"}
        names |= {f"Qformer.cls.predictions.transform.{m}.{p}" for m in ("dense", "LayerNorm") for p in WB}
    for i in range(q.num_hidden_layers):
        parts = ["attention.self.query", "attention.self.key", "attention.self.value"]
        parts += ["attention.output.dense", "attention.output.LayerNorm"]
        if i % q.cross_attention_frequency == 0:
            parts += [p.replace("attention", "crossattention", 1) for p in parts[:5]]
        parts += ["intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"]
        if text:
            parts += ["intermediate.dense", "output.dense", "output.LayerNorm"]
        names |= {f"Qformer.bert.encoder.layer.{i}.{part}.{p}" for part in parts for p in WB}
    return names


def trainable_only_lavis_file(model: torch.nn.Module, path: Path, llm_prefix: str = "opt") -> set[str]:
    """Write ``model`` as LAVIS's runner would: trainable parameters and buffers only, under "model"."""
    state = ours_to_lavis(model.state_dict(), llm_prefix=llm_prefix)
    frozen = ("visual_encoder.", f"{llm_prefix}_model.")
    state = {k: v for k, v in state.items() if not k.startswith(frozen)}
    max_pos = model.config.qformer.max_position_embeddings
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(max_pos)[None]  # a buffer: LAVIS keeps it
    torch.save({"model": state, "epoch": 9, "config": {"run": {"init_lr": 1e-4}}}, path)
    return set(state)


def eva_file(model: torch.nn.Module, path: Path) -> None:
    """LAVIS's eva_vit_g.pth: the EVA ViT's own names (no prefix), one block more than LAVIS builds, a head."""
    vit = {
        k.removeprefix("visual_encoder."): v
        for k, v in ours_to_lavis(model.state_dict()).items()
        if k.startswith("visual_encoder.")
    }
    n = model.config.vision.hf_config["num_hidden_layers"]
    extra = {k.replace("blocks.0.", f"blocks.{n}."): torch.randn_like(v) for k, v in vit.items() if "blocks.0." in k}
    width = model.config.vision.hidden_size
    torch.save({**vit, **extra, "norm.weight": torch.ones(width), "head.weight": torch.randn(5, width)}, path)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Blip2QFormer, Path, Path]:
    d = tmp_path_factory.mktemp("lavis1")
    torch.manual_seed(0)
    model = zero_key_bias(Blip2QFormer(tiny_config(None))).eval()
    names = trainable_only_lavis_file(model, d / "blip2_pretrained.pth")
    expected = lavis_qformer_names(model.config, text=True)
    expected |= {"ln_vision.weight", "ln_vision.bias", "query_tokens", "temp"}
    expected |= {f"{m}.{p}" for m in ("vision_proj", "text_proj", "itm_head") for p in WB}
    assert names == expected
    eva_file(model, d / "eva_vit_g.pth")
    return model, d / "blip2_pretrained.pth", d / "eva_vit_g.pth"


def test_stage1_file_without_image_encoder_names_the_eva_file(stage1: tuple) -> None:
    model, lavis, _ = stage1
    with pytest.raises(CheckpointError, match=r"holds no image-encoder weights.*--vision-weights eva_vit_g\.pth"):
        Blip2QFormer.from_pretrained(lavis, config=tiny_config(None))


def test_stage1_file_loads_with_the_eva_file(stage1: tuple) -> None:
    model, lavis, eva = stage1
    loaded = Blip2QFormer.from_pretrained(lavis, config=tiny_config(None), vision_weights=eva)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert loaded.ln_vision.eps == 1e-5  # LAVIS's ln_vision is nn.LayerNorm(width): eps 1e-5, not 1e-6


def test_cli_converts_a_stage1_file(stage1: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, lavis, eva = stage1
    args = ["convert", str(lavis), str(tmp_path / "out"), "--config", "tiny-stage1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eva_vit_g.pth" in err and "storage.googleapis.com" in err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--vision-weights", str(eva)]) == 0
    back = Blip2QFormer.from_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vision"]["ln_vision_eps"] == 1e-5
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_stage2_file_loads_llm_from_model_id(tmp_path: Path, llm: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(llm)
    cfg.qformer.use_text = False  # as the official stage-2 configs
    torch.manual_seed(1)
    model = zero_key_bias(Blip2(cfg)).eval()
    model.language_model.save_pretrained(tmp_path / "llm")  # stands in for facebook/opt-2.7b, google/flan-t5-xl
    names = trainable_only_lavis_file(model, tmp_path / "stage2.pth", llm_prefix=llm)
    expected = lavis_qformer_names(cfg, text=False) | {"ln_vision.weight", "ln_vision.bias", "query_tokens"}
    assert names == expected | {f"{llm}_proj.{p}" for p in WB}
    eva_file(model, tmp_path / "eva.pth")
    capsys.readouterr()  # transformers' progress bars from saving the stand-in LLM

    # the preset names no LLM to load: one line saying so
    args = [
        "convert",
        str(tmp_path / "stage2.pth"),
        str(tmp_path / "out"),
        "--vision-weights",
        str(tmp_path / "eva.pth"),
    ]
    assert main([*args, "--config", f"tiny-{llm}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no language-model weights" in err and "llm.model_id" in err
    # a model_id that cannot be loaded: one line naming it
    cfg_file = tmp_path / "config.json"
    cfg.llm.model_id = str(tmp_path / "no-such-llm")
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    assert main([*args, "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-llm" in err
    # the LLM from its model_id, as LAVIS does
    cfg.llm.model_id = str(tmp_path / "llm")
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    assert main([*args, "--config", str(cfg_file)]) == 0
    back = Blip2.from_pretrained(tmp_path / "out").eval()
    model.ln_vision.eps = 1e-5  # LAVIS's eps, which the converted model carries
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(4))
    kwargs = {"decoder_input_ids": ids[:, :3]} if llm == "t5" else {}
    with torch.no_grad():
        want = model(pixel_values=pixels, input_ids=ids, **kwargs).logits
        got = back(pixel_values=pixels, input_ids=ids, **kwargs).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # and back to LAVIS: the LLM prefix follows the LLM's type (t5_proj for FlanT5, as blip2_t5 names it)
    assert main(["convert", str(tmp_path / "out"), str(tmp_path / "back.pth"), "--to", "lavis"]) == 0
    state = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert f"{llm}_proj.weight" in state and any(k.startswith(f"{llm}_model.") for k in state)


def test_stage2_file_into_a_config_with_text_parts(tmp_path: Path) -> None:
    """LAVIS's stage-2 models delete the Q-Former's text parts: a config that has them loads without them."""
    cfg = tiny_config("opt")
    cfg.qformer.use_text = False
    model = zero_key_bias(Blip2(cfg)).eval()
    trainable_only_lavis_file(model, tmp_path / "stage2.pth")
    eva_file(model, tmp_path / "eva.pth")
    full = tiny_config("opt")
    assert full.qformer.use_text
    model.language_model.save_pretrained(tmp_path / "llm")
    full.llm.model_id = str(tmp_path / "llm")
    loaded = Blip2.from_pretrained(tmp_path / "stage2.pth", config=full, vision_weights=tmp_path / "eva.pth")
    assert not loaded.config.qformer.use_text and full.qformer.use_text  # the caller's config is not changed
