"""Shared test fixtures: image files and bytes, tiny model directories, and the torchrun launcher.

Markers (pyproject.toml) sort tests by cost: ``slow`` (minutes; not in the default run), ``multiprocess``
(gloo / torchrun subprocesses), ``browser`` (headless Chromium). The fast core runs in about 50 s:
``pytest -m "not slow and not multiprocess and not browser"``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

Colour = tuple[int, ...] | str


def image_bytes(
    size: tuple[int, int] = (48, 40), colour: Colour = (200, 30, 30), fmt: str = "PNG", mode: str = "RGB"
) -> bytes:
    """An encoded image of one colour (e.g. ``image_bytes(fmt="JPEG")``)."""
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def image_file(tmp_path: Path) -> Callable[..., Path]:
    """``image_file(name="ok.jpg", size=(40, 30), colour=(10, 200, 30), mode="RGB")``: a one-colour image file
    in the test's folder, encoded by the name's extension."""

    def make(
        name: str = "ok.jpg", size: tuple[int, int] = (40, 30), colour: Colour = (10, 200, 30), mode: str = "RGB"
    ) -> Path:
        path = tmp_path / name
        if mode != "RGB" and isinstance(colour, tuple):
            colour = (colour + (0,) * 4)[: len(mode)]
        Image.new(mode, size, colour).save(path)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str | None], Path]:
    """``tiny_model_dir("opt" | "t5" | None)``: a saved tiny random model (stage 2 with that LLM, or stage 1),
    made once per session; treat it as read-only."""
    from blip2.testing import make_tiny_model

    made: dict[str | None, Path] = {}

    def get(llm: str | None = "opt") -> Path:
        if llm not in made:
            made[llm] = tmp_path_factory.mktemp(f"tiny-{llm or 'stage1'}")
            make_tiny_model(made[llm], llm=llm)
        return made[llm]

    return get


def tiny_train_config(output_dir: str | Path, **overrides: Any) -> Any:
    """A `blip2.train.config.TrainConfig` for tests: 6 steps of batch 4 on the CPU, fp32, no workers, logging
    every step, no intermediate checkpoints; any field can be overridden."""
    from blip2.train.config import TrainConfig

    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=6,
        batch_size=4,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=2,
        log_every=1,
        save_every=1000,
        num_workers=0,
        device="cpu",
        precision="fp32",
        seed=0,
    )
    return TrainConfig(**(values | overrides))


def torchrun_command(script: str | Path, *args: str, nproc: int = 2) -> list[str]:
    """The command that runs ``script`` (a path, or ``-m module``) under ``torch.distributed.run`` on ``nproc``
    local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(script),
        *args,
    ]


def src_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must import this checkout's ``blip2`` (its ``src`` first), outside
    any torchrun job the test itself might run in."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), **extra}
    env.pop("WORLD_SIZE", None)
    return env


# gloo (CPU) sometimes aborts one rank while the process group is torn down after all the work is done
# ("terminate called without an active exception", exit -6; about 1 run in 10 here, torch 2.13). It is a
# torch/gloo teardown race, not the code under test: the launchers below run such a job once more.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def gloo_teardown_abort(returncode: int, stderr: str) -> bool:
    return returncode != 0 and GLOO_TEARDOWN_ABORT in stderr


def run_torchrun(
    script: str | Path,
    *args: str,
    nproc: int = 2,
    timeout: float = 300,
    finished: Callable[[], bool] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` under torchrun and fail with every rank's error lines if it does not exit 0. A gloo
    teardown abort (`GLOO_TEARDOWN_ABORT`) passes when ``finished()`` shows the work was all done; without
    ``finished`` the job runs once more."""
    command = torchrun_command(script, *args, nproc=nproc)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=src_env())
    if gloo_teardown_abort(done.returncode, done.stderr):
        if finished is not None and finished():
            return done
        if finished is None:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=src_env())
    if done.returncode != 0:  # each rank's own error lines first: the tail shows only the rank that outlived the other
        errors = [line for line in done.stderr.splitlines() if "Error" in line or "terminate" in line]
        pytest.fail(f"torchrun exited {done.returncode}:\n" + "\n".join(errors[-40:]) + "\n" + done.stderr[-3000:])
    return done


def assert_one_line(text: str, *words: Sequence[str] | str) -> None:
    """An error output that is exactly one line, holding every one of ``words`` and no traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    for word in words:
        assert str(word) in lines[0], lines[0]
