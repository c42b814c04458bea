"""COCO caption and VQA annotation files, checked record by record, and an evaluation's data in one place.

A malformed file raises `EvalDataError` (a ValueError) naming the file, the record (its index and id) and
what is wrong, instead of a KeyError or TypeError from deep inside an evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict


class EvalDataError(ValueError):
    """An evaluation file is unreadable or not in the expected format."""


class EvalData(TypedDict):
    """What `blip2.eval.runner.run_eval` evaluates: image id → file, and the references that exist.

    ``references`` (image id → captions) is None without caption data; ``objects`` (image id → scene
    objects) only for synthetic scenes; ``questions`` / ``annotations`` (question id → record, as
    `load_vqa` returns them) None without VQA files.
    """

    paths: dict[Any, str]
    references: dict[Any, list[str]] | None
    objects: dict[Any, list[dict[str, Any]]] | None
    questions: dict[Any, dict[str, Any]] | None
    annotations: dict[Any, dict[str, Any]] | None


_ID_TYPES = (int, str)


def _read_json(path: str | Path, required: Sequence[str]) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalDataError(f"could not read {path}: {e}") from e
    if not isinstance(data, dict) or any(key not in data for key in required):
        raise EvalDataError(f"{path} is not in the expected format: it needs top-level keys {list(required)}")
    return data


def _records(path: str | Path, data: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    """``data[key]`` checked to be a list of JSON objects."""
    records = data[key]
    if not isinstance(records, list):
        raise EvalDataError(f"{path}: '{key}' must be a list of records, got {type(records).__name__}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise EvalDataError(f"{path}: {key}[{index}] must be a JSON object, got {type(record).__name__}")
    return records


def _field(path: str | Path, where: str, record: Mapping[str, Any], name: str, types: tuple[type, ...]) -> Any:
    """``record[name]``, present and of one of ``types`` (a bool is not an id), else one line saying so."""
    if name not in record:
        raise EvalDataError(f"{path}: {where} has no '{name}'")
    value = record[name]
    if not isinstance(value, types) or isinstance(value, bool):
        wanted = " or ".join(t.__name__ for t in types)
        raise EvalDataError(f"{path}: {where} has '{name}' of type {type(value).__name__}; it must be {wanted}")
    return value


def _where(key: str, index: int, record: Mapping[str, Any], id_key: str) -> str:
    """ "annotations[3] (id 17)": the record's position, and its id when it has a usable one."""
    value = record.get(id_key)
    label = id_key.replace("_", " ")
    return f"{key}[{index}]" + (f" ({label} {value!r})" if isinstance(value, _ID_TYPES) else "")


def load_coco_captions(path: str | Path) -> tuple[list[dict[str, Any]], dict[Any, list[str]]]:
    """Read a COCO caption file: (images [{"id", "file_name", ...}], image id → reference captions).

    Every image needs an ``id`` (int or str; ``file_name`` is optional, the image is then found by its id),
    every annotation an ``image_id`` of a listed image and a ``caption`` string.
    """
    data = _read_json(path, ("images", "annotations"))
    images = _records(path, data, "images")
    refs: dict[Any, list[str]] = {}
    for index, img in enumerate(images):
        where = _where("images", index, img, "id")
        image_id = _field(path, where, img, "id", _ID_TYPES)
        if "file_name" in img:
            _field(path, where, img, "file_name", (str,))
        refs[image_id] = []
    for index, ann in enumerate(_records(path, data, "annotations")):
        where = _where("annotations", index, ann, "id")
        image_id = _field(path, where, ann, "image_id", _ID_TYPES)
        caption = _field(path, where, ann, "caption", (str,))
        if image_id not in refs:
            raise EvalDataError(f"{path}: {where} refers to image {image_id!r}, which 'images' does not list")
        refs[image_id].append(caption)
    return images, refs


def _answers(path: str | Path, where: str, ann: Mapping[str, Any]) -> list[str]:
    """An annotation's answers: a non-empty list of strings or of {"answer": str} (the VQAv2 layout)."""
    raw = _field(path, where, ann, "answers", (list,))
    if not raw:
        raise EvalDataError(f"{path}: {where} has an empty 'answers' list; each question needs an answer")
    answers = []
    for n, item in enumerate(raw):
        answer = item.get("answer") if isinstance(item, Mapping) else item
        if not isinstance(answer, str):
            raise EvalDataError(
                f"{path}: {where} answers[{n}] must be a string or {{'answer': string}}, got {item!r:.60}"
            )
        answers.append(answer)
    return answers


