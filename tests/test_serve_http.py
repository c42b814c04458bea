"""The server over real HTTP (uvicorn on a loopback port): load, and the clients a test client cannot play.

Raw sockets play clients that stall or trickle their headers or body, connect and say nothing, or vanish
mid-upload (issues 16 and 17); the server runs with short limits so each case takes a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from serve_helpers import ColourModel, assert_error, upload

from blip2.serve.app import ServeConfig, create_app
from blip2.serve.server import background_server
from blip2.testing import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_load_over_http_all_answered() -> None:
    """≥ 50 concurrent requests over real HTTP (uvicorn on loopback): each gets 200 or 503, the server lives on."""
    bench = _load_benchmark()
    config = ServeConfig(max_batch=8, queue_size=16)
    app = create_app(make_tiny_model(None, llm="opt"), config)
    with background_server(app) as url:
        statuses, _ = asyncio.run(bench.fire(url, n_requests=60, concurrency=60))
        assert set(statuses) <= {200, 503} and sum(statuses.values()) == 60
        assert statuses[200] >= 16
        assert httpx.get(url + "/healthz").json()["queue"]["waiting"] == 0
    assert app.state.batcher.stats.largest_batch > 1


# ------------------------------------------------------------------------------------------------ slow clients
SLOW = ServeConfig(header_timeout_s=0.5, body_timeout_s=0.5, min_upload_rate=1000)
MULTIPART_HEAD = (
    b"POST /caption HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=bb\r\n"
    b"Content-Length: %d\r\n\r\n"
)


def _multipart_body(data: bytes) -> bytes:
    head = b'--bb\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    return head + data + b"\r\n--bb--\r\n"


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until_closed(sock: socket.socket, within: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after ``within``."""
    sock.settimeout(within)
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {within} s; got {b''.join(chunks)[:200]!r}")
    except ConnectionResetError:  # closed while the client was still sending: what it sent before still counts
        pass
    return b"".join(chunks)


def _trickle(sock: socket.socket, data: bytes, every: float = 0.05, until_answered: bool = True) -> threading.Thread:
    """Send ``data`` a byte at a time until the server closes (or, with ``until_answered``, answers)."""

    def run() -> None:
        for byte in data:
            if until_answered and select.select([sock], [], [], every)[0]:
                return
            time.sleep(0 if until_answered else every)
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _error_of(reply: bytes, status: int) -> str:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), reply[:300]
    assert b"connection: close" in head.lower(), head
    return json.loads(body)["error"]


def test_slow_uploads_are_cut_off_while_others_are_served() -> None:
    with background_server(create_app(ColourModel(), SLOW)) as url:
        stalled = _connect(url)  # headers, then a little of the body, then nothing
        stalled.sendall(MULTIPART_HEAD % 100_000 + _multipart_body(b"x" * 100)[:150])
        trickling = _connect(url)  # headers, then one byte every 50 ms: 20 B/s, under the 1000 B/s allowed
        trickling.sendall(MULTIPART_HEAD % 100_000)
        trickler = _trickle(trickling, _multipart_body(b"x" * 1000))
        unread = _connect(url)  # a body the app answers (404) without reading it, trickled for ever after
        unread.sendall(b"POST /nowhere HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n")
        drip = _trickle(unread, b"x" * 1000, until_answered=False)
        assert httpx.post(url + "/caption", files=upload(), timeout=10).status_code == 200  # served meanwhile
        for sock in (stalled, trickling):
            assert "did not arrive in time" in _error_of(_read_until_closed(sock), 408)
            sock.close()
        assert _read_until_closed(unread).startswith(b"HTTP/1.1 404 ")
        unread.close()
        trickler.join(5)
        drip.join(5)
        assert httpx.post(url + "/caption", files=upload(), timeout=10).status_code == 200


