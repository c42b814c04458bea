"""Smoke runs of both pretraining stages on tiny configs (loss falls), and the feature cache's equivalence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_torchrun, tiny_train_config

from blip2.config import tiny_config
from blip2.data.scenes import make_split
from blip2.model import Blip2, Blip2QFormer
from blip2.testing import make_tiny_model, pretrain_tiny_llm, tiny_bert_tokenizer
from blip2.train.config import TrainConfig, TrainConfigError
from blip2.train.recipes import load_stage1_into, train

STEPS = 24


def _cfg(out: Path, stage: int, **data: object) -> TrainConfig:
    return tiny_train_config(
        out,
        max_steps=STEPS,
        batch_size=8,
        lr=2e-3,
        min_lr=2e-4,
        model={"stage": stage},
        data={"kind": "scenes", "n": 48, "seed": 0, "max_length": 24, **data},
    )


def _losses(out: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _falls(values: list[float]) -> bool:
    """Mean of the last 6 logged losses at most 95% of the first 6 (single steps are noisy at batch 8)."""
    return sum(values[-6:]) / 6 < 0.95 * sum(values[:6]) / 6


def test_stage1_smoke_loss_falls(tmp_path: Path) -> None:
    model = make_tiny_model(None, llm=None)
    train(_cfg(tmp_path, 1), model)
    losses = _losses(tmp_path)
    assert len(losses) == STEPS and _falls(losses), losses
    for part in ("loss_itc", "loss_itm", "loss_lm"):
        assert len(_losses(tmp_path, part)) == STEPS
    loaded = Blip2QFormer.from_pretrained(tmp_path / "model")
    assert torch.equal(loaded.query_tokens, model.query_tokens)


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_stage2_smoke_loss_falls(tmp_path: Path, llm: str) -> None:
    model = make_tiny_model(None, llm=llm)
    # a frozen LLM must know some language for a visual prompt to help: pretrain the tiny one on captions
    pretrain_tiny_llm(model, [c for ex in make_split("train", 100, seed=5) for c in ex.captions])
    frozen = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    vision = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    cfg = _cfg(tmp_path, 2)
    cfg.lr, cfg.min_lr = 5e-3, 5e-4
    train(cfg, model)
    losses = _losses(tmp_path)
    assert len(losses) == STEPS and _falls(losses), losses
    for k, v in model.language_model.state_dict().items():  # the LLM received no updates
        assert torch.equal(v, frozen[k]), k
    for k, v in model.vision_model.state_dict().items():
        assert torch.equal(v, vision[k]), k
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_feature_cache_gives_the_same_losses(tmp_path: Path) -> None:
    """No augmentation: training from cached frozen features equals training with the encoder in the loop."""
    runs = {}
    for name, cache in (("live", None), ("cached", str(tmp_path / "cache"))):
        model = make_tiny_model(None, llm=None, seed=1)
        cfg = _cfg(tmp_path / name, 1, feature_cache=cache)
        cfg.max_steps = 6
        train(cfg, model)
        runs[name] = _losses(tmp_path / name)
    assert (tmp_path / "cache" / "features.safetensors").exists()
    torch.testing.assert_close(torch.tensor(runs["cached"]), torch.tensor(runs["live"]), atol=1e-5, rtol=1e-5)


def test_stage2_starts_from_stage1(tmp_path: Path) -> None:
    stage1 = make_tiny_model(tmp_path / "s1", llm=None, seed=3)
    cfg = tiny_config("opt")
    cfg.qformer.use_text = False
    stage2 = Blip2(cfg)
    load_stage1_into(stage2, tmp_path / "s1")
    assert torch.equal(stage2.query_tokens, stage1.query_tokens)
    assert torch.equal(
        stage2.qformer.layers[0].cross_attn.query.weight, stage1.qformer.layers[0].cross_attn.query.weight
    )


def test_stage1_tokenizer_gives_cls_first() -> None:
    tok = tiny_bert_tokenizer()
    ids = tok(["a red circle"])["input_ids"][0]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


@pytest.mark.multiprocess
def test_stage1_runs_are_bit_identical_with_default_threads(tmp_path: Path) -> None:
    """The README's claim, with torch's default thread count: two uninterrupted 8-step runs end equal, and a
    run killed (SIGKILL) after step 5 (checkpoint at 4) and resumed to 8 ends equal to them."""
    import subprocess
    import sys

    script = Path(__file__).with_name("helpers_stage1_kill.py")

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), str(out), "8", *extra], capture_output=True, text=True, timeout=300
        )

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    again = run(tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    killed = run(tmp_path / "killed", "5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "final.pt").exists()
    resumed = run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    c = torch.load(tmp_path / "again" / "final.pt", weights_only=True)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k
        assert torch.equal(a[k], b[k]), k


def test_cli_train_from_yaml_recipe(tmp_path: Path) -> None:
    from blip2.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            "configs/stage1_small.yaml",
            f"output_dir={out}",
            "max_steps=2",
            "batch_size=4",
            "data.n=8",
            f"data.feature_cache={tmp_path / 'cache'}",
            "log_every=1",
            "save_every=2",
        ]
    )
    assert code == 0
    assert (out / "metrics.jsonl").exists() and (out / "model" / "config.json").exists()
    model = Blip2QFormer.from_pretrained(out / "model")
    assert model.tokenizer is not None and model.config.qformer.hidden_size == 384


@pytest.mark.multiprocess
def test_stage1_under_torchrun_two_processes(tmp_path: Path) -> None:
    """`blip2 train` under torchrun (2 gloo processes): texts padded differently per rank are gathered for ITM
    hard negatives, rank 0 builds the data and the feature cache, the model is saved once."""
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "max_steps=3", "batch_size=2", "data.n=8", f"data.feature_cache={out / 'cache'}"]
    overrides += ["log_every=1", "save_every=3", "num_workers=0"]
    saved = out / "model" / "model.safetensors"  # written once every rank has trained: the work is done
    run_torchrun(
        "-m",
        "blip2.cli",
        "train",
        "--config",
        "configs/stage1_small.yaml",
        *overrides,
        timeout=600,
        finished=saved.exists,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (out / "model" / "model.safetensors").exists()


def test_rank0_builds_shared_files_and_the_others_wait_for_this_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun only rank 0 writes the scenes and the feature cache (two ranks writing the same PNGs,
    or reading half-written ones, gave the ranks different batches and gloo aborted); the others wait for a
    marker naming this launch, never for one an earlier run left behind."""
    from blip2.train.recipes import _rank0_first

    marker = tmp_path / ".ready"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run-b")
    marker.write_text("run-a")  # left by an earlier launch
    monkeypatch.setenv("RANK", "1")
    built: list[int] = []
    with pytest.raises(TimeoutError, match="rank 1 waited"):
        _rank0_first(marker, lambda: built.append(1), load=lambda: "loaded", timeout_s=0.5)
    assert built == []  # a waiting rank never builds

    monkeypatch.setenv("RANK", "0")
    assert _rank0_first(marker, lambda: "built") == "built"
    assert marker.read_text() == "run-b"
    monkeypatch.setenv("RANK", "1")
    assert _rank0_first(marker, lambda: built.append(1), load=lambda: "loaded", timeout_s=0.5) == "loaded"
    assert built == []


