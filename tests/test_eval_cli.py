"""`blip2 eval`: the authors' protocol by default (per LLM family), malformed files and unwritable outputs
as one line naming the problem, before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import blip2.eval.runner as runner
from blip2.cli import build_parser
from blip2.cli import main as cli_main
from blip2.config import CAPTION_DEFAULTS, LAVIS_VQA_PROMPT
from blip2.eval.loaders import EvalDataError, load_coco_captions, load_vqa
from blip2.eval.protocol import eval_protocol
from blip2.eval.runner import run_eval

# ------------------------------------------------------------------------------------------------ protocol


class AnswerSpy:
    """Stands in for a `Blip2` of one LLM family: records what the evaluation asks, answers "yes"."""

    def __init__(self, llm_kind: str) -> None:
        self.config = SimpleNamespace(llm=SimpleNamespace(kind=llm_kind))
        self.calls: list[dict[str, Any]] = []

    def answer(self, images: list[str], questions: list[str], prompt_template: str, **kwargs: Any) -> list[str]:
        self.calls.append({"questions": list(questions), "template": prompt_template, **kwargs})
        return ["yes"] * len(questions)


def write_vqa(folder: Path, questions: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    q_path, a_path = folder / "questions.json", folder / "annotations.json"
    q_path.write_text(json.dumps({"questions": questions}))
    a_path.write_text(json.dumps({"annotations": annotations}))
    return q_path, a_path


@pytest.fixture
def vqa_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    (tmp_path / "7.jpg").write_bytes(b"")  # only looked up, never decoded: the spy does not read images
    questions = [{"question_id": 1, "image_id": 7, "question": "Is the Dog (left) brown?!"}]
    annotations = [{"question_id": 1, "image_id": 7, "answers": [{"answer": "yes"}] * 10}]
    q_path, a_path = write_vqa(tmp_path, questions, annotations)
    return q_path, a_path, tmp_path


# LAVIS vqav2_zeroshot_{opt,flant5xl}_eval.yaml + predict_answers defaults (blip2_opt.py: 0, blip2_t5.py: -1).
AUTHORS_VQA = {
    "decoder": {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0},
    "encoder_decoder": {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 0, "length_penalty": -1.0},
}


@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder"])
def test_run_eval_answers_with_the_authors_settings_by_default(kind: str, vqa_files: tuple[Path, Path, Path]) -> None:
    q_path, a_path, folder = vqa_files
    model = AnswerSpy(kind)
    result = run_eval(model=model, vqa_questions=q_path, vqa_annotations=a_path, images=folder, progress=False)
    (call,) = model.calls
    assert call["template"] == LAVIS_VQA_PROMPT == "Question: {} Short answer:"
    assert call["questions"] == ["is the dog left brown?"]
    assert {k: call[k] for k in AUTHORS_VQA[kind]} == AUTHORS_VQA[kind]
    assert result["vqa"]["overall"] == 1.0


def test_protocols_per_llm_family() -> None:
    for kind, generation in AUTHORS_VQA.items():
        lavis = eval_protocol(kind)
        assert (lavis.vqa_template, lavis.vqa_generation, lavis.clean_questions) == (LAVIS_VQA_PROMPT, generation, True)
        assert lavis.retrieval_k == 128 and lavis.caption_generation == CAPTION_DEFAULTS
        fast = eval_protocol(kind, "fast")
        assert fast.retrieval_k == 16 and fast.vqa_generation == generation | {"num_beams": 1}
        assert fast.caption_generation["num_beams"] == 1 and fast.vqa_template == LAVIS_VQA_PROMPT
    with pytest.raises(ValueError, match="protocol 'paper'"):
        eval_protocol("decoder", "paper")


def test_retrieval_reranks_the_top_128_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    import blip2.inference.tasks as tasks

    asked: list[int] = []

    def fake_retrieve(model: Any, images: list[str], texts: list[str], k: int, batch_size: int) -> dict[str, Any]:
        asked.append(k)
        scores = torch.zeros(len(images), len(texts))
        return {"itc": scores, "i2t": scores, "t2i": scores.T}

    monkeypatch.setattr(tasks, "retrieve", fake_retrieve)
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(2)]
    annotations = [{"image_id": i, "caption": "a cat"} for i in range(2)]
    (tmp_path / "c.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    result = run_eval(retrieval_model=object(), coco_captions=tmp_path / "c.json", images=tmp_path)
    assert asked == [128] and result["retrieval"]["k"] == 128


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"beams": 5, "k": 128, "lp": -1.0}),
        (["--protocol", "fast"], {"beams": 1, "k": 16, "lp": -1.0}),
        (["--num-beams", "3", "--retrieval-k", "32"], {"beams": 3, "k": 32, "lp": -1.0}),
    ],
)
def test_eval_command_follows_the_protocol_of_the_models_family(
    flags: list[str], expected: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def fake_run_eval(**kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        return {"retrieval": None, "captions": None, "vqa": None}

    monkeypatch.setattr(runner, "_load_models", lambda model, retrieval, device: (AnswerSpy("encoder_decoder"), None))
    monkeypatch.setattr(runner, "run_eval", fake_run_eval)
    assert cli_main(["eval", "--model", "flan-t5-model", *flags]) == 0
    assert seen["vqa_generation"]["num_beams"] == seen["caption_generation"]["num_beams"] == expected["beams"]
    assert seen["vqa_generation"]["length_penalty"] == expected["lp"]
    assert seen["retrieval_k"] == expected["k"] and seen["vqa_template"] == LAVIS_VQA_PROMPT
    assert seen["clean_questions"] is True
    args = build_parser().parse_args(["eval"])
    assert (args.protocol, args.retrieval_k, args.num_beams, args.vqa_template) == ("lavis", None, None, None)


# ------------------------------------------------------------------------------------------ malformed files

IMAGE = {"id": 1, "file_name": "1.jpg"}
CAPTION = {"id": 5, "image_id": 1, "caption": "a cat"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"images": [{"file_name": "1.jpg"}], "annotations": []}, r"images\[0\] has no 'id'"),
        ({"images": "1.jpg", "annotations": []}, r"'images' must be a list of records, got str"),
        ({"images": [IMAGE], "annotations": [{"id": 5, "image_id": 1}]}, r"annotations\[0\] \(id 5\) has no 'caption'"),
        ({"images": [IMAGE], "annotations": [CAPTION | {"caption": 3}]}, r"\(id 5\) has 'caption' of type int"),
        ({"images": [IMAGE, 7], "annotations": []}, r"images\[1\] must be a JSON object, got int"),
        ({"images": [{"id": [1]}], "annotations": []}, r"images\[0\] has 'id' of type list; it must be int or str"),
        ({"images": [IMAGE], "annotations": [CAPTION | {"image_id": 2}]}, r"refers to image 2, which 'images'"),
    ],
)
def test_malformed_coco_caption_files_name_file_and_record(content: Any, message: str, tmp_path: Path) -> None:
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(content))
    with pytest.raises(EvalDataError, match=message) as info:
        load_coco_captions(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


QUESTION = {"question_id": 3, "image_id": 1, "question": "what?"}
ANSWERED = {"question_id": 3, "image_id": 1, "answers": ["yes"]}


@pytest.mark.parametrize(
    ("questions", "annotations", "bad_file", "message"),
    [
        ([{"image_id": 1, "question": "what?"}], [], "questions", r"questions\[0\] has no 'question_id'"),
        ([QUESTION | {"question": None}], [], "questions", r"\(question id 3\) has 'question' of type NoneType"),
        ([QUESTION], [ANSWERED | {"answers": 4}], "annotations", r"\(question id 3\) has 'answers' of type int"),
        ([QUESTION], [ANSWERED | {"answers": []}], "annotations", r"\(question id 3\) has an empty 'answers'"),
        ([QUESTION], [ANSWERED | {"answers": [{"a": 1}]}], "annotations", r"answers\[0\] must be a string"),
        ([QUESTION], [{"image_id": 1, "answers": ["y"]}], "annotations", r"annotations\[0\] has no 'question_id'"),
        ([QUESTION], [ANSWERED | {"question_id": 9}], "annotations", r"question id 9 is not in"),
    ],
)
def test_malformed_vqa_files_name_file_and_record(
    questions: list[Any], annotations: list[Any], bad_file: str, message: str, tmp_path: Path
) -> None:
    q_path, a_path = write_vqa(tmp_path, questions, annotations)
    with pytest.raises(EvalDataError, match=message) as info:
        load_vqa(q_path, a_path)
    assert str(info.value).startswith(f"{tmp_path / bad_file}.json: ")


def test_eval_command_checks_the_files_before_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "_load_models", lambda *a: pytest.fail("a model loaded before the files were checked"))
    q_path, a_path = write_vqa(tmp_path, [QUESTION], [ANSWERED | {"answers": 4}])
    args = ["eval", "--vqa-questions", str(q_path), "--vqa-annotations", str(a_path), "--images", str(tmp_path)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"blip2 eval: error: {a_path}: annotations[0] (question id 3) has 'answers' of type int; it must be list"
    )


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--num-beams", "0", "argument --num-beams: must be at least 1, got 0"),
        ("--retrieval-k", "-1", "argument --retrieval-k: must be at least 1, got -1"),
        ("--max-images", "0", "argument --max-images: must be at least 1, got 0"),
        ("--vqa-template", "Q: {}{} A:", "argument --vqa-template: a question template must hold exactly one '{}'"),
        ("--vqa-template", "Q: A:", "argument --vqa-template: a question template must hold exactly one '{}'"),
        ("--vqa-template", "Q: {0 A:", "argument --vqa-template: a question template must hold exactly one '{}'"),
    ],
)
def test_bad_flag_values_are_rejected_before_loading(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "_load_models", lambda *a: pytest.fail("a model loaded before the flags were checked"))
    with pytest.raises(SystemExit) as exit_info:  # argparse: a usage line and the error, exit status 2
        cli_main(["eval", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_negative_answer_words_is_rejected_before_loading(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "_load_models", lambda *a: pytest.fail("a model loaded before the flags were checked"))
    assert cli_main(["eval", "--answer-words", "-2"]) == 2
    assert capsys.readouterr().err == "blip2 eval: error: --answer-words must be 0 (keep every word) or more, got -2\n"


def test_the_runner_imports_the_scenes_only_when_they_are_evaluated() -> None:
    code = "import sys, blip2.cli, blip2.eval.runner; print(sorted(m for m in sys.modules if 'scenes' in m))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------- --output


def test_output_folder_or_unwritable_path_is_rejected_before_evaluating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "evaluate_from_paths", lambda *a, **k: pytest.fail("evaluated before checking"))
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    for output, message in ((tmp_path, "is a folder; give a file name"), (a_file / "m.json", "cannot be written")):
        assert cli_main(["eval", "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the probe left nothing


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tmp_path.chmod(0o500)
    try:
        assert cli_main(["eval", "--output", str(tmp_path / "m.json")]) == 2
    finally:
        tmp_path.chmod(0o700)
    assert "cannot be written" in capsys.readouterr().err


def test_a_late_write_failure_still_prints_the_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "results"
    metrics = {"retrieval": None, "captions": None, "vqa": {"overall": 0.625, "per_type": {"color": 0.625}}}

    def evaluate_then_lose_the_folder(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out_dir.rmdir()  # the folder disappears while the evaluation runs, and a file takes its name
        out_dir.write_text("")
        return metrics

    monkeypatch.setattr(runner, "evaluate_from_paths", evaluate_then_lose_the_folder)
    assert cli_main(["eval", "--output", str(out_dir / "m.json")]) == 2
    captured = capsys.readouterr()
    assert "vqa: overall=0.625 (color=0.625)" in captured.out
    assert "could not write --output" in captured.err and captured.err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_results_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.json"
    out.write_text('{"old": true}')

    def failing_dump(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner.json, "dump", failing_dump)
    with pytest.raises(runner.EvalOutputError, match="No space left on device"):
        runner.write_results({"vqa": None}, out)
    assert out.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["m.json"]
    monkeypatch.undo()
    runner.write_results({"vqa": {"overall": 1.0}}, out)
    assert json.loads(out.read_text()) == {"vqa": {"overall": 1.0}}


def test_eval_command_end_to_end_on_a_tiny_flan_t5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A saved encoder-decoder model evaluated with the defaults: the authors' T5 settings reach generation,
    and the results file holds every prediction and the settings used."""
    from blip2.data.scene_files import write_split
    from blip2.testing import make_tiny_model

    split = write_split(tmp_path, "test", 2, seed=1, image_size=32)
    make_tiny_model(tmp_path / "t5", llm="t5")
    folder = tmp_path / "by_id"  # VQA files name images by id only: "{id}.png" in the --images folder
    folder.mkdir()
    for image_id in (0, 1):
        (folder / f"{image_id}.png").write_bytes((split / "images" / f"test_{image_id:06d}.png").read_bytes())
    out = tmp_path / "results" / "eval.json"
    args = ["eval", "--model", str(tmp_path / "t5"), "--images", str(folder), "--output", str(out)]
    args += [
        "--vqa-questions",
        str(split / "vqa_questions.json"),
        "--vqa-annotations",
        str(split / "vqa_annotations.json"),
    ]
    assert cli_main(args) == 0
    assert "vqa: overall=" in capsys.readouterr().out
    result = json.loads(out.read_text())
    _, annotations = load_vqa(split / "vqa_questions.json", split / "vqa_annotations.json")
    assert len(result["vqa"]["raw_answers"]) == result["vqa"]["n_questions"] == len(annotations)
    assert result["protocol"]["vqa_generation"] == AUTHORS_VQA["encoder_decoder"]
    assert result["protocol"]["retrieval_k"] == 128 and result["captions"] is None
