"""Reading a request: multipart or JSON body, base64, parameter validation, and image decoding with size guards.

Everything a client can get wrong raises `ApiError` with a message naming the field and the fix."""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import threading
from typing import Any

from fastapi import Request
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from blip2.data.images import ImageError, load_image
from blip2.serve.config import ServeConfig
from blip2.serve.errors import ApiError
from blip2.serve.schemas import Params

__all__ = ["ImageDecoder", "read_request"]


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


def _validate(model: type[Params], fields: dict[str, Any]) -> Any:
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


async def read_request(
    request: Request, params: type[Params], json_model: type[Params], config: ServeConfig
) -> tuple[bytes, str, Any]:
    """→ (encoded image bytes, a name for error messages, validated parameters).

    ``params`` checks a multipart upload's form fields, ``json_model`` a JSON body (the same plus ``image``)."""
    kind = _content_type(request)
    if kind == "application/json":
        return await _read_json(request, json_model, config)
    if kind == "multipart/form-data":
        return await _read_multipart(request, params, config)
    got = f"Content-Type '{kind}'" if kind else "no Content-Type"
    raise ApiError(
        415, f"send multipart/form-data (the file in field 'image') or JSON with a base64 'image' field; got {got}"
    )


async def _read_json(request: Request, json_model: type[Params], config: ServeConfig) -> tuple[bytes, str, Any]:
    body = await request.body()
    try:
        fields = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from exc
    except RecursionError as exc:  # json's C parser recurses once per nesting level
        raise ApiError(400, "the JSON body is nested too deeply; send a flat object with an 'image' field") from exc
    if not isinstance(fields, dict):
        raise ApiError(400, 'the JSON body must be an object, e.g. {"image": "<base64>"}')
    if "image" not in fields:
        raise ApiError(400, "field 'image' is missing: give the image as a base64 string (or a data: URL)")
    data = _decode_base64(fields["image"], config.max_upload_bytes)
    return data, "image", _validate(json_model, fields)


async def _read_multipart(request: Request, params: type[Params], config: ServeConfig) -> tuple[bytes, str, Any]:
    form = await request.form(max_files=1, max_fields=config.max_texts + 16, max_part_size=64 * 1024)
    upload = form.get("image")
    if upload is None:
        raise ApiError(400, "field 'image' is missing: upload the image file as multipart field 'image'")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "field 'image' must be a file upload, not a text field")
    if upload.size is not None and upload.size > config.max_upload_bytes:
        raise ApiError(413, f"the image is {upload.size} bytes, over this server's limit of {config.max_upload_bytes}")
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


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header, without decoding; None when PIL cannot even open it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError:
        return (1 << 31, 1)
    except Exception:  # load_image explains what is wrong with it
        return None


class ImageDecoder:
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