def test_feature_cache_reuse_only_refuses_a_mismatched_cache(tmp_path: Path) -> None:
    """A non-zero rank only reads the cache; one written for other images is refused, not rebuilt in place."""
    from PIL import Image

    from blip2.data.feature_cache import build_feature_cache
    from blip2.data.transforms import ImageProcessor
    from blip2.testing import make_tiny_model

    model = make_tiny_model(None, llm=None, seed=0)
    processor = ImageProcessor.from_vision_config(model.config.vision)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 40), (60 * i, 20, 90)).save(paths[-1])
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="does not match"):
        build_feature_cache(model.vision_model, paths, processor, cache, reuse_only=True)
    built = build_feature_cache(model.vision_model, paths, processor, cache)
    torch.testing.assert_close(build_feature_cache(model.vision_model, paths, processor, cache, reuse_only=True), built)
    with pytest.raises(RuntimeError, match="does not match"):
        build_feature_cache(model.vision_model, paths[:2], processor, cache, reuse_only=True)


def test_recipe_model_init_is_seeded() -> None:
    """torch seeds its default generator differently in every process, so an unseeded build gave every
    torchrun rank (and every rerun) a different random frozen encoder; the recipe's seed fixes the weights."""
    from blip2.train.recipes import build_model

    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed + 100)  # whatever the caller's RNG state, the build draws from `seed`
        return build_model({"stage": 1, "preset": "tiny-stage1"}, seed=seed).state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert first.keys() == again.keys()
    for name, value in first.items():
        torch.testing.assert_close(again[name], value, atol=0, rtol=0, msg=name)
    assert not torch.equal(
        other["vision_model.embeddings.patch_embedding.weight"], first["vision_model.embeddings.patch_embedding.weight"]
    )


