"""HTTP API and a small web page: captions, answers to questions and text ranking for an uploaded image.

    blip2 serve --model PATH_OR_ID [--host 127.0.0.1] [--port 8000]

Endpoints (the OpenAPI schema is at ``/openapi.json``, browsable at ``/docs``):

- ``GET /``: the web page (``static/index.html``); ``GET /healthz``: status, model kind, queue.
- ``POST /caption``, ``POST /answer``, ``POST /retrieve``: the image either as a multipart upload (field
  ``image``, other fields as form fields) or in a JSON body (``"image"``: base64, or a ``data:`` URL).

Every error is JSON, ``{"error": "..."}``, naming the problem: 400 bad input, 408 a request too slow to
arrive, 413 too large, 415 neither JSON nor multipart, 503 queue full or too many connections (with
``Retry-After``), 504 timed out, 500 the model failed.

Requests are read and checked (`blip2.serve.parsing`), decoded (and resized to the model's input size,
exactly as its processor would) in worker threads, then queued for the model (`blip2.serve.jobs`,
`blip2.serve.batching`: concurrent requests share a model call). `create_app` serves a model object you
already have (tests do); `blip2.serve.server.serve` loads one and runs it under uvicorn.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Hashable
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel

from blip2.serve.batching import BatcherClosed, MicroBatcher, QueueFull
from blip2.serve.config import ServeConfig
from blip2.serve.errors import ApiError, install_error_handlers
from blip2.serve.jobs import AnswerJob, CaptionJob, RetrieveJob, image_size_of, make_runner, tasks_of
from blip2.serve.limits import BodyGuard
from blip2.serve.parsing import ImageDecoder, read_request
from blip2.serve.schemas import (
    AnswerParams,
    AnswerRequest,
    AnswerResponse,
    CaptionParams,
    CaptionRequest,
    CaptionResponse,
    ErrorResponse,
    HealthResponse,
    Params,
    RetrieveParams,
    RetrieveRequest,
    RetrieveResponse,
)

__all__ = ["ApiError", "ServeConfig", "create_app"]

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"


class _Service:
    """The route handlers and what they share: the model's tasks, the batcher, the image decoder, the limits."""

    def __init__(self, model: Any, config: ServeConfig) -> None:
        self.config = config
        self.tasks = tasks_of(model)
        self.model_name = type(model).__name__
        self.batcher = MicroBatcher(make_runner(model), config.max_batch, config.max_wait_ms / 1000, config.queue_size)
        self.decoder = ImageDecoder(config, image_size_of(model))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        yield
        self.batcher.close()

    async def caption(self, request: Request) -> dict[str, Any]:
        self._require("caption")
        data, name, params = await read_request(request, CaptionParams, CaptionRequest, self.config)
        if params.prompt and "answer" not in self.tasks:
            raise ApiError(400, f"a {self.model_name} (stage-1) model captions without a prompt; leave 'prompt' out")
        image = await self._image(data, name)
        generation = tuple(
            (k, v) for k, v in (("num_beams", params.num_beams), ("max_new_tokens", params.max_new_tokens)) if v
        )
        return await self._run(("caption", params.prompt, generation), CaptionJob(image))

    async def answer(self, request: Request) -> dict[str, Any]:
        self._require("answer")
        data, name, params = await read_request(request, AnswerParams, AnswerRequest, self.config)
        try:
            questions = params.all_questions()
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        if len(questions) > self.config.max_questions:
            raise ApiError(400, f"{len(questions)} questions in one request; the limit is {self.config.max_questions}")
        image = await self._image(data, name)
        return await self._run(("answer",), AnswerJob(image, questions))

    async def retrieve(self, request: Request) -> dict[str, Any]:
        self._require("retrieve")
        data, name, params = await read_request(request, RetrieveParams, RetrieveRequest, self.config)
        if len(params.texts) > self.config.max_texts:
            raise ApiError(400, f"{len(params.texts)} texts in one request; the limit is {self.config.max_texts}")
        image = await self._image(data, name)
        k = min(params.k or 16, len(params.texts))
        return await self._run(("retrieve",), RetrieveJob(image, params.texts, k))

    async def healthz(self) -> dict[str, Any]:
        stats, config = self.batcher.stats, self.config
        return {
            "status": "ok",
            "model": self.model_name,
            "tasks": self.tasks,
            "queue": {
                "waiting": self.batcher.waiting,
                "capacity": config.queue_size,
                "max_batch": config.max_batch,
                "batches_run": stats.batches,
                "requests_run": stats.requests,
                "largest_batch": stats.largest_batch,
                "rejected": stats.rejected,
                "model_seconds": round(stats.model_seconds, 4),
            },
            "max_upload_bytes": config.max_upload_bytes,
            "max_pixels": config.max_pixels,
        }

    def _require(self, task: str) -> None:
        if task in self.tasks:
            return
        name = self.model_name
        if task == "answer":
            raise ApiError(
                400,
                f"this server runs a {name} (stage-1, Q-Former only) model: it has no language model to answer "
                "questions; serve a stage-2 Blip2 model for /answer",
            )
        if task == "retrieve":
            raise ApiError(
                400,
                f"this server runs a {name} (stage-2, with a language model) model: it has no ITC/ITM heads "
                "for retrieval; serve a stage-1 Blip2QFormer model for /retrieve",
            )
        raise ApiError(400, f"this server's {name} model cannot do '{task}'")

    async def _image(self, data: bytes, name: str) -> Image.Image:
        return await anyio.to_thread.run_sync(self.decoder, data, name)

    async def _run(self, key: Hashable, job: Any) -> dict[str, Any]:
        """Queue ``job`` for the model and wait for its result; every failure becomes an `ApiError`."""
        timeout = self.config.request_timeout_s
        try:
            with anyio.fail_after(timeout):
                return await self.batcher.submit(key, job)
        except QueueFull as exc:
            raise ApiError(503, str(exc), {"Retry-After": "1"}) from exc
        except TimeoutError as exc:
            raise ApiError(504, f"no result within {timeout:g} s; the server is overloaded") from exc
        except BatcherClosed as exc:
            raise ApiError(503, str(exc)) from exc
        except ValueError as exc:  # the model refused this input (ImageError is a ValueError too)
            raise ApiError(400, str(exc)) from exc
        except Exception as exc:
            log.exception("the model failed on %s", key)
            raise ApiError(500, f"the model failed on this request ({type(exc).__name__}: {exc})") from exc


