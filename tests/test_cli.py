"""The command line: a user's mistake ends in one line and exit status 2, checked before any model loads;
a bug keeps its traceback (always with --debug or BLIP2_DEBUG=1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip2 import cli
from blip2.cli import main


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flag checks must come first: loading a model here fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr("blip2.checkpoints.load_for_inference", refuse)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["caption", "a.jpg", "--num-beams", "0"], "must be at least 1, got 0"),
        (["caption", "a.jpg", "--max-new-tokens", "-3"], "must be at least 1, got -3"),
        (["caption", "a.jpg", "--num-beams", "five"], "expected a whole number"),
        (["caption", "a.jpg", "--device", "banana"], "unknown device 'banana'"),
        (["ask", "a.jpg", "q?", "--template", "{}{}"], "exactly one '{}'"),
        (["ask", "a.jpg", "q?", "--template", "Question: Answer:"], "exactly one '{}'"),
        (["ask", "a.jpg", "q?", "--template", "Q: {} {0}"], "exactly one '{}'"),
        (["serve", "--max-upload-mb", "0"], "must be positive"),
    ],
)
def test_bad_flags_give_one_usage_line_and_exit_2(
    argv: list[str], expected: str, no_model_load: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_before_loading(no_model_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "a.jpg", "q?", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available here" in capsys.readouterr().err


def test_a_good_template_is_kept() -> None:
    assert cli.question_template("Question: {} Short answer:") == "Question: {} Short answer:"


def test_user_errors_are_one_line_bugs_keep_their_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        PermissionError(13, "Permission denied", "/root/x"): "blip2 demo: error: Permission denied: '/root/x'",
        ValueError(
            "the recipe's model section\n needs a 'preset'"
        ): "error: the recipe's model section needs a 'preset'",
        FloatingPointError("loss is nan at step 3; lower lr"): "error: loss is nan at step 3; lower lr",
    }
    for exc, expected in cases.items():
        monkeypatch.setitem(cli.COMMANDS, "demo", cli.Command("", cli._demo_arguments, _raiser(exc)))
        assert main(["demo", "--quick"]) == 2
        err = capsys.readouterr().err
        assert err.strip() == err.strip().splitlines()[0] and expected in err
    monkeypatch.setitem(cli.COMMANDS, "demo", cli.Command("", cli._demo_arguments, _raiser(KeyError("bug"))))
    with pytest.raises(KeyError):  # a bug is not dressed up as a user error
        main(["demo", "--quick"])
    monkeypatch.setitem(cli.COMMANDS, "demo", cli.Command("", cli._demo_arguments, _raiser(ValueError("bad"))))
    with pytest.raises(ValueError):
        main(["--debug", "demo", "--quick"])
    monkeypatch.setenv(cli.DEBUG_ENV_VAR, "1")
    with pytest.raises(ValueError):
        main(["demo", "--quick"])


def _raiser(exc: BaseException):  # noqa: ANN202
    def run(args: object) -> None:
        raise exc

    return run


def test_yaml_syntax_error_in_a_recipe_is_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("max_steps: [1, 2\nlr: 1e-4\n")
    result = subprocess.run(
        [sys.executable, "-m", "blip2.cli", "train", "--config", str(recipe)], capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert f"{recipe} is not valid YAML" in result.stderr and "line 2" in result.stderr
