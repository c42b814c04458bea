"""The offline demo end to end at tiny sizes (``quick=True``): every output file, its figures, loading, the
CLI, caching, and its settings read from ``configs/demo.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from blip2.cli import main as cli_main
from blip2.data.scenes import detailed_caption
from blip2.demo.pipeline import cache_keys, run_demo
from blip2.demo.settings import DemoSettings


def quick_settings() -> DemoSettings:
    return DemoSettings.load(quick=True)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, quick=True)
    return out


def test_demo_writes_every_output(demo_dir: Path) -> None:
    for name in ("metrics.json", "report.html"):
        assert (demo_dir / name).is_file(), name
    for model in ("model", "qformer"):
        assert (demo_dir / model / "config.json").is_file()
        assert (demo_dir / model / "model.safetensors").is_file()
    assert (demo_dir / "model" / "tokenizer.json").is_file()  # `blip2 ask --model DIR/model` needs it
    for split in ("train", "test", "compositional", "shifted"):
        assert (demo_dir / "data" / split / "captions_coco.json").is_file()

    metrics = json.loads((demo_dir / "metrics.json").read_text())
    s = quick_settings()
    assert metrics["wall_time_s"] > 0 and metrics["peak_rss_mb"] > 0
    assert set(metrics["headline"]["zero_shot_vqa_per_type"]) == {"color", "count", "exists", "position", "shape"}
    assert set(metrics["splits"]) == {"test", "compositional", "shifted"}
    assert "held_out_pairs" in metrics["splits"]["compositional"]
    assert set(metrics["image_encoder_probe"]) >= {"color", "shape", "size", "position"}
    # the frozen LLM alone: the test questions after the true scene description in words
    assert metrics["llm_ceiling"]["n_images"] == s.ceiling_images
    training = metrics["training"]
    assert training["image_encoder"]["steps"] == s.image_encoder.steps
    assert training["llm"]["steps"] == s.text_llm.steps
    assert training["stage1"]["last"]["step"] == s.stage1.steps
    assert training["stage2"]["last"]["step"] == s.stage2.steps
    assert '"is_decoder": true' in (demo_dir / "model" / "config.json").read_text()  # the demo's text LLM

    page = (demo_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= s.n_report + 2  # samples, shifted samples, loss curves
    assert "zero-shot" in page and "linear probe" in page.lower()


def test_demo_model_loads_and_answers(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blip2.model import Blip2

    model = Blip2.from_pretrained(demo_dir / "model").eval()
    image = sorted((demo_dir / "data" / "test" / "images").iterdir())[0]
    answers = model.answer([str(image)], ["what color is the circle?"], max_new_tokens=3, num_beams=1)
    assert len(answers) == 1 and isinstance(answers[0], str)

    args = ["ask", str(image), "how many shapes are there?", "--model", str(demo_dir / "model"), "--json"]
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["question"] == "how many shapes are there?"


def test_eval_cli_on_demo_outputs(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "eval.json"
    args = ["eval", "--model", str(demo_dir / "model"), "--retrieval-model", str(demo_dir / "qformer")]
    args += ["--scenes", str(demo_dir / "data" / "test"), "--max-images", "3", "--num-beams", "1"]
    args += ["--retrieval-k", "2", "--answer-words", "1", "--output", str(out_file)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "retrieval:" in printed and "vqa: overall=" in printed
    result = json.loads(out_file.read_text())
    assert result["retrieval"]["n_images"] == 3
    assert len(result["captions"]["predictions"]) == 3
    assert 0.0 <= result["vqa"]["overall"] <= 1.0


def test_quick_run_gives_its_known_figures(demo_dir: Path) -> None:
    """The quick run is deterministic: its losses are pinned (a change to the data, batches, models or training
    of any of the four stages moves them). The tiny models' evaluation is near chance (8 test images)."""
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    head, training = metrics["headline"], metrics["training"]
    assert head["image_to_text_R@1"] == 0.125 and head["text_to_image_R@1"] == 0.125
    assert head["caption_attribute_accuracy"] == 0.0
    assert training["image_encoder"]["first_loss"] == pytest.approx(1.6832, abs=1e-4)
    assert training["image_encoder"]["last_loss"] == pytest.approx(1.6157, abs=1e-4)
    assert training["llm"]["first_loss"] == pytest.approx(4.7704, abs=1e-4)
    assert training["llm"]["last_loss"] == pytest.approx(2.8355, abs=1e-4)
    assert training["stage1"]["first"]["loss"] == pytest.approx(7.673149, rel=1e-4)
    assert training["stage1"]["first"]["loss_itc"] == pytest.approx(2.371696, rel=1e-4)
    assert training["stage1"]["last"]["loss"] == pytest.approx(7.453183, rel=1e-4)
    assert training["stage2"]["first"]["loss"] == pytest.approx(2.867480, rel=1e-4)
    assert training["stage2"]["last"]["loss"] == pytest.approx(2.515918, rel=1e-4)


