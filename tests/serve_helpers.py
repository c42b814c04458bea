"""Shared by the server's tests: small PNGs, request helpers, and a fake model that shows which image it saw."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from typing import Any

import httpx
from conftest import image_bytes
from fastapi import FastAPI
from PIL import Image


def png(size: tuple[int, int] = (48, 40), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    return image_bytes(size, colour, "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def upload(data: bytes | None = None, name: str = "red.png") -> dict[str, Any]:
    return {"image": (name, png() if data is None else data, "image/png")}


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for word in words:
        assert word.lower() in error.lower(), error


class ColourModel:
    """A fake model: the caption names the image's colour, so each answer shows which image it came from."""

    def __init__(self, delay: float = 0.0, refuse: tuple[int, int, int] | None = None) -> None:
        self.delay = delay
        self.refuse = refuse
        self.calls: list[tuple[str, int, Any]] = []
        self.lock = threading.Lock()

    def _colour(self, image: Image.Image) -> tuple[int, int, int]:
        colour = image.getpixel((0, 0))
        if colour == self.refuse:
            raise ValueError(f"this model refuses the colour {colour}")
        return colour

    def caption(
        self, images: list[Image.Image], prompt: str | None = None, batch_size: int = 8, **gen: Any
    ) -> list[str]:
        time.sleep(self.delay)
        with self.lock:
            self.calls.append(("caption", len(images), gen.get("num_beams")))
        return [f"{prompt or ''}{self._colour(im)}" for im in images]

    def answer(self, images: list[Image.Image], questions: list[str], batch_size: int = 8) -> list[str]:
        with self.lock:
            self.calls.append(("answer", len(images), None))
        return [f"{q} {self._colour(im)}" for im, q in zip(images, questions, strict=True)]


async def post_concurrently(app: FastAPI, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    """All ``requests`` (path, httpx.post keyword arguments) at once, in-process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await asyncio.gather(*(c.post(path, **kwargs) for path, kwargs in requests))
