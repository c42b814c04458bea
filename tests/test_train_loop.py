"""Training loop: schedule, param groups, accumulation, frozen params, resume after SIGKILL, DDP equivalence."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import gloo_teardown_abort, src_env, tiny_train_config, torchrun_command  # noqa: E402
from helpers_train_toy import ToyDataset, ToyRegressor, build, collate  # noqa: E402

from blip2.checkpoints import CheckpointError  # noqa: E402
from blip2.train.config import TrainConfig, TrainConfigError, apply_overrides, load_config  # noqa: E402
from blip2.train.loop import TrainDataError, TrainingDivergedError, run_training  # noqa: E402
from blip2.train.optim import build_optimizer, build_scheduler, lr_at, split_decay_params  # noqa: E402
from blip2.train.state import OutputDirError, load_checkpoint, resume_checkpoint  # noqa: E402

HELPER = Path(__file__).resolve().parent / "helpers_train_toy.py"
REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, **kw: object) -> TrainConfig:
    return tiny_train_config(tmp_path, seed=3, **kw)


def _helper(out: Path, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, str(HELPER), "--out", str(out), *args]
    return subprocess.Popen(cmd, env=src_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[bytes], expect_rc: int = 0, out: Path | None = None) -> None:
    """Wait for a helper run; with ``out``, a gloo teardown abort after the run saved its final state passes
    (conftest.GLOO_TEARDOWN_ABORT)."""
    _, err = proc.communicate(timeout=300)
    text = err.decode()
    if out is not None and gloo_teardown_abort(proc.returncode, text) and (out / "final_state.pt").exists():
        return
    assert proc.returncode == expect_rc, text[-3000:]


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------- unit tests


def test_schedule_warmup_then_cosine() -> None:
    kw = dict(lr=1e-3, min_lr=1e-5, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # first update: lr / warmup, not 0
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # warm-up reaches the peak
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way: the mean
    assert lr_at(110, **kw) == pytest.approx(1e-5)
    assert lr_at(500, **kw) == pytest.approx(1e-5)  # past the end: stays at min_lr
    warm = [lr_at(s, **kw) for s in range(10)]
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert warm == sorted(warm) and decay == sorted(decay, reverse=True)

    # The LambdaLR drives the optimiser with exactly these values.
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, max_steps=110)
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for step in range(30):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, **kw))
        opt.step()
        sched.step()


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, 4, 8))
        self.embeddings = nn.Embedding(10, 8)
        self.ln_vision = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_no_decay_param_groups() -> None:
    decay, no_decay = split_decay_params(_Named())
    assert decay == ["proj.weight"]
    assert sorted(no_decay) == sorted(
        ["query_tokens", "embeddings.weight", "ln_vision.weight", "ln_vision.bias", "proj.bias", "temp"]
    )
    # LAVIS's rule (blip2.py get_optimizer_params): exempt only 1-d params and ".bias"; the 0-d temp is decayed
    decay, no_decay = split_decay_params(_Named(), "lavis")
    assert sorted(decay) == ["embeddings.weight", "proj.weight", "query_tokens", "temp"]
    assert sorted(no_decay) == ["ln_vision.bias", "ln_vision.weight", "proj.bias"]

    opt = build_optimizer(_Named(), TrainConfig(weight_decay=0.05))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == 7  # the frozen layer is not optimised
    assert opt.defaults["betas"] == (0.9, 0.98)


def test_lr_multipliers_scale_their_parameters_through_the_schedule() -> None:
    model = _Named()
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=20, lr_multipliers={"proj": 10.0, "proj.bias": 3})
    opt = build_optimizer(model, cfg)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(model.proj.weight)] == pytest.approx(1e-2)
    assert lr_of[id(model.proj.bias)] == pytest.approx(3e-3)  # the longest prefix wins
    assert lr_of[id(model.query_tokens)] == pytest.approx(1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the logged lr is the unscaled one
    sched = build_scheduler(opt, cfg)
    for step in range(6):
        base = lr_at(step, lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=20)
        lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert lrs[id(model.proj.weight)] == pytest.approx(10 * base)
        assert lrs[id(model.temp)] == pytest.approx(base)
        opt.step()
        sched.step()


def test_lr_multipliers_bad_input() -> None:
    with pytest.raises(ValueError, match="no trainable parameter name starts with 'projection'"):
        build_optimizer(_Named(), TrainConfig(lr_multipliers={"projection": 2.0}))
    with pytest.raises(ValueError, match="must be a positive number"):
        TrainConfig(lr_multipliers={"proj": 0})
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_optimizer(_Named(), TrainConfig(lr_multipliers={"frozen": 2.0}))  # frozen: not trained


def test_grad_accumulation_matches_big_batch(tmp_path: Path) -> None:
    results = {}
    for name, batch, accum in (("accum", 4, 2), ("big", 8, 1)):
        model, dataset = build()
        run_training(_cfg(tmp_path / name, batch_size=batch, grad_accum_steps=accum), model, dataset, collate)
        results[name] = model.state_dict()
    for key, value in results["big"].items():
        torch.testing.assert_close(results["accum"][key], value, atol=1e-6, rtol=0)


def test_frozen_params_unchanged_and_loss_falls(tmp_path: Path) -> None:
    model, dataset = build(dropout=0.1, augment=True)
    frozen_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    trainable_before = model.fc1.weight.detach().clone()
    metrics = run_training(
        _cfg(tmp_path, max_steps=80, batch_size=8, lr=2e-2, warmup_steps=5, log_every=10, save_every=40),
        model,
        dataset,
        collate,
        rng_generators={"augment": dataset.generator},
    )

    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    assert not torch.equal(model.fc1.weight, trainable_before)
    assert not model.encoder.training and model.fc1.training

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 81, 10))
    assert rows[-1]["loss"] < rows[0]["loss"] / 2  # observed: 5.5 -> 1.8
    assert metrics == rows[-1]
    assert {"loss", "loss_mse", "loss_l1", "lr", "grad_norm", "samples_per_s", "elapsed_s"} <= set(rows[0])
    assert (tmp_path / "losses.png").stat().st_size > 0

    # The checkpoint holds only trainable state, loads with weights_only, and a torn write is ignored.
    (tmp_path / "checkpoints" / ".step_00000099.pt.tmp").write_bytes(b"half a checkpoint")
    found = resume_checkpoint(True, tmp_path)
    assert found is not None and found[0].name == "step_00000080.pt"
    state = found[1]
    assert state["step"] == 80 and not any(k.startswith("encoder.") for k in state["model"])
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda", "generators"}
    # 36 samples -> 4 batches of 8 per epoch; epoch 19 is used up, epoch 20 not yet started.
    assert state["data"] == {"epoch": 19, "samples_in_epoch": 32}


def test_resumed_run_at_max_steps_is_a_no_op(tmp_path: Path) -> None:
    model, dataset = build()
    first = run_training(_cfg(tmp_path, max_steps=3), model, dataset, collate)
    model2, dataset2 = build()
    with torch.no_grad():
        model2.fc1.weight.add_(1.0)  # so equality below proves the checkpoint was loaded
    again = run_training(_cfg(tmp_path, max_steps=3, resume=True), model2, dataset2, collate)
    assert again == first
    for key, value in model.state_dict().items():
        assert torch.equal(model2.state_dict()[key], value)
    with pytest.raises(OutputDirError, match="pass resume=true"):  # a fresh run must not clobber it
        run_training(_cfg(tmp_path, max_steps=3), ToyRegressor(), ToyDataset(), collate)


# ------------------------------------------------------------------------------------- subprocesses


@pytest.mark.multiprocess
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """Dropout + generator-driven augmentation + shuffling + accumulation + an epoch boundary in between."""
    common = ["--steps", "10", "--accum", "2", "--save-every", "3", "--dropout", "0.3", "--augment"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    runs = [_helper(full, *common), _helper(killed, *common, "--kill-after-step", "5")]
    _finish(runs[0])
    _finish(runs[1], expect_rc=-signal.SIGKILL)
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000003.pt"
    assert _steps(killed) == [1, 2, 3, 4, 5]
    assert not (killed / "final_state.pt").exists()

    _finish(_helper(killed, *common, "--resume"))
    assert _steps(killed) == list(range(1, 11))  # resumed at 3 (lines 4-5 of the killed run dropped)

    expected = torch.load(full / "final_state.pt", weights_only=True)
    got = torch.load(killed / "final_state.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # Optimiser moments too: the resumed run is the same run, not just close.
    opt_full = load_checkpoint(full / "checkpoints" / "step_00000010.pt")["optimizer"]["state"]
    opt_killed = load_checkpoint(killed / "checkpoints" / "step_00000010.pt")["optimizer"]["state"]
    for index, moments in opt_full.items():
        assert torch.equal(opt_killed[index]["exp_avg"], moments["exp_avg"])
        assert torch.equal(opt_killed[index]["exp_avg_sq"], moments["exp_avg_sq"])


@pytest.mark.multiprocess
def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    """gloo, 2 ranks x batch 4 vs 1 process x batch 8, with accumulation and an epoch boundary.

    Same samples in every global batch (the sampler interleaves ranks), so only float summation order
    differs: parameters agree to atol 1e-6 (observed differences ~3e-8).
    """
    common = ["--steps", "8", "--accum", "2", "--save-every", "4"]
    two = tmp_path / "two"
    cmd = torchrun_command(HELPER, "--out", str(two), "--batch-size", "4", *common)
    proc = subprocess.Popen(cmd, env=src_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    one = _helper(tmp_path / "one", "--batch-size", "8", *common)
    _finish(proc, out=two)
    _finish(one)

    expected = torch.load(tmp_path / "one" / "final_state.pt", weights_only=True)
    got = torch.load(two / "final_state.pt", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0)
    assert _steps(two) == list(range(1, 9))  # rank 0 alone writes metrics
    assert sorted(p.name for p in (two / "checkpoints").glob("*.pt")) == ["step_00000004.pt", "step_00000008.pt"]
    state = load_checkpoint(two / "checkpoints" / "step_00000008.pt")
    assert len(state["rng"]) == 2 and state["world_size"] == 2
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    rows_one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in rows_one], rel=1e-5)


@pytest.mark.multiprocess
def test_two_ranks_skip_empty_batches_together_and_resume_exactly(tmp_path: Path) -> None:
    """Half the items unreadable, batch 1 per rank: often one rank's micro-batch is empty and the other's is
    not. The ranks skip such a batch together, so they stay at the same data position (the checkpoint holds
    one position for all ranks): a 2-process run killed after step 5 (checkpoint at 4) and resumed ends
    bit-identical to an uninterrupted one, every step on real samples (no NaN)."""

    def launch(out: Path, *extra: str) -> subprocess.Popen[bytes]:
        args = ["--out", str(out), "--batch-size", "1", "--steps", "10", "--save-every", "4", "--unreadable-every", "2"]
        cmd = torchrun_command(HELPER, *args, *extra)
        return subprocess.Popen(cmd, env=src_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    full, killed = tmp_path / "full", tmp_path / "killed"
    first = launch(full)
    _, err = first.communicate(timeout=300)
    finished = (full / "final_state.pt").exists() and gloo_teardown_abort(first.returncode, err.decode())
    assert first.returncode == 0 or finished, err.decode()[-3000:]
    assert "no readable sample on another rank" in err.decode()  # the case this test is about happened
    crashed = launch(killed, "--kill-after-step", "5")
    crashed.communicate(timeout=300)
    assert crashed.returncode != 0 and not (killed / "final_state.pt").exists()
    _finish(launch(killed, "--resume"), out=killed)

    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11)) and all(math.isfinite(r["loss"]) for r in rows)
    assert _steps(killed) == list(range(1, 11))
    expected = torch.load(full / "final_state.pt", weights_only=True)
    got = torch.load(killed / "final_state.pt", weights_only=True)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# ------------------------------------------------------------------------------------------- config


def test_config_overrides_and_unknown_keys(tmp_path: Path) -> None:
    recipe = tmp_path / "stage1.yaml"
    recipe.write_text(
        "output_dir: runs/x\nmax_steps: 100\nlr: 1e-4\nprecision: bf16\n"
        "model:\n  preset: tiny\n  stage: 1\n"
        "data:\n  kind: coco\n  annotations: /data/coco.json\n  shuffle: 10\n"
    )
    cfg = load_config(
        recipe,
        [
            "lr=3e-4",
            "max_steps=7",
            "betas=[0.9, 0.99]",
            "resume=true",
            "model.stage=2",
            "data.max_length=16",
        ],
    )
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)  # YAML reads 1e-4 as a string: coerced
    assert cfg.max_steps == 7 and cfg.betas == (0.9, 0.99) and cfg.resume is True
    assert cfg.model.preset == "tiny" and cfg.model.stage == 2
    assert cfg.data.kind == "coco" and cfg.data.max_length == 16
    assert cfg.data.shuffle_buffer == 10  # the old name of the webdataset shuffle buffer is still read
    assert apply_overrides(cfg, ["resume=runs/x/checkpoints"]).resume == "runs/x/checkpoints"

    with pytest.raises(TrainConfigError, match="'learning_rate'"):
        load_config(recipe, ["learning_rate=1"])
    with pytest.raises(TrainConfigError, match="only model.<key> and data.<key>"):
        load_config(recipe, ["lr.x=1"])
    with pytest.raises(TrainConfigError, match="unknown training option model.'qformer'"):
        load_config(recipe, ["model.qformer=2"])  # was silently ignored by the recipe builder
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(recipe, ["lr"])
    with pytest.raises(ValueError, match="max_steps must be an integer"):
        load_config(recipe, ["max_steps=ten"])
    with pytest.raises(ValueError, match="precision must be one of"):
        load_config(recipe, ["precision=fp8"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 10\n")
    with pytest.raises(TrainConfigError, match="unknown training option 'max_step' in .*bad.yaml"):
        load_config(bad)


def test_bad_model_output_and_batch_are_named(tmp_path: Path) -> None:
    class NoLoss(ToyRegressor):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
            return {"logits": x}

    with pytest.raises(TypeError, match="scalar tensor `.loss`"):
        run_training(_cfg(tmp_path / "a"), NoLoss(), ToyDataset(), collate)
    with pytest.raises(TypeError, match="collate_fn must return a dict"):
        run_training(_cfg(tmp_path / "b"), ToyRegressor(), ToyDataset(), lambda items: items)
    frozen = ToyRegressor().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        run_training(_cfg(tmp_path / "c"), frozen, ToyDataset(), collate)
    with pytest.raises(ValueError, match="fewer than one optimiser step"):
        run_training(_cfg(tmp_path / "d", batch_size=64), ToyRegressor(), ToyDataset(), collate)
    assert math.isfinite(lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=1))


def test_iterable_dataset_runs_across_epochs(tmp_path: Path) -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __init__(self) -> None:
            self.items = ToyDataset(num_samples=10)

        def __iter__(self) -> Iterator[dict[str, Any]]:
            return (self.items[i] for i in range(len(self.items)))

    metrics = run_training(_cfg(tmp_path, max_steps=5), ToyRegressor(), Stream(), collate)
    assert metrics["step"] == 5  # 2 batches of 4 per pass (tail dropped): three passes
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000005.pt")["data"]["epoch"] == 2


# ------------------------------------------------------------------------- failures a user can cause


def test_resume_skips_a_truncated_latest_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A truncated newest checkpoint (disk full, a bad copy) is passed over, with a warning naming it, for the
    newest one that loads; with every checkpoint damaged, resume fails in one line naming the folder."""
    model, dataset = build()
    run_training(_cfg(tmp_path, max_steps=4, save_every=2), model, dataset, collate)
    ckpts = tmp_path / "checkpoints"
    latest = ckpts / "step_00000004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated mid-write by something outside our control

    model2, dataset2 = build()
    with caplog.at_level("WARNING"):
        metrics = run_training(_cfg(tmp_path, max_steps=6, save_every=2, resume=True), model2, dataset2, collate)
    assert metrics["step"] == 6
    assert any("step_00000004.pt" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]  # resumed at 2: lines 3-4 of the first run dropped

    for path in ckpts.glob("step_*.pt"):
        path.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match="no valid checkpoint to resume from in .*checkpoints") as err:
        run_training(_cfg(tmp_path, max_steps=8, resume=True), ToyRegressor(), ToyDataset(), collate)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="step_00000006.pt is unreadable"):  # a file named explicitly
        resume_checkpoint(str(ckpts / "step_00000006.pt"), tmp_path)


