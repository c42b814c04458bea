"""What a request becomes for the model: a job per request, and the batch function that runs a group of them.

`blip2.serve.batching.MicroBatcher` groups jobs with the same key (the task and its generation parameters)
and calls `make_runner`'s function once per group, in its worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

__all__ = ["AnswerJob", "CaptionJob", "RetrieveJob", "image_size_of", "make_runner", "tasks_of"]


@dataclass
class CaptionJob:
    image: Image.Image


@dataclass
class AnswerJob:
    image: Image.Image
    questions: list[str]


@dataclass
class RetrieveJob:
    image: Image.Image
    texts: list[str]
    k: int


def tasks_of(model: Any) -> list[str]:
    """The POST endpoints ``model`` supports, by the methods it has (a duck-typed model works too)."""
    tasks = ["caption"] if hasattr(model, "caption") else []
    if hasattr(model, "answer"):
        tasks.append("answer")
    if hasattr(model, "retrieve"):
        tasks.append("retrieve")
    return tasks


def image_size_of(model: Any) -> int | None:
    """The model's input size, to which uploads are resized once decoded; None when it does not say."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision", None)
    return getattr(vision, "image_size", None)


def make_runner(model: Any) -> Callable[[Hashable, Sequence[Any]], list[dict[str, Any]]]:
    """The batch function the worker thread calls: one model call per group of same-key requests."""

    def run(key: Hashable, jobs: Sequence[Any]) -> list[dict[str, Any]]:
        task = key[0]  # type: ignore[index]
        n = len(jobs)
        if task == "caption":
            _, prompt, generation = key  # type: ignore[misc]
            captions = model.caption([j.image for j in jobs], prompt=prompt, batch_size=n, **dict(generation))
            return [{"caption": c, "batch_size": n} for c in captions]
        if task == "answer":
            images = [j.image for j in jobs for _ in j.questions]  # same object per request: encoded once
            questions = [q for j in jobs for q in j.questions]
            answers = iter(model.answer(images, questions, batch_size=len(questions)))
            return [
                {"answers": [{"question": q, "answer": next(answers)} for q in j.questions], "batch_size": n}
                for j in jobs
            ]
        if task == "retrieve":
            return _retrieve(model, jobs)
        raise ValueError(f"unknown task {task!r}")

    return run


def _retrieve(model: Any, jobs: Sequence[RetrieveJob]) -> list[dict[str, Any]]:
    """The image encoder runs once for the whole group; each request's texts are ranked on their own."""
    import torch

    from blip2.inference.tasks import pixel_values, retrieve

    n = len(jobs)
    if not hasattr(model, "encode_image"):  # a duck-typed model: one call per request
        results = [model.retrieve([j.image], j.texts, k=j.k) for j in jobs]
    else:
        with torch.no_grad():
            embeds = model.encode_image(pixel_values(model, [j.image for j in jobs]))  # (B, P, Dv)
        results = [retrieve(model, None, j.texts, k=j.k, image_embeds=embeds[i : i + 1]) for i, j in enumerate(jobs)]
    out = []
    for job, result in zip(jobs, results, strict=True):
        ranking = [int(i) for i in result["i2t_ranking"][0]]
        out.append(
            {
                "ranking": [
                    {
                        "index": i,
                        "text": job.texts[i],
                        "score": float(result["i2t"][0, i]),
                        "itc": float(result["itc"][0, i]),
                    }
                    for i in ranking
                ],
                "batch_size": n,
            }
        )
    return out
