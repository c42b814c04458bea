"""HTTP API and a small web page: captions, answers to questions and text ranking for an uploaded image.

    blip2 serve --model PATH_OR_ID [--host 127.0.0.1] [--port 8000]

Endpoints (the OpenAPI schema is at ``/openapi.json``, browsable at ``/docs``):

- ``GET /``: the web page (``static/index.html``); ``GET /healthz``: status, model kind, queue.
- ``POST /caption``, ``POST /answer``, ``POST /retrieve``: the image either as a multipart upload (field
  ``image``, other fields as form fields) or in a JSON body (``"image"``: base64, or a ``data:`` URL).

Every error is JSON, ``{"error": "..."}``, naming the problem: 400 bad input, 413 too large, 415 neither JSON
nor multipart, 503 queue full (with ``Retry-After``), 504 timed out, 500 the model failed.

Requests are decoded (and resized to the model's input size, exactly as its processor would) in worker
threads, then queued for the model; see `blip2.serve.batching` for how concurrent requests share a model call.
Use `create_app` to serve a model object you already have (tests do), `serve` to load one and run uvicorn.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blip2.data.images import ImageError, load_image
from blip2.serve.batching import BatcherClosed, MicroBatcher, QueueFull

__all__ = ["ServeConfig", "create_app", "serve", "background_server", "ApiError"]

log = logging.getLogger("blip2.serve.app")
STATIC_DIR = Path(__file__).parent / "static"
MAX_TEXT_CHARS = 1000  # per prompt, question or text: longer ones are certainly not meant for a 32-token model


@dataclass
class ServeConfig:
    """Server limits and batching. Defaults suit one CPU or GPU serving interactive users."""

    max_batch: int = 8  # requests per model call
    max_wait_ms: float = 10.0  # how long the oldest request waits for others to share its call
    queue_size: int = 64  # requests waiting (beyond the running batch) before new ones get 503
    max_upload_bytes: int = 10 * 1024 * 1024  # per image, encoded
    max_pixels: int = 40_000_000  # per image, width × height, checked before decoding
    max_questions: int = 8  # per /answer request
    max_texts: int = 256  # per /retrieve request
    decode_threads: int = 4  # images decoded at once (bounds the memory of large decoded images)
    request_timeout_s: float = 300.0  # waiting for the model, queue included

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "max_upload_bytes", "max_pixels", "max_questions", "max_texts"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be at least 1, got {getattr(self, name)}")


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# ---------------------------------------------------------------------------------------------- schemas
def _clean_text(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"{what} is empty; it needs some text")
    return value.strip()


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    list_fields: ClassVar[frozenset[str]] = frozenset()  # fields a multipart form may repeat


class CaptionParams(_Params):
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="text the caption continues (LLM models)")
    num_beams: int | None = Field(None, ge=1, le=10, description="beam width (default: the model's, 5 or 3)")
    max_new_tokens: int | None = Field(None, ge=1, le=100, description="longest caption in tokens (default 30)")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


class AnswerParams(_Params):
    list_fields: ClassVar[frozenset[str]] = frozenset({"questions"})
    question: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="one question")
    questions: list[str] | None = Field(None, min_length=1, description="several questions about the same image")

    @model_validator(mode="after")
    def _one_of(self) -> AnswerParams:
        if (self.question is None) == (self.questions is None):
            raise ValueError("give either 'question' (one) or 'questions' (a list), not both and not neither")
        return self

    def all_questions(self) -> list[str]:
        raw = [self.question] if self.question is not None else list(self.questions or [])
        out = []
        for i, q in enumerate(raw):
            if len(q) > MAX_TEXT_CHARS:
                raise ValueError(f"question {i + 1} is {len(q)} characters long; the limit is {MAX_TEXT_CHARS}")
            out.append(_clean_text(q, f"question {i + 1}" if len(raw) > 1 else "the question"))
        return out


class RetrieveParams(_Params):
    list_fields: ClassVar[frozenset[str]] = frozenset({"texts"})
    texts: list[str] = Field(..., min_length=1, description="candidate texts, ranked by how well they match")
    k: int | None = Field(None, ge=1, description="ITC shortlist re-ranked by ITM (default: up to 16)")

    @field_validator("texts")
    @classmethod
    def _texts(cls, texts: list[str]) -> list[str]:
        for i, t in enumerate(texts):
            if len(t) > MAX_TEXT_CHARS:
                raise ValueError(f"text {i + 1} is {len(t)} characters long; the limit is {MAX_TEXT_CHARS}")
        return [_clean_text(t, f"text {i + 1}") for i, t in enumerate(texts)]


_IMAGE_FIELD = Field(..., description="the image, base64-encoded (a data: URL is fine too)")


class CaptionRequest(CaptionParams):
    image: str = _IMAGE_FIELD


class AnswerRequest(AnswerParams):
    image: str = _IMAGE_FIELD


class RetrieveRequest(RetrieveParams):
    image: str = _IMAGE_FIELD


class CaptionResponse(BaseModel):
    caption: str
    batch_size: int = Field(..., description="how many requests shared this model call")


class QuestionAnswer(BaseModel):
    question: str
    answer: str


class AnswerResponse(BaseModel):
    answers: list[QuestionAnswer]
    batch_size: int


class RankedText(BaseModel):
    index: int = Field(..., description="position in the request's texts")
    text: str
    score: float = Field(..., description="ITM match logit + ITC similarity (higher is better)")
    itc: float = Field(..., description="ITC similarity alone")


class RetrieveResponse(BaseModel):
    ranking: list[RankedText] = Field(..., description="the ITC shortlist, best match first")
    batch_size: int


class ErrorResponse(BaseModel):
    error: str


class QueueStatus(BaseModel):
    waiting: int
    capacity: int
    max_batch: int
    batches_run: int
    requests_run: int
    largest_batch: int
    rejected: int
    model_seconds: float = Field(..., description="time spent running the model")


class HealthResponse(BaseModel):
    status: str
    model: str = Field(..., description="Blip2 (stage 2, with an LLM) or Blip2QFormer (stage 1)")
    tasks: list[str] = Field(..., description="the POST endpoints this model supports")
    queue: QueueStatus
    max_upload_bytes: int
    max_pixels: int


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class _CaptionJob:
    image: Image.Image


@dataclass
class _AnswerJob:
    image: Image.Image
    questions: list[str]


@dataclass
class _RetrieveJob:
    image: Image.Image
    texts: list[str]
    k: int


class _BodyTooLarge(Exception):
    pass


class _BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await JSONResponse({"error": self._message(int(length))}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge(self._message(seen))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: int) -> str:
        return f"the request body is {size} bytes or more, over this server's limit of {self.limit} bytes"


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling)"
        parts.append(f"field '{where}': {msg}" if where else msg)
    return "; ".join(parts)


def _validate(model: type[_Params], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(400, _validation_message(exc)) from exc


def _decode_base64(value: Any, limit: int) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, "field 'image' must be a base64 string (or a data: URL)")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "field 'image' is a data: URL without ';base64'; encode the image as base64")
    value = "".join(value.split())  # line-wrapped base64 is common
    if not value:
        raise ApiError(400, "field 'image' is empty; it needs the base64-encoded image")
    if len(value) // 4 * 3 > limit:
        raise ApiError(413, f"the image is about {len(value) // 4 * 3} bytes, over this server's limit of {limit}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"field 'image' is not valid base64 ({exc})") from exc


async def _read_request(
    request: Request, params: type[_Params], json_model: type[_Params], config: ServeConfig
) -> tuple[bytes, str, Any]:
    """→ (encoded image bytes, a name for error messages, validated parameters)."""
    kind = _content_type(request)
    if kind == "application/json":
        body = await request.body()
        try:
            fields = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from exc
        if not isinstance(fields, dict):
            raise ApiError(400, 'the JSON body must be an object, e.g. {"image": "<base64>"}')
        if "image" not in fields:
            raise ApiError(400, "field 'image' is missing: give the image as a base64 string (or a data: URL)")
        data = _decode_base64(fields["image"], config.max_upload_bytes)
        return data, "image", _validate(json_model, fields)
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=config.max_texts + 16, max_part_size=64 * 1024)
        upload = form.get("image")
        if upload is None:
            raise ApiError(400, "field 'image' is missing: upload the image file as multipart field 'image'")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "field 'image' must be a file upload, not a text field")
        if upload.size is not None and upload.size > config.max_upload_bytes:
            raise ApiError(
                413, f"the image is {upload.size} bytes, over this server's limit of {config.max_upload_bytes}"
            )
        data = await upload.read()
        fields: dict[str, Any] = {}
        for key in form:
            if key == "image":
                continue
            values = form.getlist(key)
            if any(not isinstance(v, str) for v in values):
                raise ApiError(400, f"field '{key}' must be a text field, not a file")
            if key in params.list_fields:
                fields[key] = values
            elif len(values) == 1:
                fields[key] = values[0] if values[0] != "" else None
            else:
                raise ApiError(400, f"field '{key}' was given {len(values)} times; it takes one value")
        name = os.path.basename(upload.filename or "")[:100] or "upload"
        return data, name, _validate(params, fields)
    got = f"Content-Type '{kind}'" if kind else "no Content-Type"
    raise ApiError(
        415, f"send multipart/form-data (the file in field 'image') or JSON with a base64 'image' field; got {got}"
    )


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header, without decoding; None when PIL cannot even open it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError:
        return (1 << 31, 1)
    except Exception:  # load_image explains what is wrong with it
        return None


class _ImageDecoder:
    """Bytes → RGB image, resized to the model's input size (so queued requests are small)."""

    def __init__(self, config: ServeConfig, image_size: int | None) -> None:
        self.config = config
        self.image_size = image_size
        self.slots = threading.BoundedSemaphore(config.decode_threads)

    def __call__(self, data: bytes, name: str) -> Image.Image:
        if len(data) > self.config.max_upload_bytes:
            raise ApiError(
                413, f"the image is {len(data)} bytes, over this server's limit of {self.config.max_upload_bytes}"
            )
        size = _claimed_size(data)
        if size is not None and size[0] * size[1] > self.config.max_pixels:
            w, h = size
            what = f"{w}×{h} = {w * h} pixels" if h > 1 else "too large to decode safely"
            raise ApiError(
                413, f"image '{name}' is {what}, over this server's limit of {self.config.max_pixels} pixels"
            )
        with self.slots:
            try:
                image = load_image(data, name=name, max_pixels=self.config.max_pixels)
            except ImageError as exc:
                raise ApiError(400, str(exc)) from exc
            if self.image_size is not None:
                # The model's ImageProcessor does exactly this resize; PIL returns a copy for a same-size
                # resize, so the model sees identical pixels, and a waiting request holds S×S pixels, not 40 MP.
                image = image.resize((self.image_size, self.image_size), resample=Image.Resampling.BICUBIC)
            return image


