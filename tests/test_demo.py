"""The offline demo end to end at tiny sizes (``quick=True``): every output file, loading, the CLI, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from blip2.cli import main as cli_main
from blip2.demo.settings import DemoSettings, cache_keys, detailed_caption, quick_settings, run_demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, quick=True)
    return out


def test_demo_writes_every_output(demo_dir: Path) -> None:
    for name in ("metrics.json", "report.html", "stage1_losses.png", "stage2_losses.png"):
        assert (demo_dir / name).is_file(), name
    for model in ("model", "qformer"):
        assert (demo_dir / model / "config.json").is_file()
        assert (demo_dir / model / "model.safetensors").is_file()
    assert (demo_dir / "model" / "tokenizer.json").is_file()  # `blip2 ask --model DIR/model` needs it
    for split in ("train", "test"):
        assert (demo_dir / "data" / split / "captions_coco.json").is_file()

    metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert metrics["wall_time_s"] > 0 and metrics["peak_rss_mb"] > 0
    head = metrics["headline"]
    for key in ("i2t_r1", "t2i_r1", "caption_attribute_accuracy", "CIDEr", "vqa_overall"):
        assert 0.0 <= head[key] <= 10.0, key
    assert set(head["vqa_per_type"]) == {"color", "count", "exists", "position", "shape"}
    # the LLM's ceiling: the same questions with the true scene description written before them
    assert 0.0 <= head["vqa_true_caption_overall"] <= 1.0
    assert metrics["vqa_true_caption"]["n_images"] == quick_settings().n_test
    assert metrics["training"]["stage1"]["last"]["step"] == quick_settings().stage1.steps
    assert metrics["training"]["stage2"]["last"]["step"] == quick_settings().stage2.steps

    page = (demo_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= quick_settings().n_report + 2  # samples + two loss plots
    assert "generated caption" in page and "zero-shot" in page and "LLM ceiling" in page


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


def test_second_run_reuses_the_cache(demo_dir: Path) -> None:
    marker = demo_dir / "model" / "model.safetensors"
    before = marker.stat().st_mtime_ns
    metrics = run_demo(demo_dir, quick=True)
    assert marker.stat().st_mtime_ns == before  # the saved model was not rewritten
    assert metrics["timings_s"]["evaluate"] < 5  # evaluation results came from the cache


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

    monkeypatch.setattr(demo_pipeline.Pipeline, "features", stop)
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
    assert a["data"] == b["data"] and a["features"] == b["features"] and a["stage1"] == b["stage1"]
    assert a["stage2"] != b["stage2"] and a["eval"] != b["eval"]


def test_demo_yaml_matches_the_defaults() -> None:
    from_yaml = DemoSettings.from_yaml(REPO / "configs" / "demo.yaml")
    assert from_yaml == DemoSettings()
    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())  # a plain YAML recipe


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
