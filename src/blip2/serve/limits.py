"""ASGI middleware bounding a request body: its size (413) and the time it takes to arrive (408).

The time limit is what stops a slow client from holding a connection (and a decoding slot's worth of
buffers) for ever: the body must arrive within ``timeout_s`` of the headers, plus one second per ``min_rate``
bytes received, so a slow but steady upload finishes while a stalled or trickling one is cut off (the rule of
Apache's mod_reqtimeout). Both errors close the connection: the rest of the body is never read.

Limits on the request line and headers, idle connections and the number of connections are the HTTP
server's, set in `blip2.serve.server`.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blip2.serve.errors import ApiError, error_response

__all__ = ["BodyGuard"]

CLOSE = {"Connection": "close"}


class BodyGuard:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by Content-Length or while streaming), 408 for one
    that does not arrive in time. Raised from ``receive()``, so the app's `ApiError` handler answers them."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, min_rate: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(413, self._too_large(int(length)), CLOSE)(scope, receive, send)
            return
        start = anyio.current_time()
        seen = 0
        complete = False

        async def guarded() -> Message:
            nonlocal seen, complete
            if complete:  # e.g. Starlette waiting for a disconnect while it streams a response
                return await receive()
            deadline = start + self.timeout_s + seen / self.min_rate
            with anyio.move_on_after(deadline - anyio.current_time()) as waiting:
                message = await receive()
            if waiting.cancelled_caught:
                raise ApiError(408, self._too_slow(seen), CLOSE)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise ApiError(413, self._too_large(seen), CLOSE)
            return message

        await self.app(scope, guarded, send)

    def _too_large(self, size: int) -> str:
        return f"the request body is {size} bytes or more, over this server's limit of {self.max_bytes} bytes"

    def _too_slow(self, seen: int) -> str:
        return (
            f"the request body did not arrive in time ({seen} bytes in {self.timeout_s:g} s + 1 s per "
            f"{self.min_rate} bytes); the connection is closed, send the request again"
        )