# ---------------------------------------------------------------------------------------------- the model
def _tasks(model: Any) -> list[str]:
    tasks = ["caption"] if hasattr(model, "caption") else []
    if hasattr(model, "answer"):
        tasks.append("answer")
    if hasattr(model, "retrieve"):
        tasks.append("retrieve")
    return tasks


def _image_size(model: Any) -> int | None:
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


def _retrieve(model: Any, jobs: Sequence[_RetrieveJob]) -> list[dict[str, Any]]:
    """The image encoder runs once for the whole group; each request's texts are ranked on their own."""
    import torch

    from blip2.inference.tasks import pixel_values, retrieve

    n = len(jobs)
    if not hasattr(model, "encode_image"):  # a duck-typed model: one call per request
        results = [model.retrieve([j.image], j.texts, k=j.k) for j in jobs]
        embeds = None
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


# ---------------------------------------------------------------------------------------------- the app
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _openapi_body(json_model: type[BaseModel], params: type[_Params]) -> dict[str, Any]:
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
        413: "the upload or the image is too large",
        415: "neither multipart/form-data nor JSON",
        503: "the queue is full; retry after a moment",
        504: "timed out waiting for the model",
    }.items()
}


def create_app(model: Any, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``model`` (a `Blip2`, a `Blip2QFormer`, or anything with the same methods)."""
    config = config or ServeConfig()
    if hasattr(model, "eval"):
        model.eval()
    tasks = _tasks(model)
    model_name = type(model).__name__
    batcher = MicroBatcher(make_runner(model), config.max_batch, config.max_wait_ms / 1000, config.queue_size)
    decoder = _ImageDecoder(config, _image_size(model))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()

    app = FastAPI(
        title="BLIP-2",
        description="Captions, answers to questions and image-text ranking with a BLIP-2 model.",
        version="1",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.config = config
    app.state.model = model
    app.add_middleware(_BodyLimit, limit=config.max_upload_bytes * 4 // 3 + 1024 * 1024)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        return _error(413, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no such path '{request.url.path}'; the API is described at /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on '{request.url.path}'; the API is described at /docs"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}: {exc})")

    async def run_model(key: Hashable, job: Any) -> dict[str, Any]:
        try:
            with anyio.fail_after(config.request_timeout_s):
                return await batcher.submit(key, job)
        except QueueFull as exc:
            raise ApiError(503, str(exc), {"Retry-After": "1"}) from exc
        except TimeoutError as exc:
            raise ApiError(504, f"no result within {config.request_timeout_s:g} s; the server is overloaded") from exc
        except BatcherClosed as exc:
            raise ApiError(503, str(exc)) from exc
        except ValueError as exc:  # the model refused this input (ImageError is a ValueError too)
            raise ApiError(400, str(exc)) from exc
        except Exception as exc:
            log.exception("the model failed on %s", key)
            raise ApiError(500, f"the model failed on this request ({type(exc).__name__}: {exc})") from exc

    def require(task: str) -> None:
        if task in tasks:
            return
        if task == "answer":
            raise ApiError(
                400,
                f"this server runs a {model_name} (stage-1, Q-Former only) model: it has no language model to answer "
                "questions; serve a stage-2 Blip2 model for /answer",
            )
        if task == "retrieve":
            raise ApiError(
                400,
                f"this server runs a {model_name} (stage-2, with a language model) model: it has no ITC/ITM heads "
                "for retrieval; serve a stage-1 Blip2QFormer model for /retrieve",
            )
        raise ApiError(400, f"this server's {model_name} model cannot do '{task}'")

    async def image_of(data: bytes, name: str) -> Image.Image:
        return await anyio.to_thread.run_sync(decoder, data, name)

    @app.post(
        "/caption",
        response_model=CaptionResponse,
        responses=_ERRORS,
        openapi_extra=_openapi_body(CaptionRequest, CaptionParams),
        summary="Caption an image",
    )
    async def caption(request: Request) -> dict[str, Any]:
        require("caption")
        data, name, params = await _read_request(request, CaptionParams, CaptionRequest, config)
        if params.prompt and "answer" not in tasks:
            raise ApiError(400, f"a {model_name} (stage-1) model captions without a prompt; leave 'prompt' out")
        image = await image_of(data, name)
        generation = tuple(
            (k, v) for k, v in (("num_beams", params.num_beams), ("max_new_tokens", params.max_new_tokens)) if v
        )
        return await run_model(("caption", params.prompt, generation), _CaptionJob(image))

    @app.post(
        "/answer",
        response_model=AnswerResponse,
        responses=_ERRORS,
        openapi_extra=_openapi_body(AnswerRequest, AnswerParams),
        summary="Answer questions about an image (zero-shot VQA)",
    )
    async def answer(request: Request) -> dict[str, Any]:
        require("answer")
        data, name, params = await _read_request(request, AnswerParams, AnswerRequest, config)
        try:
            questions = params.all_questions()
        except ValueError as exc:
            raise ApiError(400, str(exc)) from exc
        if len(questions) > config.max_questions:
            raise ApiError(400, f"{len(questions)} questions in one request; the limit is {config.max_questions}")
        image = await image_of(data, name)
        return await run_model(("answer",), _AnswerJob(image, questions))

    @app.post(
        "/retrieve",
        response_model=RetrieveResponse,
        responses=_ERRORS,
        openapi_extra=_openapi_body(RetrieveRequest, RetrieveParams),
        summary="Rank texts by how well they match an image (ITC shortlist, ITM re-rank)",
    )
    async def retrieve(request: Request) -> dict[str, Any]:
        require("retrieve")
        data, name, params = await _read_request(request, RetrieveParams, RetrieveRequest, config)
        if len(params.texts) > config.max_texts:
            raise ApiError(400, f"{len(params.texts)} texts in one request; the limit is {config.max_texts}")
        image = await image_of(data, name)
        k = min(params.k or 16, len(params.texts))
        return await run_model(("retrieve",), _RetrieveJob(image, params.texts, k))

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness, model kind and queue state")
    async def healthz() -> dict[str, Any]:
        stats = batcher.stats
        return {
            "status": "ok",
            "model": model_name,
            "tasks": tasks,
            "queue": {
                "waiting": batcher.waiting,
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

    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ---------------------------------------------------------------------------------------------- running
def _load(model: Any, device: str, optimize: bool = False) -> Any:
    """A path or hub id is loaded (and, with ``optimize`` on CPU, its frozen weights pre-packed: a served
    model is never trained or saved); a model object is served as given."""
    if isinstance(model, str | os.PathLike):
        from blip2.checkpoints import load_for_inference

        return load_for_inference(str(model), device, optimize)
    return model


def serve(
    model: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    config: ServeConfig | None = None,
    torch_threads: int | None = None,
    optimize: bool = True,
) -> None:
    """Load ``model`` (a path or hub id, or a model object) and serve it until interrupted.

    ``optimize`` pre-packs a loaded model's frozen weights for oneDNN on CPU (the same outputs, faster).

    ``torch_threads`` sets torch's intra-op threads for the process. On a small or shared CPU machine, 1 can
    be much faster than the default: OpenMP threads spinning for work take the cores that the event loop
    and the decoding threads need (a tiny model ran 10× slower with 2 threads on a busy 2-core machine).
    """
    import uvicorn

    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    app = create_app(_load(model, device, optimize), config)
    print(f"blip2 serve: http://{host}:{port}/ (API docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread (port 0: a free one) and yield its base URL; for tests and benchmarks."""
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the background server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