def _openapi_body(json_model: type[BaseModel], params: type[Params]) -> dict[str, Any]:
    """Document both request encodings (FastAPI cannot declare one body in two content types)."""
    form = params.model_json_schema()
    form["properties"] = {"image": {"type": "string", "format": "binary"}, **form.get("properties", {})}
    form["required"] = ["image", *form.get("required", [])]
    form["title"] = f"{params.__name__}Form"
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form},
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "bad input: not an image, bad base64 or JSON, empty or missing fields, wrong model for this task",
        408: "the request body did not arrive in time (the connection is closed)",
        413: "the upload or the image is too large",
        415: "neither multipart/form-data nor JSON",
        503: "the queue is full or the server has too many connections; retry after a moment",
        504: "timed out waiting for the model",
    }.items()
}

# (path, handler name, response model, JSON request model, form parameters, summary)
_TASK_ROUTES: list[tuple[str, str, type[BaseModel], type[Params], type[Params], str]] = [
    ("/caption", "caption", CaptionResponse, CaptionRequest, CaptionParams, "Caption an image"),
    (
        "/answer",
        "answer",
        AnswerResponse,
        AnswerRequest,
        AnswerParams,
        "Answer questions about an image (zero-shot VQA)",
    ),
    (
        "/retrieve",
        "retrieve",
        RetrieveResponse,
        RetrieveRequest,
        RetrieveParams,
        "Rank texts by how well they match an image (ITC shortlist, ITM re-rank)",
    ),
]


@functools.cache
def _index_html() -> str:
    return (STATIC_DIR / "index.html").read_text(encoding="utf-8")


async def _page() -> HTMLResponse:
    return HTMLResponse(_index_html())


async def _favicon() -> Response:
    return Response(status_code=204)


def create_app(model: Any, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``model`` (a `Blip2`, a `Blip2QFormer`, or anything with the same methods)."""
    config = config or ServeConfig()
    if hasattr(model, "eval"):
        model.eval()
    service = _Service(model, config)
    app = FastAPI(
        title="BLIP-2",
        description="Captions, answers to questions and image-text ranking with a BLIP-2 model.",
        version="1",
        lifespan=service.lifespan,
    )
    app.state.batcher = service.batcher
    app.state.config = config
    app.state.model = model
    # The body limit leaves room for base64 (4/3) and the other fields; the image itself is checked exactly later.
    body_limit = config.max_upload_bytes * 4 // 3 + 1024 * 1024
    app.add_middleware(
        BodyGuard, max_bytes=body_limit, timeout_s=config.body_timeout_s, min_rate=config.min_upload_rate
    )
    install_error_handlers(app)
    for path, name, response, json_model, params, summary in _TASK_ROUTES:
        app.add_api_route(
            path,
            getattr(service, name),
            methods=["POST"],
            response_model=response,
            responses=_ERRORS,
            openapi_extra=_openapi_body(json_model, params),
            summary=summary,
        )
    app.add_api_route(
        "/healthz", service.healthz, response_model=HealthResponse, summary="Liveness, model kind and queue state"
    )
    app.add_api_route("/", _page, response_class=HTMLResponse, include_in_schema=False)
    app.add_api_route("/favicon.ico", _favicon, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