def test_batches_whose_every_image_is_unreadable_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The collator drops unreadable images; a micro-batch left empty is skipped (two of three images are
    corrupt, batch size 1: 10 of every 15 micro-batches) and the run still takes every optimiser step."""
    from blip2.data.scene_files import write_split

    root = write_split(tmp_path / "data", "train", 3, seed=0, image_size=32)
    for name in ("train_000001.png", "train_000002.png"):
        (root / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cfg = _cfg(tmp_path / "run", 2)
    cfg.max_steps, cfg.batch_size = 6, 1
    cfg.data = {"kind": "jsonl", "annotations": str(root / "captions.jsonl"), "images": str(root), "max_length": 24}
    with caplog.at_level("WARNING", logger="blip2.train.loop"):
        train(cfg, make_tiny_model(None, llm="opt"))
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    assert all(v == v for v in _losses(tmp_path / "run"))  # no NaN from an empty batch
    assert sum("no readable sample" in r.getMessage() for r in caplog.records) >= 2


def test_recipe_training_switches_reach_the_model() -> None:
    """temp_clamp: null trains temp unclamped (LAVIS BLIP-2); frozen_llm_train_mode keeps the frozen LLM's
    dropout active in training (LAVIS) while eval() still turns it off."""
    from blip2.train.recipes import build_model

    stage1 = build_model({"stage": 1, "preset": "tiny-stage1", "temp_clamp": None})
    assert stage1.temp_clamp is None
    with torch.no_grad():
        stage1.temp.fill_(0.9)
    batch = stage1_batch(stage1)
    stage1.train()
    stage1(**batch)
    assert stage1.temp.item() == pytest.approx(0.9)  # default (0.001, 0.5) would have clamped it to 0.5
    stage1.temp_clamp = (0.001, 0.5)
    stage1(**batch)
    assert stage1.temp.item() == pytest.approx(0.5)

    model = make_tiny_model(None, llm="opt")
    model.train()
    assert not model.language_model.training  # the project's default: frozen LLM in eval mode
    train_cfg = _cfg(Path("unused"), 2)
    train_cfg.model.frozen_llm_train_mode = True
    from blip2.train.recipes import configure_for_training

    configure_for_training(model, train_cfg.model)
    model.train()
    assert model.language_model.training and not model.vision_model.training
    model.eval()
    assert not model.language_model.training


def stage1_batch(model: Blip2QFormer) -> dict[str, torch.Tensor]:
    tokens = tiny_bert_tokenizer()(["a red circle", "two blue squares"], padding=True, return_tensors="pt")
    size = model.config.vision.image_size
    return {
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "pixel_values": torch.randn(2, 3, size, size),
    }


def test_recipe_model_section_errors_and_stage1_init_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blip2.train import recipes

    with pytest.raises(TrainConfigError, match="pretrained_vision=true, but preset 'tiny-stage1' uses the official"):
        recipes.build_model({"stage": 1, "preset": "tiny-stage1", "pretrained_vision": True})
    # Stage 1 takes the frozen image encoder (only) from init_from.
    source = recipes.build_model({"stage": 1, "preset": "tiny-stage1"}, seed=5)
    source.save_pretrained(tmp_path / "source")
    model = recipes.build_model({"stage": 1, "preset": "tiny-stage1", "init_from": str(tmp_path / "source")}, seed=0)
    for name, value in source.vision_model.state_dict().items():
        torch.testing.assert_close(model.vision_model.state_dict()[name], value, atol=0, rtol=0)
    assert not torch.equal(model.query_tokens, source.query_tokens)

    # output_dir and device are checked before any model is built
    monkeypatch.setattr(recipes, "build_model", lambda *a, **k: pytest.fail("built a model first"))
    (tmp_path / "file").write_text("x")
    cfg = _cfg(tmp_path / "file" / "run", 1)
    with pytest.raises(OSError, match="lies inside the file"):
        recipes.train(cfg)
    cfg = _cfg(tmp_path / "run", 1)
    cfg.device = "banana"
    with pytest.raises(TrainConfigError, match="not a device"):
        recipes.train(cfg)


@pytest.mark.parametrize(
    ("recipe_text", "overrides", "expected"),
    [
        ("max_step: 10\n", [], "unknown training option 'max_step' in"),
        ("max_steps: 10\n", ["max_stepz=2"], "unknown training option 'max_stepz' in overrides"),
        ("max_steps: [10\n", [], "is not valid YAML"),
        ("max_steps: 10\n", ["device=banana"], "'banana' is not a device"),
        ("model:\n  stage: 1\n  preset: tiny-stage1\n  shuffle: 3\n", [], "unknown training option model.'shuffle'"),
    ],
)
def test_cli_train_config_mistakes_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe_text: str, overrides: list[str], expected: str
) -> None:
    from blip2.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    assert main(["train", "--config", str(recipe), f"output_dir={tmp_path / 'run'}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err, err
