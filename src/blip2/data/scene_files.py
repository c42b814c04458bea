"""Writing a scenes split to disk (`write_split`): the images, captions and questions of
`blip2.data.scenes` in the library's JSONL files and the COCO / VQA formats the evaluation reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip2.data.scenes import make_split, render


def write_split(root: str | Path, name: str, n: int, seed: int = 0, image_size: int = 224) -> Path:
    """Write split `name` to `root/name/` and return that folder. Same arguments give identical bytes.

    Layout: `images/{name}_{i:06d}.png`, `captions.jsonl` (captions, objects and the background grey per
    image), `questions.jsonl`, and the COCO/VQA style
    `captions_coco.json`, `vqa_questions.json`, `vqa_annotations.json`. Image ids are the indices `i`;
    question ids are `i * 100 + k` for the image's k-th question. Paths in the files are relative to
    `root/name/`. VQA annotations repeat the single answer ten times, so the standard 10-answer accuracy
    applies unchanged.
    """
    out = Path(root) / name
    (out / "images").mkdir(parents=True, exist_ok=True)
    examples = make_split(name, n, seed, image_size)
    caption_lines, question_lines = [], []
    coco: dict[str, list[dict[str, Any]]] = {"images": [], "annotations": []}
    vqa_questions: list[dict[str, Any]] = []
    vqa_annotations: list[dict[str, Any]] = []
    for image_id, example in enumerate(examples):
        rel_path = f"images/{name}_{image_id:06d}.png"
        render(example.scene).save(out / rel_path, format="PNG")
        objects = [o.to_dict() for o in example.scene.objects]
        caption_lines.append(
            {
                "image": rel_path,
                "captions": list(example.captions),
                "objects": objects,
                "background": list(example.scene.background),
            }
        )
        coco["images"].append({"id": image_id, "file_name": rel_path})
        for caption in example.captions:
            coco["annotations"].append({"image_id": image_id, "id": len(coco["annotations"]), "caption": caption})
        for k, q in enumerate(example.questions):
            question_id = image_id * 100 + k
            question_lines.append({"image": rel_path, "question": q.question, "answer": q.answer, "type": q.type})
            vqa_questions.append({"image_id": image_id, "question_id": question_id, "question": q.question})
            vqa_annotations.append(
                {
                    "question_id": question_id,
                    "image_id": image_id,
                    "question_type": q.type,
                    "answer_type": _ANSWER_TYPE[q.type],
                    "multiple_choice_answer": q.answer,
                    "answers": [
                        {"answer": q.answer, "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)
                    ],
                }
            )
    _write_jsonl(out / "captions.jsonl", caption_lines)
    _write_jsonl(out / "questions.jsonl", question_lines)
    _write_json(out / "captions_coco.json", coco)
    _write_json(out / "vqa_questions.json", {"questions": vqa_questions})
    _write_json(out / "vqa_annotations.json", {"annotations": vqa_annotations})
    return out


_ANSWER_TYPE = {"count": "number", "exists": "yes/no", "color": "other", "shape": "other", "position": "other"}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")
