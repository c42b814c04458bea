"""Load test for `blip2 serve`: many concurrent requests, micro-batched vs one model call per request.

    python benchmarks/serve_load.py [--requests 128] [--concurrency 64] [--max-batch 16] [--model DIR]

Starts the server in a subprocess (uvicorn on a free loopback port: nothing leaves the machine), fires
``--requests`` requests (two captions for every question, each with its own image) from ``--concurrency``
concurrent httpx clients, and checks that every one is answered with 200 or 503 (queue
full), never a crash or a hang. It runs twice: with micro-batching (``--max-batch``) and one request per
model call (max_batch=1). The last line is the throughput ratio, batched / one-at-a-time.

Torch runs one intra-op thread by default (``--torch-threads``): on a small shared machine, OpenMP worker
threads spinning for work compete with the event loop and the client for the same cores, and a tiny model's
calls became 10× slower with two threads on a loaded 2-core machine.

The model is the random tiny test model (`blip2.testing.make_tiny_model`, OPT-style LLM) unless ``--model``
names a checkpoint. The tiny model's calls are short, so HTTP and image decoding are a large share of each
request; a real model spends far longer in the model, where batching helps most.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from blip2.serve.app import ServeConfig, create_app
from blip2.serve.server import background_server


@dataclass
class LoadResult:
    statuses: Counter[int]
    seconds: float
    mean_batch: float
    model_s_per_request: float

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def throughput(self) -> float:
        """Requests answered with 200 per second."""
        return self.ok / self.seconds


def sample_images(n: int, size: int = 96) -> list[bytes]:
    """``n`` distinct small PNGs (a colour per request, so no two requests are identical)."""
    out = []
    for i in range(n):
        buf = io.BytesIO()
        colour = ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)
        Image.new("RGB", (size, size + i % 7), colour).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _request(i: int, image: bytes) -> tuple[str, dict[str, Any]]:
    """Request ``i``: JSON caption / multipart caption / JSON question, in turn."""
    b64 = base64.b64encode(image).decode()
    if i % 3 == 0:
        return "/caption", {"json": {"image": b64, "num_beams": 3, "max_new_tokens": 10}}
    if i % 3 == 1:
        files = {"image": (f"im{i}.png", image, "image/png")}
        return "/caption", {"files": files, "data": {"num_beams": "3", "max_new_tokens": "10"}}
    return "/answer", {"json": {"image": b64, "question": "what color is the shape ?"}}


async def fire(
    base_url: str, n_requests: int, concurrency: int, timeout_s: float = 120.0
) -> tuple[Counter[int], float]:
    """Send ``n_requests`` with at most ``concurrency`` in flight (all of them at once when equal)."""
    images = sample_images(n_requests)
    statuses: Counter[int] = Counter()
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s) as client:

        async def one(i: int) -> None:
            path, kwargs = _request(i, images[i])
            async with gate:
                response = await client.post(path, **kwargs)
            if response.status_code not in (200, 503):
                raise AssertionError(f"request {i} to {path}: {response.status_code} {response.text[:300]}")
            body = response.json()
            if response.status_code == 200 and not ("caption" in body or "answers" in body):
                raise AssertionError(f"request {i}: unexpected body {body}")
            if response.status_code == 503 and "error" not in body:
                raise AssertionError(f"request {i}: 503 without a JSON error: {body}")
            statuses[response.status_code] += 1

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n_requests)))
        seconds = time.perf_counter() - start
        health = await client.get("/healthz")  # still alive and answering
        health.raise_for_status()
    return statuses, seconds


@contextlib.contextmanager
def server_process(args: argparse.Namespace, max_batch: int) -> Iterator[str]:
    """This script with ``--serve-only``, in a subprocess (its own GIL, like a real deployment) → base URL."""
    command = [sys.executable, __file__, "--serve-only", "--max-batch", str(max_batch)]
    command += ["--queue-size", str(args.queue_size), "--torch-threads", str(args.torch_threads)]
    command += ["--model", args.model] if args.model else []
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "URL http://127.0.0.1:PORT" once it listens
        if not line.startswith("URL "):
            raise RuntimeError(f"the server did not start (exit status {proc.wait(30)})")
        yield line.split()[1]
    finally:
        if proc.stdin:
            proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_only(args: argparse.Namespace) -> None:
    model, _ = _model(args)
    config = ServeConfig(max_batch=args.max_batch, queue_size=args.queue_size)
    with background_server(create_app(model, config)) as url:
        print("URL", url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


def measure(args: argparse.Namespace, max_batch: int) -> LoadResult:
    with server_process(args, max_batch) as url:
        asyncio.run(fire(url, min(16, args.requests), min(16, args.concurrency)))  # warm-up: first calls are slow
        before = httpx.get(url + "/healthz").json()["queue"]
        statuses, seconds = asyncio.run(fire(url, args.requests, args.concurrency))
        after = httpx.get(url + "/healthz").json()["queue"]
    batches = after["batches_run"] - before["batches_run"]
    requests = after["requests_run"] - before["requests_run"]
    model_seconds = after["model_seconds"] - before["model_seconds"]
    return LoadResult(statuses, seconds, requests / max(batches, 1), model_seconds / max(requests, 1))


def _describe(label: str, result: LoadResult) -> str:
    codes = ", ".join(f"{code}: {n}" for code, n in sorted(result.statuses.items()))
    return (
        f"{label:<20} {result.seconds:6.2f} s {result.throughput:7.1f} req/s  ({codes}; mean batch "
        f"{result.mean_batch:.1f}; model time {1000 * result.model_s_per_request:.1f} ms/request)"
    )


def _model(args: argparse.Namespace) -> tuple[Any, str]:
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.model:
        from blip2.checkpoints import load_any

        return load_any(args.model).eval(), args.model
    from blip2.testing import make_tiny_model

    return make_tiny_model(None, llm="opt"), "tiny random OPT model (blip2.testing)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the random tiny OPT model)")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="the server's intra-op threads (0: torch's default)"
    )
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_only:
        _serve_only(args)
        return 0
    if args.concurrency < 50:
        print("note: fewer than 50 concurrent requests", file=sys.stderr)
    name = args.model or "tiny random OPT model (blip2.testing)"
    print(
        f"model: {name}; {args.requests} requests, {args.concurrency} concurrent, queue {args.queue_size}, "
        f"server torch threads {args.torch_threads or 'default'}"
    )
    batched = measure(args, args.max_batch)
    print(_describe(f"batched (max {args.max_batch})", batched))
    single = measure(args, 1)
    print(_describe("one at a time", single))
    model_ratio = single.model_s_per_request / batched.model_s_per_request
    print(f"model time per request, one-at-a-time / batched: {model_ratio:.2f}")
    print(f"throughput ratio batched / one-at-a-time: {batched.throughput / single.throughput:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
