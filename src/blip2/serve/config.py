"""`ServeConfig`: the server's limits, batching and timeouts, in one place (the CLI's flags fill it)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServeConfig"]


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
    # Slow and idle clients: without these a client holds a connection for as long as it likes.
    header_timeout_s: float = 10.0  # request line + headers, from the connection's opening or the request's 1st byte
    body_timeout_s: float = 30.0  # the request body, from the end of the headers ...
    min_upload_rate: int = 10_000  # ... plus 1 s per this many bytes received (a slow but steady upload finishes)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # open connections; beyond it a request is answered 503 at once

    def __post_init__(self) -> None:
        positive = ("max_batch", "queue_size", "max_upload_bytes", "max_pixels", "max_questions", "max_texts")
        for name in (*positive, "decode_threads", "min_upload_rate", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServeConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServeConfig.{name} must be a positive number of seconds, got {getattr(self, name)}")
