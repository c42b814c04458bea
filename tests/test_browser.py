"""The web page in real headless Chromium: upload an image, see a caption, ask a question, see the answer.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright`` Python package; skipped
cleanly without either. Playwright's own browser download (``playwright install``) is never used: we launch
the system Chromium. A screenshot of the finished page goes to ``test-artifacts/serve_page.png``.
"""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from blip2.serve.app import ServeConfig, create_app
from blip2.serve.server import background_server
from blip2.testing import make_tiny_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


class SlowModel:
    """The tiny model, slowed down so the page's busy state is observable."""

    def __init__(self, model: Any, delay: float) -> None:
        self.model, self.delay, self.config = model, delay, model.config

    def caption(self, *args: Any, **kwargs: Any) -> list[str]:
        time.sleep(self.delay)
        return self.model.caption(*args, **kwargs)

    def answer(self, *args: Any, **kwargs: Any) -> list[str]:
        time.sleep(self.delay)
        return self.model.answer(*args, **kwargs)


def scene_png(path: Path) -> Path:
    image = Image.new("RGB", (160, 120), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 30, 70, 80), fill="red")
    draw.rectangle((95, 40, 140, 85), fill="blue")
    image.save(path, "PNG")
    return path


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = create_app(SlowModel(make_tiny_model(None, llm="opt"), delay=0.4), ServeConfig())
    with background_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url: str) -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except Exception as exc:  # a broken install must not fail the suite with a cryptic trace
            pytest.skip(f"chromium would not start under playwright: {exc}")
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.set_default_timeout(30_000)
        page.goto(base_url)
        yield page
        browser.close()


def test_caption_question_and_answer(page: Any, tmp_path: Path) -> None:
    expect = sync_api.expect
    expect(page.locator("#status")).to_contain_text("caption, answer")
    expect(page.locator("#ask")).to_be_disabled()  # nothing to ask about yet

    page.set_input_files("#file", str(scene_png(tmp_path / "scene.png")))
    expect(page.locator("#caption-busy")).to_be_visible()  # busy while the model works
    expect(page.locator("#recaption")).to_be_disabled()
    expect(page.locator("#caption")).not_to_be_empty()
    expect(page.locator("#caption-busy")).to_be_hidden()
    expect(page.locator("#preview")).to_be_visible()
    assert page.locator("#caption").inner_text().strip()

    page.fill("#question", "what color is the circle ?")
    page.click("#ask")
    expect(page.locator("#ask-busy")).to_be_visible()
    answer = page.locator("#answers li").first
    expect(answer).to_contain_text("what color is the circle ? →")
    assert answer.locator(".a").inner_text().strip()
    expect(page.locator("#ask")).to_be_enabled()
    expect(page.locator("#error")).to_be_hidden()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)


def test_errors_are_shown_and_the_page_recovers(page: Any, tmp_path: Path) -> None:
    expect = sync_api.expect
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is text, not a picture")
    page.set_input_files("#file", str(bad))
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("400")
    expect(page.locator("#error")).to_contain_text("not an image")
    expect(page.locator("#recaption")).to_be_enabled()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page_error.png"), full_page=True)

    good = io.BytesIO()
    Image.new("RGB", (40, 40), "green").save(good, "PNG")
    (tmp_path / "green.png").write_bytes(good.getvalue())
    page.set_input_files("#file", str(tmp_path / "green.png"))
    expect(page.locator("#caption")).not_to_be_empty()
    expect(page.locator("#error")).to_be_hidden()


def test_stage1_model_page_ranks_texts(page: Any, tmp_path: Path) -> None:
    """The same page on a Blip2QFormer server: no question box, a text-ranking box instead."""
    expect = sync_api.expect
    with background_server(create_app(make_tiny_model(None, llm=None))) as url:
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("caption, retrieve")
        expect(page.locator("#ask-section")).to_be_hidden()
        page.set_input_files("#file", str(scene_png(tmp_path / "scene.png")))
        expect(page.locator("#caption")).not_to_be_empty()
        page.fill("#texts", "a red circle\na blue square\n\ntwo stars")
        page.click("#rank")
        expect(page.locator("#ranking li")).to_have_count(3)
        expect(page.locator("#error")).to_be_hidden()