def test_second_run_reuses_the_cache(demo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blip2.demo import pipeline as demo_pipeline
    from blip2.eval import runner

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached step ran again")

    monkeypatch.setattr(demo_pipeline, "train_stage", must_not_run)
    monkeypatch.setattr(runner, "run_eval", must_not_run)
    marker = demo_dir / "model" / "model.safetensors"
    before = marker.stat().st_mtime_ns
    first = json.loads((demo_dir / "metrics.json").read_text())
    metrics = run_demo(demo_dir, quick=True)
    assert marker.stat().st_mtime_ns == before  # the saved model was not rewritten
    assert metrics["headline"] == first["headline"]


def test_demo_runs_deterministic_kernels_and_restores_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training runs under torch.use_deterministic_algorithms (same figures every run); the caller's setting
    comes back afterwards, also when the run fails."""
    from blip2.demo import pipeline as demo_pipeline

    seen = []

    def stop(self: object, data_dir: Path) -> None:
        seen.append(torch.are_deterministic_algorithms_enabled())
        raise RuntimeError("stop here")

    monkeypatch.setattr(demo_pipeline.Pipeline, "image_encoder", stop)
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="stop here"):
        run_demo(tmp_path / "out", quick=True)
    assert seen == [True]
    assert not torch.are_deterministic_algorithms_enabled()


def test_cache_keys_follow_the_settings() -> None:
    base = quick_settings()
    changed = quick_settings()
    changed.stage2.steps += 1
    a, b = cache_keys(base), cache_keys(changed)
    assert a["data"] == b["data"] and a["image_encoder"] == b["image_encoder"] and a["stage1"] == b["stage1"]
    assert a["llm"] == b["llm"]
    assert a["stage2"] != b["stage2"] and a["eval"] != b["eval"]
    changed.text_llm.steps += 1
    c = cache_keys(changed)
    assert c["llm"] != b["llm"] and c["stage1"] == b["stage1"] and c["stage2"] != b["stage2"]


def test_settings_come_from_the_yaml_file(tmp_path: Path) -> None:
    """configs/demo.yaml is the single source: every setting is read from it, ``quick`` overlays its
    ``quick:`` section (stage sections key by key), and a missing or unknown key is named."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    full, quick = DemoSettings.load(), DemoSettings.load(quick=True)
    assert full.n_train == raw["n_train"] and full.stage2.lr_multipliers == raw["stage2"]["lr_multipliers"]
    assert quick.n_train == raw["quick"]["n_train"] and quick.tiny
    assert quick.stage1.steps == raw["quick"]["stage1"]["steps"]
    assert quick.stage1.weight_decay == raw["stage1"]["weight_decay"]  # not in quick.stage1: kept
    assert quick.seed == full.seed and quick.vqa_template == full.vqa_template

    broken = {k: v for k, v in raw.items() if k not in ("quick", "n_test")}
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump({**broken, "vision_init": "random"}))
    with pytest.raises(ValueError, match=r"unknown settings \['vision_init'\], missing settings \['n_test'\]"):
        DemoSettings.load(tmp_path / "demo.yaml")
    with pytest.raises(FileNotFoundError, match="not found"):
        DemoSettings.load(tmp_path / "missing.yaml")


def test_demo_uses_no_config_preset() -> None:
    """The demo builds its model config from its settings, not from a `blip2.config` preset (config.py holds
    pure presets; nothing there may reach up into the demo)."""
    sources = "".join(p.read_text() for p in (REPO / "src" / "blip2" / "demo").glob("*.py"))
    assert "from_name" not in sources and "PRESETS" not in sources


def test_detailed_caption_names_everything() -> None:
    objects = [
        {"color": "blue", "shape": "square", "size": "large", "position": "right", "bbox": [150, 80, 210, 140]},
        {"color": "red", "shape": "circle", "size": "small", "position": "left", "bbox": [10, 90, 40, 120]},
    ]
    expected = "two shapes: a small red circle on the left and a large blue square on the right"
    assert detailed_caption(objects) == expected


def test_visual_prompt_after_bos_places_placeholders_after_bos() -> None:
    """The demo's Gemma layout: [bos][visual prompt][text], in training and in generation alike."""
    import torch

    from blip2.inference.tasks import llm_prompt_ids, with_placeholders
    from blip2.testing import make_tiny_model

    model = make_tiny_model(llm="opt")
    model.config.llm.image_token_index = 98
    q, bos = model.config.num_query_tokens, model.language_model.config.bos_token_id
    assert with_placeholders(model, [bos, 5, 6]) == [98] * q + [bos, 5, 6]  # default: BLIP-2/OPT order
    model.config.llm.visual_prompt_after_bos = True
    assert with_placeholders(model, [bos, 5, 6]) == [bos] + [98] * q + [5, 6]
    assert with_placeholders(model, [5, 6]) == [98] * q + [5, 6]  # no BOS: placeholders in front
    ids, _ = llm_prompt_ids(model, ["what color"])  # this tokenizer adds no BOS: placeholders first
    assert ids[0, :q].tolist() == [98] * q

    seen: list[torch.Tensor] = []
    splice = model._llm_inputs
    model._llm_inputs = lambda prompt, input_ids, mask: (seen.append(input_ids), splice(prompt, input_ids, mask))[1]
    model.generate(image_features=torch.randn(1, 17, 32), max_new_tokens=1, num_beams=1)
    assert seen[0][0].tolist() == [bos] + [98] * q  # generation starts from [bos][visual prompt]