def load_vqa(
    questions_path: str | Path, annotations_path: str | Path
) -> tuple[dict[Any, dict[str, Any]], dict[Any, dict[str, Any]]]:
    """Read VQA-format files: (question id → {"image_id", "question"}, question id → annotation).

    Each annotation is {"image_id", "answers": [str, ...], "question_type", "answer_type"}, ready for
    `blip2.eval.vqa.vqa_report` (and `{q: a["answers"] for q, a in annotations.items()}` for `vqa_accuracy`).
    Every question needs ``question_id``, ``image_id`` and a ``question`` string; every annotation the
    ``question_id`` of a listed question and ``answers``; its ``image_id`` defaults to the question's.
    """
    questions: dict[Any, dict[str, Any]] = {}
    data = _read_json(questions_path, ("questions",))
    for index, q in enumerate(_records(questions_path, data, "questions")):
        where = _where("questions", index, q, "question_id")
        qid = _field(questions_path, where, q, "question_id", _ID_TYPES)
        questions[qid] = {
            "image_id": _field(questions_path, where, q, "image_id", _ID_TYPES),
            "question": _field(questions_path, where, q, "question", (str,)),
        }
    annotations: dict[Any, dict[str, Any]] = {}
    data = _read_json(annotations_path, ("annotations",))
    for index, ann in enumerate(_records(annotations_path, data, "annotations")):
        where = _where("annotations", index, ann, "question_id")
        qid = _field(annotations_path, where, ann, "question_id", _ID_TYPES)
        if qid not in questions:
            raise EvalDataError(f"{annotations_path}: {where}: question id {qid!r} is not in {questions_path}")
        image_id = ann.get("image_id", questions[qid]["image_id"])
        annotations[qid] = {
            "image_id": image_id,
            "answers": _answers(annotations_path, where, ann),
            "question_type": ann.get("question_type", "unknown"),
            "answer_type": ann.get("answer_type", "unknown"),
        }
    return questions, annotations


def image_path(folder: Path, image_id: Any, known: Mapping[Any, str]) -> str:
    """An image's file: from a COCO caption file's ``file_name`` when known, else found by its id in
    ``folder`` (``{id}.jpg``/``.png``, or a name ending in the zero-padded id, as VQAv2's COCO images)."""
    if image_id in known:
        return known[image_id]
    for name in (f"{image_id}.jpg", f"{image_id}.png", f"{image_id}.jpeg"):
        if (folder / name).is_file():
            return str(folder / name)
    if isinstance(image_id, int):
        matches = sorted(folder.glob(f"*{image_id:012d}.*"))
        if matches:
            return str(matches[0])
    raise FileNotFoundError(f"no image for image id {image_id!r} in '{folder}'")


def load_eval_data(
    scenes: str | Path | None = None,
    coco_captions: str | Path | None = None,
    vqa_questions: str | Path | None = None,
    vqa_annotations: str | Path | None = None,
    images: str | Path | None = None,
) -> EvalData:
    """A scenes split (``scenes``), or COCO caption and/or VQA files with the image folder ``images``."""
    if (vqa_questions is None) != (vqa_annotations is None):
        raise ValueError("VQA evaluation needs both --vqa-questions and --vqa-annotations")
    if (coco_captions is not None or vqa_questions is not None) and images is None:
        raise ValueError("COCO caption and VQA files need --images (the folder their images are in)")
    data = EvalData(paths={}, references=None, objects=None, questions=None, annotations=None)
    if scenes is not None:
        from blip2.eval.scenes import load_scenes_eval

        data = load_scenes_eval(scenes)
    folder = Path(images) if images is not None else Path()
    if coco_captions is not None:
        image_list, data["references"] = load_coco_captions(coco_captions)
        for img in image_list:
            name = img.get("file_name")
            data["paths"][img["id"]] = str(folder / name) if name else image_path(folder, img["id"], {})
    if vqa_questions is not None and vqa_annotations is not None:
        data["questions"], data["annotations"] = load_vqa(vqa_questions, vqa_annotations)
        for q in data["questions"].values():
            data["paths"][q["image_id"]] = image_path(folder, q["image_id"], data["paths"])
    return data
