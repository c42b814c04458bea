"""The HTTP API (blip2.serve.app) in-process: every endpoint, both encodings, every bad input, batching, queue full.

Over real HTTP (load, slow and vanished clients): tests/test_serve_http.py."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import ColourModel, assert_error, b64, png, post_concurrently, upload

from blip2.data.images import load_image
from blip2.model import Blip2, Blip2QFormer
from blip2.serve.app import ServeConfig, create_app
from blip2.serve.batching import BatcherClosed, MicroBatcher, QueueFull
from blip2.serve.server import load_model
from blip2.testing import make_tiny_model


@pytest.fixture(scope="module")
def llm_model() -> Blip2:
    return make_tiny_model(None, llm="opt")


@pytest.fixture(scope="module")
def qformer_model() -> Blip2QFormer:
    return make_tiny_model(None, llm=None)


@pytest.fixture(scope="module")
def client(llm_model: Blip2) -> Iterator[TestClient]:
    with TestClient(create_app(llm_model)) as c:
        yield c


@pytest.fixture(scope="module")
def qclient(qformer_model: Blip2QFormer) -> Iterator[TestClient]:
    with TestClient(create_app(qformer_model)) as c:
        yield c


# ------------------------------------------------------------------------------------------------ endpoints
def test_healthz(client: TestClient, qclient: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "Blip2"
    assert health["tasks"] == ["caption", "answer"]
    assert health["queue"]["capacity"] == 64 and health["max_upload_bytes"] == 10 * 1024 * 1024
    assert qclient.get("/healthz").json()["tasks"] == ["caption", "retrieve"]


def test_openapi_documents_both_encodings(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/caption", "/answer", "/retrieve", "/healthz"} <= set(schema["paths"])
    for path in ("/caption", "/answer", "/retrieve"):
        post = schema["paths"][path]["post"]
        content = post["requestBody"]["content"]
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
        assert "image" in content["application/json"]["schema"]["required"]
        assert {"200", "400", "413", "503"} <= set(post["responses"])
    assert (
        "texts"
        in schema["paths"]["/retrieve"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )
    assert client.get("/docs").status_code == 200


def test_page_and_its_assets(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "/static/app.js" in page.text
    assert "fetch(" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200


def test_caption_matches_the_model(client: TestClient, llm_model: Blip2) -> None:
    """The server's decoding and pre-resizing give exactly the model's own caption."""
    image = png((61, 45), (20, 120, 220))
    expected = llm_model.caption([load_image(image)])[0]
    multipart = client.post("/caption", files=upload(image))
    assert multipart.status_code == 200, multipart.text
    assert multipart.json() == {"caption": expected, "batch_size": 1}
    as_json = client.post("/caption", json={"image": b64(image)})
    assert as_json.json()["caption"] == expected
    data_url = client.post("/caption", json={"image": "data:image/png;base64," + b64(image)})
    assert data_url.json()["caption"] == expected


def test_caption_parameters(client: TestClient, llm_model: Blip2) -> None:
    image = png()
    expected = llm_model.caption([load_image(image)], prompt="a photo of", num_beams=2, max_new_tokens=5)[0]
    r = client.post("/caption", json={"image": b64(image), "prompt": "a photo of", "num_beams": 2, "max_new_tokens": 5})
    assert r.json()["caption"] == expected
    r = client.post(
        "/caption", files=upload(image), data={"prompt": "a photo of", "num_beams": "2", "max_new_tokens": "5"}
    )
    assert r.json()["caption"] == expected


def test_answer(client: TestClient, llm_model: Blip2) -> None:
    image = png()
    questions = ["what color is the circle ?", "how many shapes ?"]
    expected = llm_model.answer([load_image(image)] * 2, questions)
    r = client.post("/answer", json={"image": b64(image), "questions": questions})
    assert r.status_code == 200, r.text
    assert r.json()["answers"] == [{"question": q, "answer": a} for q, a in zip(questions, expected, strict=True)]
    r = client.post("/answer", files=upload(image), data={"question": questions[0]})
    assert r.json()["answers"] == [{"question": questions[0], "answer": expected[0]}]
    r = client.post("/answer", files=upload(image), data={"questions": questions})  # a repeated form field
    assert [qa["answer"] for qa in r.json()["answers"]] == expected


def test_retrieve_ranks_texts(qclient: TestClient, qformer_model: Blip2QFormer) -> None:
    image = png()
    texts = ["a red circle", "a blue square", "two green stars"]
    expected = qformer_model.retrieve([load_image(image)], texts, k=3)
    r = qclient.post("/retrieve", files=upload(image), data={"texts": texts})
    assert r.status_code == 200, r.text
    ranking = r.json()["ranking"]
    assert [x["index"] for x in ranking] == expected["i2t_ranking"][0].tolist()
    assert [x["text"] for x in ranking] == [texts[i] for i in expected["i2t_ranking"][0].tolist()]
    assert ranking[0]["score"] == pytest.approx(float(expected["i2t"][0].max()), abs=1e-5)
    r = qclient.post("/retrieve", json={"image": b64(image), "texts": texts, "k": 1})
    assert len(r.json()["ranking"]) == 1


def test_stage1_model_captions(qclient: TestClient, qformer_model: Blip2QFormer) -> None:
    image = png()
    r = qclient.post("/caption", files=upload(image))
    assert r.json()["caption"] == qformer_model.caption([load_image(image)])[0]


def test_each_task_needs_the_right_model(client: TestClient, qclient: TestClient) -> None:
    assert_error(client.post("/retrieve", files=upload(), data={"texts": ["a"]}), 400, "Blip2QFormer", "retriev")
    assert_error(qclient.post("/answer", files=upload(), data={"question": "what ?"}), 400, "stage-1", "answer")
    assert_error(qclient.post("/caption", files=upload(), data={"prompt": "a photo of"}), 400, "prompt")
    assert qclient.post("/caption", files=upload()).status_code == 200


# ------------------------------------------------------------------------------------------------ bad input
def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, "PNG")
    return buf.getvalue()[:-200]


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int, tuple[str, ...]]] = [
    (
        "not an image",
        "/caption",
        {"files": upload(b"hello, not an image", "notes.txt")},
        400,
        ("notes.txt", "not an image"),
    ),
    ("empty file", "/caption", {"files": upload(b"", "empty.png")}, 400, ("empty",)),
    ("truncated", "/caption", {"files": upload(_truncated_png(), "cut.png")}, 400, ("cut.png", "truncated")),
    ("no image", "/caption", {"data": {"prompt": "a"}, "files": {"other": ("x", b"x")}}, 400, ("'image' is missing",)),
    ("image as text", "/caption", {"data": {"image": "abc"}, "files": {"f": ("x", b"x")}}, 400, ("file upload",)),
    (
        "bad json",
        "/caption",
        {"content": b'{"image": ', "headers": {"content-type": "application/json"}},
        400,
        ("JSON",),
    ),
    ("json list", "/caption", {"json": ["image"]}, 400, ("object",)),
    ("json no image", "/caption", {"json": {"prompt": "a"}}, 400, ("'image' is missing",)),
    ("bad base64", "/caption", {"json": {"image": "this is *not* base64!"}}, 400, ("base64",)),
    ("bad padding", "/caption", {"json": {"image": "iVBORw0KGgo"}}, 400, ("base64",)),
    ("image not str", "/caption", {"json": {"image": 42}}, 400, ("base64 string",)),
    ("empty base64", "/caption", {"json": {"image": ""}}, 400, ("empty",)),
    ("base64 of text", "/caption", {"json": {"image": b64(b"plain text")}}, 400, ("not an image",)),
    ("typo field", "/caption", {"json": {"image": b64(png()), "num_beam": 2}}, 400, ("num_beam", "unknown field")),
    ("beams 0", "/caption", {"json": {"image": b64(png()), "num_beams": 0}}, 400, ("num_beams",)),
    ("beams text", "/caption", {"files": upload(), "data": {"num_beams": "many"}}, 400, ("num_beams",)),
    ("twice", "/caption", {"files": upload(), "data": {"prompt": ["a", "b"]}}, 400, ("prompt", "2 times")),
    ("empty question", "/answer", {"files": upload(), "data": {"question": "   "}}, 400, ("question", "empty")),
    (
        "empty in list",
        "/answer",
        {"json": {"image": b64(png()), "questions": ["ok ?", ""]}},
        400,
        ("question 2", "empty"),
    ),
    ("no questions", "/answer", {"json": {"image": b64(png()), "questions": []}}, 400, ("questions",)),
    ("no question", "/answer", {"files": upload()}, 400, ("question",)),
    ("both", "/answer", {"json": {"image": b64(png()), "question": "a", "questions": ["b"]}}, 400, ("either",)),
    ("too many", "/answer", {"json": {"image": b64(png()), "questions": ["what ?"] * 9}}, 400, ("9 questions", "8")),
    ("long question", "/answer", {"json": {"image": b64(png()), "question": "why " * 300}}, 400, ("question",)),
    ("text/plain", "/caption", {"content": b"hi", "headers": {"content-type": "text/plain"}}, 415, ("multipart",)),
    ("no type", "/caption", {"content": b"hi"}, 415, ("content-type",)),
    (
        "deep json",  # json's parser recursed until RecursionError: a 500 (issue 16)
        "/caption",
        {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
        400,
        ("nested too deeply",),
    ),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "words"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_then_a_good_one(
    client: TestClient, path: str, kwargs: dict[str, Any], status: int, words: tuple[str, ...]
) -> None:
    assert_error(client.post(path, **kwargs), status, *words)
    good = client.post("/caption", files=upload())
    assert good.status_code == 200 and good.json()["caption"]


def test_bad_retrieve_requests(qclient: TestClient) -> None:
    assert_error(qclient.post("/retrieve", files=upload()), 400, "texts")
    assert_error(qclient.post("/retrieve", files=upload(), data={"texts": ["a", " "]}), 400, "text 2", "empty")
    assert_error(qclient.post("/retrieve", json={"image": b64(png()), "texts": []}), 400, "texts")
    assert_error(qclient.post("/retrieve", json={"image": b64(png()), "texts": ["a"], "k": 0}), 400, "k")
    assert qclient.post("/retrieve", files=upload(), data={"texts": ["a"]}).status_code == 200


def test_unknown_paths_and_methods_answer_json(client: TestClient) -> None:
    assert_error(client.get("/nowhere"), 404, "/nowhere")
    assert_error(client.get("/caption"), 405, "GET")


def test_size_limits(llm_model: Blip2) -> None:
    config = ServeConfig(max_upload_bytes=20_000, max_pixels=100 * 100)
    big = png((90, 90))
    noisy = io.BytesIO()
    Image.effect_noise((120, 120), 60).convert("RGB").save(noisy, "PNG")
    too_big = noisy.getvalue()
    assert len(too_big) > 20_000 and len(big) < 20_000
    with TestClient(create_app(llm_model, config)) as c:
        assert_error(c.post("/caption", files=upload(too_big)), 413, "bytes", "limit")
        assert_error(c.post("/caption", json={"image": b64(too_big)}), 413, "limit")
        assert_error(c.post("/caption", files=upload(b"x" * 100_000)), 413, "limit")  # the body limit itself
        assert_error(c.post("/caption", files=upload(png((101, 100)), "wide.png")), 413, "wide.png", "10100 pixels")
        assert c.post("/caption", files=upload(big)).status_code == 200


def test_streamed_body_over_the_limit(llm_model: Blip2) -> None:
    """No Content-Length (chunked upload): the limit is enforced while reading."""
    with TestClient(create_app(llm_model, ServeConfig(max_upload_bytes=1000))) as c:
        chunks = (b"A" * 500_000 for _ in range(5))  # 2.5 MB, over 1000 * 4/3 + 1 MiB of slack
        r = c.post("/caption", content=chunks, headers={"content-type": "application/json"})
        assert_error(r, 413, "limit")
        assert c.post("/caption", files=upload(png((8, 8)))).status_code == 200


# ------------------------------------------------------------------------------------------------ batching


def test_concurrent_requests_share_model_calls() -> None:
    model = ColourModel(delay=0.02)
    app = create_app(model, ServeConfig(max_batch=4, max_wait_ms=50))
    colours = [(i * 10, 255 - i * 10, 7) for i in range(12)]
    requests = [("/caption", {"files": upload(png(colour=c))}) for c in colours]
    requests += [("/caption", {"json": {"image": b64(png(colour=c)), "num_beams": 2}}) for c in colours[:4]]
    requests += [("/answer", {"json": {"image": b64(png(colour=c)), "questions": ["q1", "q2"]}}) for c in colours[:3]]
    responses = asyncio.run(post_concurrently(app, requests))
    app.state.batcher.close()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for r, c in zip(responses[:16], colours + colours[:4], strict=True):  # each request got its own result
        assert r.json()["caption"] == str(c)
    assert responses[16].json()["answers"] == [
        {"question": "q1", "answer": f"q1 {colours[0]}"},
        {"question": "q2", "answer": f"q2 {colours[0]}"},
    ]
    caption_calls = [n for kind, n, _ in model.calls if kind == "caption"]
    assert max(caption_calls) > 1 and max(caption_calls) <= 4 and sum(caption_calls) == 16
    assert {beams for kind, _, beams in model.calls if kind == "caption"} == {None, 2}  # never mixed: separate keys
    assert sum(n for kind, n, _ in model.calls if kind == "answer") == 6


def test_a_refused_request_fails_alone() -> None:
    bad = (1, 2, 3)
    app = create_app(ColourModel(refuse=bad), ServeConfig(max_batch=8, max_wait_ms=100))
    colours = [(50, 50, 50), bad, (60, 60, 60)]
    responses = asyncio.run(post_concurrently(app, [("/caption", {"files": upload(png(colour=c))}) for c in colours]))
    app.state.batcher.close()
    assert [r.status_code for r in responses] == [200, 400, 200]
    assert "refuses" in responses[1].json()["error"]
    assert app.state.batcher.stats.largest_batch == 3


def test_model_crash_is_a_json_500_and_the_server_lives_on() -> None:
    class Flaky(ColourModel):
        fail = True

        def caption(
            self, images: list[Image.Image], prompt: str | None = None, batch_size: int = 8, **gen: Any
        ) -> list[str]:
            if self.fail:
                self.fail = False
                raise RuntimeError("CUDA out of memory (simulated)")
            return super().caption(images, prompt, batch_size, **gen)

    with TestClient(create_app(Flaky())) as c:
        assert_error(c.post("/caption", files=upload()), 500, "out of memory")
        assert c.post("/caption", files=upload()).status_code == 200


def test_queue_full_answers_503() -> None:
    entered, release = threading.Event(), threading.Event()

    class Gated(ColourModel):
        def caption(
            self, images: list[Image.Image], prompt: str | None = None, batch_size: int = 8, **gen: Any
        ) -> list[str]:
            entered.set()
            assert release.wait(20)
            return super().caption(images, prompt, batch_size, **gen)

    app = create_app(Gated(), ServeConfig(max_batch=1, queue_size=1, max_wait_ms=0))
    batcher = app.state.batcher

    async def scenario() -> tuple[httpx.Response, ...]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            running = asyncio.create_task(c.post("/caption", files=upload()))
            assert await asyncio.to_thread(entered.wait, 20)
            waiting = asyncio.create_task(c.post("/caption", files=upload()))
            while batcher.waiting < 1:
                await asyncio.sleep(0.005)
            rejected = await c.post("/caption", files=upload())
            health = await c.get("/healthz")  # the event loop is free while the model works
            release.set()
            return await running, await waiting, rejected, health

    running, waiting, rejected, health = asyncio.run(scenario())
    batcher.close()
    assert_error(rejected, 503, "busy")
    assert rejected.headers["retry-after"] == "1"
    assert running.status_code == waiting.status_code == 200
    assert health.json()["queue"]["waiting"] == 1


def test_timeout_answers_504() -> None:
    app = create_app(ColourModel(delay=0.5), ServeConfig(request_timeout_s=0.05))
    with TestClient(app) as c:
        assert_error(c.post("/caption", files=upload()), 504, "no result")


def test_batcher_close_fails_waiting_requests() -> None:
    gate, running = threading.Event(), threading.Event()

    def run(key: str, items: list[int]) -> list[bool]:
        running.set()
        return [gate.wait(5) for _ in items]

    batcher = MicroBatcher(run, max_batch=1, queue_size=2)
    first = batcher.submit_future("k", 1)
    assert running.wait(5)  # the worker holds the first item (a fixed sleep was a race on a loaded machine)
    second = batcher.submit_future("k", 2)
    third = batcher.submit_future("k", 3)
    with pytest.raises(QueueFull):
        batcher.submit_future("k", 4)
    gate.set()
    batcher.close()
    assert first.result(5) is True
    for future in (second, third):  # may have run before close; otherwise they fail cleanly
        assert future.exception(5) is None or isinstance(future.exception(), BatcherClosed)
    with pytest.raises(BatcherClosed):
        batcher.submit_future("k", 5)


def test_serve_loads_a_checkpoint_directory(tmp_path: Path) -> None:
    make_tiny_model(tmp_path, llm=None)
    assert isinstance(load_model(str(tmp_path), "cpu"), Blip2QFormer)
    model = make_tiny_model(None, llm="opt")
    assert load_model(model, "cpu") is model
