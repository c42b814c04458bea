"""Micro-batching for the HTTP server: concurrent requests share one model call.

Requests are submitted from the event loop with a *key* (what kind of call, with which generation
parameters) and a *payload* (the image and text of one request). A single worker thread owns the model: it
takes the oldest waiting request, waits at most ``max_wait_s`` for more requests with the same key (up to
``max_batch``), runs the model once on the group, and hands each request its own result.

Why a thread rather than an asyncio task: the model call is seconds of blocking CPU/GPU work, which must
never run on the event loop, and a plain thread with a condition variable is independent of which event
loop (or how many: Starlette's TestClient may start one per request) submits work. Results cross back
through `concurrent.futures.Future`, which `asyncio.wrap_future` turns into an awaitable.

While the worker runs one batch, new requests pile up; when it comes back, the oldest request's wait is
already over and it runs at once with everything that has accumulated. So batches grow exactly when the
server is busy, and an idle server adds at most ``max_wait_s`` of latency.

The waiting line is bounded (``queue_size`` requests, not counting the batch being run): `submit` raises
`QueueFull` instead of letting the line grow without limit, and the server answers 503.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchRunner", "MicroBatcher", "QueueFull", "BatcherClosed"]

# run(key, payloads) -> one result per payload, in order; an exception fails the whole group.
BatchRunner = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(RuntimeError):
    """The waiting line is at capacity; try again later (HTTP 503)."""


class BatcherClosed(RuntimeError):
    """The batcher was shut down before the request ran."""


@dataclass
class _Item:
    key: Hashable
    payload: Any
    future: Future[Any]
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Counters for /healthz and the load benchmark."""

    batches: int = 0
    requests: int = 0
    largest_batch: int = 0
    rejected: int = 0
    model_seconds: float = 0.0  # time spent in the batch runner


class MicroBatcher:
    """Groups same-key requests into batches of at most ``max_batch`` and runs them in one worker thread.

    ``run`` gets the key and the payloads of one group. If it raises for a group of several requests, each
    request is retried alone, so one bad request (say, a prompt the model refuses) fails only itself.
    """

    def __init__(
        self,
        run: BatchRunner,
        max_batch: int = 8,
        max_wait_s: float = 0.01,
        queue_size: int = 64,
        name: str = "blip2-model",
    ) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch and queue_size must be at least 1, and max_wait_s not negative")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.stats = BatchStats()
        self._waiting: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting (any thread or loop)
    @property
    def waiting(self) -> int:
        """Requests in the waiting line (not counting the batch being run)."""
        with self._cond:
            return len(self._waiting)

    def submit_future(self, key: Hashable, payload: Any) -> Future[Any]:
        """Queue one request; raises `QueueFull` when ``queue_size`` requests are already waiting."""
        future: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                self.stats.rejected += 1
                raise QueueFull(
                    f"the server is busy: {self.queue_size} requests are already waiting; retry in a moment"
                )
            self._waiting.append(_Item(key, payload, future))
            self._cond.notify()
        return future

    async def submit(self, key: Hashable, payload: Any) -> Any:
        """Queue one request and await its result (from an event loop; never blocks it)."""
        return await asyncio.wrap_future(self.submit_future(key, payload))

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the worker; requests still waiting fail with `BatcherClosed`."""
        with self._cond:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for item in left:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherClosed("the server shut down before this request ran"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker thread
    def _loop(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            self._run_group(group)

    def _next_group(self) -> list[_Item] | None:
        """Block until a group is ready: max_batch same-key items, or the oldest item has waited max_wait_s."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if not self._waiting:
                    self._cond.wait()
                    continue
                key = self._waiting[0].key
                same = [item for item in self._waiting if item.key == key]
                deadline = self._waiting[0].enqueued + self.max_wait_s
                now = time.monotonic()
                if len(same) >= self.max_batch or now >= deadline:
                    group = same[: self.max_batch]
                    taken = {id(item) for item in group}
                    self._waiting = deque(item for item in self._waiting if id(item) not in taken)
                    # drop requests whose callers gave up (client went away) before they ran
                    return [item for item in group if item.future.set_running_or_notify_cancel()]
                self._cond.wait(deadline - now)

    def _run_group(self, group: list[_Item]) -> None:
        if not group:
            return
        self.stats.batches += 1
        self.stats.requests += len(group)
        self.stats.largest_batch = max(self.stats.largest_batch, len(group))
        start = time.perf_counter()
        try:
            results = list(self.run(group[0].key, [item.payload for item in group]))
            if len(results) != len(group):
                raise RuntimeError(f"batch runner returned {len(results)} results for {len(group)} requests")
        except Exception as exc:  # every failure goes back to its requests; the thread lives on
            if len(group) == 1:
                group[0].future.set_exception(exc)
                return
            for item in group:  # find the culprit: each request alone
                try:
                    item.future.set_result(self.run(item.key, [item.payload])[0])
                except Exception as single_exc:
                    item.future.set_exception(single_exc)
            return
        finally:
            self.stats.model_seconds += time.perf_counter() - start
        for item, result in zip(group, results, strict=True):
            item.future.set_result(result)
