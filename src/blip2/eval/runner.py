"""Running models over an evaluation set and scoring them: retrieval, captions, zero-shot VQA.

`run_eval` evaluates loaded models on a scenes split or on COCO caption / VQA files; its defaults are the
authors' protocol (`blip2.eval.protocol`). `evaluate_from_paths` is what `blip2 eval` calls: it checks the
data, loads the checkpoints, picks the protocol of the model's LLM family and runs `run_eval`.
`check_output_path` and `write_results` let the command validate its ``--output`` before any work and write
it atomically afterwards.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from blip2.config import LAVIS_VQA_PROMPT, check_question_template
from blip2.data.text import clean_question
from blip2.eval.captions import caption_metrics
from blip2.eval.loaders import EvalData, load_eval_data
from blip2.eval.protocol import LAVIS_RETRIEVAL_K, eval_protocol, lavis_vqa_generation
from blip2.eval.retrieval import retrieval_recall
from blip2.eval.vqa import postprocess_answer, vqa_report

_PER_ITEM = ("predictions", "raw_answers", "i2t_top", "texts", "text_image")

RETRIEVAL_TOP = 5  # texts kept per image with ``keep_predictions`` (`eval_retrieval`'s ``top``)


class EvalOutputError(ValueError):
    """``--output`` cannot be written (a folder, a read-only place, a path through a file)."""


def _progress(iterable: Any, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, disable=not enabled)


def eval_retrieval(
    model: Any,
    paths: Sequence[str],
    texts_per_image: Sequence[Sequence[str]],
    k: int = LAVIS_RETRIEVAL_K,
    batch_size: int = 32,
    top: int = 0,
) -> dict[str, Any]:
    """Image↔text recall@1/5/10 of a stage-1 model: ITC shortlist of ``k`` re-ranked by ITM (as LAVIS, whose
    ``k_test`` is 128), and the ITC-only recall for comparison.

    ``top`` > 0 also keeps each image's best ``top`` texts, for showing a ranking: ``i2t_top`` (per image, in
    order: [[text index, final score rounded to 4 decimals], ...] best first, re-ranked candidates only),
    ``texts`` (the flat text list those indices point into) and ``text_image`` (each text's image index)."""
    from blip2.inference.tasks import retrieve

    texts = [t for group in texts_per_image for t in group]
    img_to_txt: list[list[int]] = []
    txt_to_img: list[int] = []
    for i, group in enumerate(texts_per_image):
        img_to_txt.append(list(range(len(txt_to_img), len(txt_to_img) + len(group))))
        txt_to_img.extend([i] * len(group))
    with torch.no_grad():
        out = retrieve(model, list(paths), texts, k=k, batch_size=batch_size)
    result: dict[str, Any] = retrieval_recall(out["i2t"], img_to_txt, txt_to_img, sim_t2i=out["t2i"])
    itc = retrieval_recall(out["itc"], img_to_txt, txt_to_img)
    result["itc_only"] = {key: itc[key] for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}
    result.update({"k": k, "n_images": len(paths), "n_texts": len(texts)})
    if top > 0:
        scores, indices = out["i2t"].float().topk(min(top, len(texts)), dim=1)  # (N_img, top)
        result["i2t_top"] = [
            [
                [int(t), round(float(s), 4)]
                for t, s in zip(row_t.tolist(), row_s.tolist(), strict=True)
                if s != float("-inf")
            ]
            for row_t, row_s in zip(indices, scores, strict=True)
        ]
        result.update({"texts": texts, "text_image": txt_to_img})
    return result


def eval_captions(
    model: Any,
    paths: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    prompt: str | None = None,
    generation: Mapping[str, Any] | None = None,
    metric_names: Sequence[str] = ("BLEU", "CIDEr"),
    objects: Mapping[Any, Sequence[Mapping[str, Any]]] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate one caption per image and score it (COCO metrics; attribute accuracy when ``objects`` of
    synthetic scenes are given). Returns the scores and ``predictions`` (image id → caption)."""
    ids = list(paths)
    predictions: dict[Any, str] = {}
    for start in _progress(range(0, len(ids), batch_size), "captions", progress):
        part = ids[start : start + batch_size]
        captions = model.caption([paths[i] for i in part], prompt=prompt, batch_size=batch_size, **(generation or {}))
        predictions.update(zip(part, captions, strict=True))
    result: dict[str, Any] = {"n_images": len(ids)}
    if metric_names:
        scores = caption_metrics(predictions, {i: references[i] for i in ids}, metrics=metric_names)
        result.update({k: v for k, v in scores.items() if k not in ("computed",)})
    if objects is not None:
        from blip2.eval.scenes import attribute_accuracy

        result["attributes"] = attribute_accuracy([predictions[i] for i in ids], [objects[i] for i in ids])
    result["predictions"] = predictions
    return result


def eval_vqa(
    model: Any,
    questions: Mapping[Any, Mapping[str, Any]],
    annotations: Mapping[Any, Mapping[str, Any]],
    paths: Mapping[Any, str],
    template: str = LAVIS_VQA_PROMPT,
    generation: Mapping[str, Any] | None = None,
    answer_words: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    context: Mapping[Any, str] | None = None,
    clean_questions: bool = True,
) -> dict[str, Any]:
    """Zero-shot VQA: answer every annotated question with ``model.answer`` and score with the VQA accuracy,
    per question type and answer type. Returns the report plus ``predictions`` and ``raw_answers``
    (question id → text).

    ``clean_questions`` cleans each question as the authors' evaluation does (`clean_question`).
    ``context`` (image id → text) is written before the template for that image's questions, so the LLM
    reads a description of the image in words as well as the visual prompt (e.g. the demo's LLM ceiling:
    the true scene description).
    """
    qids = [q for q in annotations if q in questions]
    qids.sort(key=lambda q: (str(questions[q]["image_id"]), str(q)))  # one image's questions share a batch
    groups: list[tuple[str, list[Any]]] = []  # (template, question ids) in order
    for q in qids:
        tpl = template
        if context is not None:
            described = context[questions[q]["image_id"]]
            tpl = described.replace("{", "{{").replace("}", "}}").rstrip(". ") + ". " + template
        if not groups or groups[-1][0] != tpl or len(groups[-1][1]) >= 8 * batch_size:
            groups.append((tpl, []))
        groups[-1][1].append(q)
    raw: dict[Any, str] = {}
    for tpl, part in _progress(groups, "questions", progress):
        texts = [questions[q]["question"] for q in part]
        answers = model.answer(
            [paths[questions[q]["image_id"]] for q in part],
            [clean_question(t) for t in texts] if clean_questions else texts,
            prompt_template=tpl,
            batch_size=batch_size,
            **(generation or {}),
        )
        raw.update(zip(part, answers, strict=True))
    predictions = {q: postprocess_answer(a, answer_words) for q, a in raw.items()}
    report = vqa_report(predictions, {q: annotations[q] for q in qids})
    report.update({"template": template, "answer_words": answer_words, "predictions": predictions, "raw_answers": raw})
    report["context"] = "given" if context is not None else None
    return report


def run_eval(
    model: Any = None,
    retrieval_model: Any = None,
    scenes: str | Path | None = None,
    coco_captions: str | Path | None = None,
    vqa_questions: str | Path | None = None,
    vqa_annotations: str | Path | None = None,
    images: str | Path | None = None,
    caption_prompt: str | None = None,
    caption_generation: Mapping[str, Any] | None = None,
    vqa_template: str = LAVIS_VQA_PROMPT,
    vqa_generation: Mapping[str, Any] | None = None,
    clean_questions: bool = True,
    answer_words: int = 0,
    retrieval_k: int = LAVIS_RETRIEVAL_K,
    caption_metric_names: Sequence[str] = ("BLEU", "CIDEr"),
    batch_size: int = 8,
    max_images: int | None = None,
    keep_predictions: bool = False,
    progress: bool = True,
    data: EvalData | None = None,
) -> dict[str, Any]:
    """Evaluate loaded models on a scenes split (``scenes``) or on COCO-format files with an image folder.

    ``model`` (a `Blip2`) captions and answers; ``retrieval_model`` (a `Blip2QFormer`) retrieves. Each part
    runs when its model and data are there: retrieval and captions need captions (the scenes or
    ``coco_captions``), VQA needs questions and annotations. ``data`` is an already loaded set
    (`blip2.eval.loaders.load_eval_data`) instead of the file arguments. ``max_images`` keeps the first N
    images (and their questions). The defaults are the authors' protocol (`blip2.eval.protocol`):
    ``vqa_generation`` None means LAVIS's settings for the model's LLM family, ``caption_generation`` None
    the library's (LAVIS's) caption defaults. Returns {"retrieval", "captions", "vqa"} (absent parts are
    None); per-item predictions (captions, answers, each image's top-5 texts) are dropped unless
    ``keep_predictions``.
    """
    files = (scenes, coco_captions, vqa_questions, vqa_annotations, images)
    if data is None:
        data = load_eval_data(*files)
    elif any(f is not None for f in files):
        raise ValueError("give either loaded data or files to evaluate, not both")
    paths, references = data["paths"], data["references"]
    questions, annotations = data["questions"], data["annotations"]
    image_ids = list(references) if references is not None else list(dict.fromkeys(paths))
    if max_images is not None:
        image_ids = image_ids[:max_images]
    kept = set(image_ids)

    result: dict[str, Any] = {"retrieval": None, "captions": None, "vqa": None}
    if retrieval_model is not None and references is not None:
        result["retrieval"] = eval_retrieval(
            retrieval_model,
            [paths[i] for i in image_ids],
            [references[i] for i in image_ids],
            k=retrieval_k,
            top=RETRIEVAL_TOP if keep_predictions else 0,
        )
    if model is not None and references is not None:
        result["captions"] = eval_captions(
            model,
            {i: paths[i] for i in image_ids},
            references,
            prompt=caption_prompt,
            generation=caption_generation,
            metric_names=caption_metric_names,
            objects=data["objects"],
            batch_size=batch_size,
            progress=progress,
        )
    if model is not None and questions is not None and annotations is not None:
        wanted = {q: a for q, a in annotations.items() if questions[q]["image_id"] in kept}
        if vqa_generation is None:
            vqa_generation = lavis_vqa_generation(model.config.llm.kind)
        result["vqa"] = eval_vqa(
            model,
            questions,
            wanted,
            paths,
            template=vqa_template,
            generation=vqa_generation,
            answer_words=answer_words,
            batch_size=batch_size,
            progress=progress,
            clean_questions=clean_questions,
        )
    return result if keep_predictions else without_predictions(result)


def _load_models(model: str | None, retrieval_model: str | None, device: str) -> tuple[Any, Any]:
    """(stage-2 model or None, stage-1 model or None). A stage-1 checkpoint given as ``model`` retrieves; the
    demo's stage-1 folder next to ``model`` (``../qformer``) is found without being named."""
    from blip2.checkpoints import load_for_inference

    loaded = load_for_inference(model, device) if model else None
    if retrieval_model is None and model and (Path(model).parent / "qformer" / "config.json").is_file():
        retrieval_model = str(Path(model).parent / "qformer")
    stage1 = load_for_inference(retrieval_model, device) if retrieval_model else None
    if loaded is not None and not hasattr(loaded, "answer"):  # a stage-1 model given as `model`
        return None, stage1 or loaded
    return loaded, stage1


def evaluate_from_paths(
    model: str | None,
    retrieval_model: str | None = None,
    device: str = "cpu",
    protocol: str = "lavis",
    scenes: str | Path | None = None,
    coco_captions: str | Path | None = None,
    vqa_questions: str | Path | None = None,
    vqa_annotations: str | Path | None = None,
    images: str | Path | None = None,
    caption_prompt: str | None = None,
    vqa_template: str | None = None,
    num_beams: int | None = None,
    answer_words: int = 0,
    retrieval_k: int | None = None,
    caption_metric_names: Sequence[str] = ("BLEU", "CIDEr"),
    max_images: int | None = None,
    keep_predictions: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """`blip2 eval`: check the files, load the checkpoints, evaluate with ``protocol`` ("lavis": the authors'
    settings for the model's LLM family; "fast": greedy, k=16) and the given overrides (None: the
    protocol's). Returns `run_eval`'s result plus ``protocol`` (the settings used)."""
    for flag, value, least in (
        ("num-beams", num_beams, 1),
        ("retrieval-k", retrieval_k, 1),
        ("max-images", max_images, 1),
    ):
        if value is not None and value < least:
            raise ValueError(f"--{flag} must be at least {least}, got {value}")
    if answer_words < 0:
        raise ValueError(f"--answer-words must be 0 (keep every word) or more, got {answer_words}")
    if vqa_template is not None:
        check_question_template(vqa_template)
    eval_protocol(None, protocol)  # an unknown name fails before any loading
    data = load_eval_data(scenes, coco_captions, vqa_questions, vqa_annotations, images)
    stage2, stage1 = _load_models(model, retrieval_model, device)
    settings = eval_protocol(stage2.config.llm.kind if stage2 is not None else None, protocol)
    beams = {} if num_beams is None else {"num_beams": num_beams}
    vqa_generation = settings.vqa_generation | beams
    result = run_eval(
        model=stage2,
        retrieval_model=stage1,
        data=data,
        caption_prompt=caption_prompt,
        caption_generation=settings.caption_generation | beams,
        vqa_template=vqa_template or settings.vqa_template,
        vqa_generation=vqa_generation,
        clean_questions=settings.clean_questions,
        answer_words=answer_words,
        retrieval_k=retrieval_k or settings.retrieval_k,
        caption_metric_names=caption_metric_names,
        max_images=max_images,
        keep_predictions=keep_predictions,
        progress=progress,
    )
    result["protocol"] = {
        "name": settings.name,
        "vqa_template": vqa_template or settings.vqa_template,
        "vqa_generation": vqa_generation,
        "clean_questions": settings.clean_questions,
        "retrieval_k": retrieval_k or settings.retrieval_k,
    }
    return result


def check_output_path(path: str | Path) -> Path:
    """``path`` as a results file that can be written, checked before an evaluation starts: not a folder,
    its folder creatable and writable (probed with a temporary file). Raises `EvalOutputError`."""
    out = Path(path)
    if out.is_dir():
        raise EvalOutputError(f"--output '{out}' is a folder; give a file name, e.g. '{out / 'metrics.json'}'")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise EvalOutputError(
            f"--output '{out}' cannot be written ({e.strerror or e}); choose a writable file path"
        ) from e
    return out


def write_results(result: Mapping[str, Any], path: str | Path) -> None:
    """Write ``result`` as JSON to ``path`` atomically (a temporary file, then a rename): a failed write
    leaves no partial file. Raises `EvalOutputError`."""
    out = Path(path)
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(
            "w", dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False, encoding="utf-8"
        ) as f:
            tmp = f.name
            json.dump(result, f, indent=2, default=str)
        os.replace(tmp, out)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise EvalOutputError(f"could not write --output '{out}' ({e.strerror or e}); the metrics are above") from e


def format_summary(result: Mapping[str, Any]) -> list[str]:
    """One line per evaluated part: the headline scores."""
    lines = []
    if result.get("retrieval"):
        r = result["retrieval"]
        lines.append(
            "retrieval: "
            + " ".join(f"{k}={r[k]:.3f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))
        )
    if result.get("captions"):
        c = result["captions"]
        scores = [f"{k}={c[k]:.3f}" for k in ("CIDEr", "BLEU-4", "METEOR", "SPICE") if isinstance(c.get(k), float)]
        if c.get("attributes"):
            scores.append(f"attribute_accuracy={c['attributes']['object']:.3f}")
        lines.append("captions: " + " ".join(scores))
    if result.get("vqa"):
        v = result["vqa"]
        per_type = " ".join(f"{t}={a:.3f}" for t, a in v["per_type"].items())
        lines.append(f"vqa: overall={v['overall']:.3f} ({per_type})")
    return lines or ["nothing to evaluate: give a model and --scenes, --coco-captions or --vqa-* files"]


def without_predictions(result: Mapping[str, Any]) -> dict[str, Any]:
    """``result`` with the per-item ``predictions`` / ``raw_answers`` / retrieval top-k lists of each part
    left out."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in _PER_ITEM}
        out[key] = value
    return out
