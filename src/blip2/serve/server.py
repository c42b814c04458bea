"""Running the app: `serve` (what ``blip2 serve`` calls), `background_server` (tests, benchmarks), uvicorn's settings.

uvicorn alone lets a client hold a connection for ever by sending its headers slowly, or nothing at all
(it only times out *idle keep-alive* connections), and its connection cap answers in plain text. So the
server runs uvicorn's h11 protocol with two additions (`_GuardedH11`): a deadline for each request's line
and headers (``ServeConfig.header_timeout_s``) and a cap on open connections answered with the API's JSON
503. Slow *bodies* are cut off by the app's `blip2.serve.limits.BodyGuard`; idle keep-alive connections by
uvicorn's own ``timeout_keep_alive`` (``ServeConfig.keep_alive_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import h11
import uvicorn
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from blip2.serve.app import create_app
from blip2.serve.config import ServeConfig
from blip2.serve.errors import error_response

__all__ = ["background_server", "load_model", "serve", "uvicorn_config"]


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol (one instance per connection) with a header deadline and a JSON connection cap.

    It relies on `H11Protocol`'s attributes ``conn`` (the h11 state machine), ``transport``, ``connections``,
    ``tasks`` and ``app``, which have been stable across uvicorn releases; tests/test_serve_http.py covers both
    guards over a real socket, so a uvicorn change that breaks them fails there.
    """

    limits: ClassVar[ServeConfig]  # set per server by `_protocol_for`
    _header_timer: asyncio.TimerHandle | None = None
    _request_started = False  # bytes of a request arrived: a timeout then answers 408 rather than just closing

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a client that connects and sends nothing is timed out too

    def data_received(self, data: bytes) -> None:
        cap = self.limits.max_connections
        over = len(self.connections) > cap or len(self.tasks) >= cap  # `connections` includes this one
        self.app = _too_many_connections if over else self.config.loaded_app
        super().data_received(data)
        if self._owed_unread():
            self._request_started = True
            self._arm_header_timer()
        else:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _owed_unread(self) -> bool:
        """The client still owes bytes that nothing else times out: a request's line and headers, or the rest
        of a body the app answered without reading (uvicorn then drains it, and each byte would reset its
        keep-alive timer)."""
        state = self.conn.their_state
        return state is h11.IDLE or (state is h11.SEND_BODY and self.conn.our_state is h11.DONE)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:  # armed once per request: trickled bytes do not extend it
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._request_started = False

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._owed_unread():
            return
        if self._request_started and self.conn.their_state is h11.IDLE:
            # h11 cannot answer a request it has not parsed: the 408 is written by hand.
            message = (
                f"the request's line and headers did not arrive within {self.limits.header_timeout_s:g} s; "
                "the connection is closed, send the request again"
            )
            body = json.dumps({"error": message}).encode()
            head = "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            self.transport.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
        with contextlib.suppress(h11.LocalProtocolError):  # as uvicorn's connection_lost does
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


async def _too_many_connections(scope: Scope, receive: Receive, send: Send) -> None:
    message = "the server has too many open connections; retry in a moment"
    await error_response(503, message, {"Retry-After": "1", "Connection": "close"})(scope, receive, send)


def _protocol_for(config: ServeConfig) -> type[H11Protocol]:
    return type("GuardedH11", (_GuardedH11,), {"limits": config})


def uvicorn_config(app: FastAPI, config: ServeConfig, log_level: str = "info", **kwargs: Any) -> uvicorn.Config:
    """uvicorn's settings for ``app``: the h11 protocol with ``config``'s header deadline, connection cap and
    keep-alive timeout. ``kwargs`` go to `uvicorn.Config` (host, port, ...)."""
    # uvicorn configures only its own loggers: the server's (blip2.serve.*, e.g. "a client closed the
    # connection") get the same handler, else Python would show only their warnings, unformatted.
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["blip2"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    return uvicorn.Config(
        app,
        http=_protocol_for(config),
        timeout_keep_alive=config.keep_alive_s,  # type: ignore[arg-type]  # uvicorn accepts a float
        log_level=log_level,
        log_config=log_config,
        lifespan="on",
        **kwargs,
    )


def load_model(model: Any, device: str, optimize: bool = False) -> Any:
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
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    config = config or ServeConfig()
    app = create_app(load_model(model, device, optimize), config)
    print(f"blip2 serve: http://{host}:{port}/ (API docs at /docs)", flush=True)
    uvicorn.Server(uvicorn_config(app, config, host=host, port=port)).run()


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread (port 0: a free one) and yield its base URL; for tests and benchmarks.

    The server's timeouts and connection cap are those of the app's `ServeConfig` (``app.state.config``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = getattr(app.state, "config", None) or ServeConfig()
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
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