def test_divergence_stops_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model, dataset = build()
    cfg = _cfg(tmp_path, max_steps=200, lr=1e6, min_lr=0.0, warmup_steps=0, save_every=1, log_every=5)
    with pytest.raises(TrainingDivergedError) as err:
        run_training(cfg, model, dataset, collate)
    message = str(err.value)
    assert "\n" not in message and "lower lr (now 1e+06)" in message and "warmup_steps" in message
    assert "precision" not in message  # a CPU fp32 run: no precision advice
    ckpts = sorted((tmp_path / "checkpoints").glob("step_*.pt"))
    step = int(message.split("first non-finite loss at step ")[1].split(")")[0])
    assert ckpts and ckpts[-1].name == f"step_{step - 1:08d}.pt" and f"kept {ckpts[-1]}" in message
    state = load_checkpoint(ckpts[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values())  # never overwritten with NaN weights


def test_config_mistakes_raise_one_error_type(tmp_path: Path) -> None:
    """What the CLI turns into one line: a YAML syntax error, a typo'd key (file or override), a bad device."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("max_steps: 10\nlr: [1e-4\n")
    with pytest.raises(TrainConfigError, match=r"broken.yaml is not valid YAML: .* line \d+"):
        load_config(broken)
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("max_steps: 10\n")
    with pytest.raises(
        TrainConfigError, match="unknown training option 'max_stepz' in overrides; did you mean max_steps"
    ):
        load_config(recipe, ["max_stepz=2"])
    with pytest.raises(TrainConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(TrainConfigError, match="'banana' is not a device"):
        run_training(_cfg(tmp_path / "a", device="banana"), ToyRegressor(), ToyDataset(), collate)
    if not torch.cuda.is_available():
        with pytest.raises(TrainConfigError, match="no usable CUDA GPU: use device=cpu"):
            run_training(_cfg(tmp_path / "b", device="cuda"), ToyRegressor(), ToyDataset(), collate)
    assert not (tmp_path / "a").exists()  # checked before anything is written


def test_bad_output_dirs_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="lies inside the file .*a_file"):
        run_training(_cfg(blocker / "run"), ToyRegressor(), ToyDataset(), collate)
    with pytest.raises(OutputDirError, match="a_file is a file, not a folder"):
        run_training(_cfg(blocker), ToyRegressor(), ToyDataset(), collate)

    def refuse(self: Path, data: bytes) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)  # as if the folder were read-only (tests may run as root)
    with pytest.raises(OutputDirError, match="is not writable \\(Permission denied\\): choose a folder"):
        run_training(_cfg(tmp_path / "ro"), ToyRegressor(), ToyDataset(), collate)


def test_every_sample_unreadable_is_a_data_error(tmp_path: Path) -> None:
    dataset = ToyDataset()
    dataset.unreadable = frozenset(range(len(dataset)))
    with pytest.raises(TrainDataError, match="no readable sample: check that the training images"):
        run_training(_cfg(tmp_path), ToyRegressor(), dataset, collate)


def test_lavis_epoch_cosine_schedule() -> None:
    """LAVIS linear_warmup_cosine_lr: warm-up from warmup_lr in epoch 0 only (capped at the peak), then one
    cosine value per epoch."""
    kw = dict(lr=1e-4, min_lr=1e-5, warmup_steps=4, max_steps=30, warmup_start_lr=1e-6)
    lavis = dict(kw, schedule="lavis_epoch_cosine", steps_per_epoch=10)
    assert lr_at(0, **lavis) == pytest.approx(1e-6)  # LAVIS's first update runs at warmup_lr
    assert lr_at(2, **lavis) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 2 / 4)
    assert [lr_at(s, **lavis) for s in (4, 9)] == pytest.approx([1e-4, 1e-4])  # rest of epoch 0: the peak
    epoch1 = 1e-5 + (1e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 1 / 3))
    assert [lr_at(s, **lavis) for s in (10, 19)] == pytest.approx([epoch1, epoch1])  # constant in an epoch
    assert lr_at(0, **kw) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 4)  # per step: warm-up from warmup_start_lr

    cfg = TrainConfig(lr=1e-4, min_lr=1e-5, warmup_steps=4, max_steps=30, lr_schedule="lavis_epoch_cosine")
    with pytest.raises(TrainConfigError, match="set steps_per_epoch"):
        build_scheduler(build_optimizer(nn.Linear(2, 2), cfg), cfg)  # streamed data has no length
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    for step in range(25):
        expected = lr_at(step, **dict(kw, warmup_start_lr=0.0), schedule="lavis_epoch_cosine", steps_per_epoch=10)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected)
        opt.step()
        sched.step()


def test_lavis_settings_reach_the_optimiser() -> None:
    cfg = TrainConfig(betas=(0.9, 0.999), weight_decay_rule="lavis", grad_clip=None)
    model = _Named()
    opt = build_optimizer(model, cfg)
    assert opt.defaults["betas"] == (0.9, 0.999)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.temp) in decayed and id(model.query_tokens) in decayed
    assert id(model.ln_vision.weight) not in decayed
    with pytest.raises(TrainConfigError, match="grad_clip must be > 0 or null"):
        TrainConfig(grad_clip=0)


def test_deterministic_mode_is_on_during_the_run_and_restored_after(tmp_path: Path) -> None:
    seen: list[bool] = []
    assert not torch.are_deterministic_algorithms_enabled()
    run_training(
        _cfg(tmp_path, max_steps=2),
        ToyRegressor(),
        ToyDataset(),
        collate,
        callbacks=[lambda step, m: seen.append(torch.are_deterministic_algorithms_enabled())],
    )
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()
    seen.clear()
    run_training(
        _cfg(tmp_path / "b", max_steps=1, deterministic=False),
        ToyRegressor(),
        ToyDataset(),
        collate,
        callbacks=[lambda step, m: seen.append(torch.are_deterministic_algorithms_enabled())],
    )
    assert seen == [False]


def test_a_renamed_key_given_as_an_override_is_applied(caplog: pytest.LogCaptureFixture) -> None:
    """`data.shuffle` (the old name of data.shuffle_buffer) given on the command line wins over the default."""
    cfg = apply_overrides(TrainConfig(), ["data.shuffle=0"])
    assert cfg.data.shuffle_buffer == 0


def test_a_qformer_init_that_is_neither_a_folder_nor_downloadable_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blip2.train.recipes import build_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrainConfigError, match="model.qformer_init 'no-such-bert' is not a local folder"):
        build_model({"stage": 1, "preset": "tiny-stage1", "qformer_init": "no-such-bert"})