def test_a_slow_but_steady_upload_finishes() -> None:
    """The body deadline grows with what arrives: 1 s per min_upload_rate bytes."""
    noisy = io.BytesIO()
    Image.effect_noise((48, 48), 60).convert("RGB").save(noisy, "PNG")
    body = _multipart_body(noisy.getvalue())
    assert len(body) > 4000
    with background_server(create_app(ColourModel(), SLOW)) as url, _connect(url) as sock:
        sock.sendall(MULTIPART_HEAD % len(body))
        for i in range(0, len(body), 500):  # 500 bytes every 0.1 s: ~1 s in all, twice the 0.5 s base deadline
            time.sleep(0.1)
            sock.sendall(body[i : i + 500])
        sock.settimeout(10)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]


def test_slow_headers_and_silent_connections_are_closed() -> None:
    with background_server(create_app(ColourModel(), SLOW)) as url:
        silent = _connect(url)  # connects and sends nothing
        partial = _connect(url)  # half a request head, then nothing
        partial.sendall(b"POST /caption HTTP/1.1\r\nHost: test\r\n")
        trickling = _connect(url)  # a request head a byte at a time: activity must not extend the deadline
        trickler = _trickle(trickling, b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 1000)
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200  # served meanwhile
        assert _read_until_closed(silent) == b""  # nothing was asked, so nothing is answered
        for sock in (partial, trickling):
            assert "headers did not arrive within 0.5 s" in _error_of(_read_until_closed(sock), 408)
        trickler.join(5)
        for sock in (silent, partial, trickling):
            sock.close()
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200


def test_connection_cap_answers_503_then_recovers() -> None:
    config = ServeConfig(max_connections=2, header_timeout_s=0.5)
    with background_server(create_app(ColourModel(), config)) as url:
        held = [_connect(url) for _ in range(2)]
        for sock in held:
            sock.sendall(b"G")  # a request begun (and so surely accepted by the server), never finished
        time.sleep(0.2)
        busy = httpx.get(url + "/healthz", timeout=10)
        assert_error(busy, 503, "too many open connections")
        assert busy.headers["retry-after"] == "1"
        for sock in held:  # the held connections time out, and the server serves again
            _read_until_closed(sock)
            sock.close()
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _wait_for(records: _Records) -> None:
    """Until a first record arrives (the server logs after answering), then a little longer for a second."""
    deadline = time.monotonic() + 10
    while not records.records and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)


@contextlib.contextmanager
def _capture_logs(records: _Records) -> Iterator[None]:
    """The server's and uvicorn's log records at INFO and above; enter after the server's start, which
    configures these loggers (they do not propagate to the root logger that caplog watches)."""
    loggers = [logging.getLogger("uvicorn"), logging.getLogger("blip2")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(records)
        lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(records)
            lg.setLevel(level)


def test_a_client_leaving_mid_upload_logs_one_line() -> None:
    """An everyday event: it used to log two tracebacks (122 lines) and no single clear line."""
    records = _Records()
    with background_server(create_app(ColourModel())) as url:
        with _capture_logs(records):
            with _connect(url) as sock:
                sock.sendall(MULTIPART_HEAD % 100_000 + _multipart_body(b"x" * 5000)[:5000])
                time.sleep(0.2)
            _wait_for(records)
        assert httpx.post(url + "/caption", files=upload(), timeout=10).status_code == 200
    lines = [r.getMessage() for r in records.records]
    assert len(lines) == 1 and "closed the connection during POST /caption" in lines[0], lines
    assert not any(r.exc_info for r in records.records)


def test_a_bug_is_a_json_500_with_one_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug outside the model call still answers JSON; uvicorn logs its traceback once (it used to be twice)."""

    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr("blip2.serve.app.read_request", broken)
    records = _Records()
    with background_server(create_app(ColourModel())) as url, _capture_logs(records):
        assert_error(httpx.post(url + "/caption", files=upload(), timeout=10), 500, "RuntimeError: a bug")
        _wait_for(records)
    assert sum(r.exc_info is not None for r in records.records) == 1, [r.getMessage() for r in records.records]
