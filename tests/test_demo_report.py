"""The demo's HTML report (`blip2.demo.report`) from hand-made results in `run_eval`'s exact formats, the loss
plot, and `eval_retrieval`'s per-image top-k list that the report's retrieval example reads. The browser test
renders the report in headless Chromium (skipped without it) and saves a screenshot to
``test-artifacts/demo_report.png``."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from blip2.data.scene_files import write_split
from blip2.data.scenes import detailed_caption
from blip2.demo.report import loss_curves_png, write_report
from blip2.eval.scenes import load_scenes_eval
from blip2.eval.vqa import normalize_vqa_answer

SPLITS = ("test", "compositional", "shifted")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def fake_result(split_dir: Path, with_retrieval: bool) -> dict[str, Any]:
    """`run_eval(..., keep_predictions=True)`'s result on a split: image 0's caption names every object, the
    others name none; even-numbered questions are answered right, odd ones wrong."""
    data = load_scenes_eval(split_dir)
    ids = list(data["references"])
    captions = {i: detailed_caption(data["objects"][i]) if i == ids[0] else "a picture" for i in ids}
    predictions, raw = {}, {}
    for k, qid in enumerate(sorted(data["annotations"])):
        truth = data["annotations"][qid]["answers"][0]
        predictions[qid] = normalize_vqa_answer(truth) if k % 2 == 0 else "wrongness"  # as postprocess_answer
        raw[qid] = predictions[qid].capitalize() + ("." if k % 2 == 0 else ", I think.")  # the wrong: cut
    per_type = {a["question_type"]: 0.5 for a in data["annotations"].values()}
    result: dict[str, Any] = {
        "retrieval": None,
        "captions": {
            "n_images": len(ids),
            "BLEU-1": 0.6,
            "BLEU-4": 0.25,
            "CIDEr": 0.9,
            "tokenizer": "simple",
            "attributes": {"exact": 1 / 3, "object": 0.4, "color": 0.5, "shape": 0.5, "size": float("nan")},
            "predictions": captions,
        },
        "vqa": {
            "overall": 0.5,
            "per_type": per_type,
            "per_answer_type": {"other": 0.5},
            "n_questions": len(predictions),
            "template": "Question: {} Short answer:",
            "answer_words": 0,
            "predictions": predictions,
            "raw_answers": raw,
            "context": None,
        },
    }
    if with_retrieval:
        texts = [t for i in ids for t in data["references"][i]]
        text_image = [n for n, i in enumerate(ids) for _ in data["references"][i]]
        first_wrong = text_image.index(1)
        top = [[[0, 3.5], [first_wrong, 2.25], [1, 2.0], [2, 1.0], [3, 0.5]] for _ in ids]
        recall = {f"{d}_r{k}": 0.5 for d in ("i2t", "t2i") for k in (1, 5, 10)}
        result["retrieval"] = recall | {
            "itc_only": dict(recall),
            "k": 128,
            "n_images": len(ids),
            "n_texts": len(texts),
            "i2t_top": top,
            "texts": texts,
            "text_image": text_image,
        }
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("scenes")
    split_dirs = {s: write_split(root, s, 3, seed=0, image_size=64) for s in SPLITS}
    results = {s: fake_result(d, with_retrieval=s == "test") for s, d in split_dirs.items()}
    metrics = {
        "headline": {
            "image_to_text_R@1": 0.5,
            "text_to_image_R@1": 0.5,
            "caption_attribute_accuracy": 0.4,
            "captions_naming_every_object": 1 / 3,
            "CIDEr": None,
            "BLEU-4": 0.25,
            "zero_shot_vqa": 0.5,
            "zero_shot_vqa_per_type": results["test"]["vqa"]["per_type"],
        },
        "image_encoder_probe": {"color": 0.99, "shape": 0.97, "size": 0.9, "position": 1.0, "object": 0.88},
        "llm_ceiling": {"overall": 0.96, "per_type": {"color": 1.0, "count": 0.9}, "llm": "Gemma 3 270M"},
        "targets": {"image_to_text_R@1": 0.4, "zero_shot_vqa": 0.8},
        "wall_time_s": 754.2,
        "peak_rss_mb": 2300.0,
        "settings": {"seed": 0, "n_train": 10},
        "llm_name": "Gemma 3 270M",
    }
    losses = {
        "image encoder": [2.0, 1.5, 1.0],
        "language model": [],
        "stage 1": [9.0 - 0.01 * i for i in range(300)],
        "stage 2": [3.0, 2.0],
    }
    path = write_report(root / "report.html", split_dirs, results, metrics, losses, n_samples=3)
    return path, path.read_text(encoding="utf-8"), split_dirs


def _row(page: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is ``label``."""
    for row in re.findall(r"<tr>(.*?)</tr>", page):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r}")


def test_report_reads_as_a_result(report: tuple[Path, str, dict[str, Path]]) -> None:
    path, page, split_dirs = report
    assert path.name == "report.html" and page.startswith("<!doctype html>")
    assert "no question was ever paired with an image" in page.lower() and "Gemma 3 270M" in page
    # the headline table: plain labels, one column per split, the target; None and NaN as "–"
    label = "image → text retrieval, recall@1 (each image's full description)"
    i2t = _row(page, label)
    assert i2t == [label, "50.0%", "–", "–", "≥ 40.0%"]  # retrieval: test only
    assert _row(page, "captions naming each object's colour and shape")[1:4] == ["33.3%"] * 3
    cider = _row(page, "CIDEr (captions against the references)")
    assert cider[1:] == ["–", "0.900", "0.900", "–"]  # the headline's None (metrics.json is the record)
    assert _row(page, "zero-shot VQA accuracy")[1:] == ["50.0%", "50.0%", "50.0%", "≥ 80.0%"]
    for label in ("VQA: colour questions", "VQA: shape questions", "VQA: counting questions"):
        assert _row(page, label)[1:4] == ["50.0%"] * 3
    assert "class='num ok'>50.0%" in page and "class='num bad'>50.0%" in page  # met / missed targets
    assert "1 of the 2 figures with a target meet it" in page
    for split in SPLITS:
        assert f"<b>{split}</b>:" in page  # one line explaining each split
    # the frozen parts
    assert _row(page, "colour") == ["colour", "99.0%", "≥ 95.0%"]
    assert _row(page, "size")[1] == "90.0%" and "the true description in words" in page
    assert _row(page, "all questions") == ["all questions", "96.0%", "≥ 95.0%"]


def test_report_samples_retrieval_and_training(report: tuple[Path, str, dict[str, Path]]) -> None:
    _, page, split_dirs = report
    test = load_scenes_eval(split_dirs["test"])
    first = list(test["references"])[0]
    # samples: 3 test + 2 shifted cards, each with an image; captions and answers marked ✓ / ✗
    assert page.count("<div class='card'>") == 3 + 2 + 1  # + the retrieval example
    assert page.count("alt='scene ") == 5
    assert "names every object" in page and "misses or misnames an object" in page
    assert "<span class='mark ok'>✓</span>" in page and "<span class='mark bad'>✗</span>" in page
    assert "✗</span> wrongness <span class='muted'>(said “Wrongness, I think.”)" in page
    assert "said “Yes.”" not in page and "said “No.”" not in page  # the whole generation was the answer
    shifted = load_scenes_eval(split_dirs["shifted"])
    assert shifted["questions"][min(shifted["questions"])]["question"] in html.unescape(page)
    # retrieval: the first test image's top 5, the right texts marked
    retrieval = page.split("<h2>Retrieval example</h2>")[1].split("<h2>")[0]
    assert "alt='retrieval query scene" in retrieval and retrieval.count("<tr><td class='num'>") == 5
    assert "4 of the top 5 belong to this image" in retrieval
    assert _row(retrieval, "1") == ["1", "✓", test["references"][first][0], "3.50"]
    assert _row(retrieval, "2")[1] == ""  # a text of another image: not marked
    # training: the loss curves as an embedded PNG, the empty stage left out
    assert re.search(r"<img src='data:image/png;base64,[A-Za-z0-9+/=]+' alt='loss curves", page)
    assert "stage 1</b>: 9.000 → 6.010 over 300 logged steps" in page and "language model</b>" not in page
    assert "12 min 34 s" in page and "2.2 GB" in page and "<details><summary>settings</summary>" in page
    assert "src='http" not in page and "<script" not in page  # self-contained


def test_report_without_predictions_or_losses(tmp_path: Path) -> None:
    split = write_split(tmp_path, "test", 2, seed=1, image_size=32)
    page = write_report(tmp_path / "r.html", {"test": split}, {"test": {}}, {}, {"stage 1": []}, 2).read_text()
    assert "No ranking was kept" in page and "No loss was logged" in page
    assert "(not generated)" in page and page.count("alt='scene ") == 2
    assert _row(page, "zero-shot VQA accuracy")[1:] == ["–", "–", "–", "–"]


def test_loss_curves_png() -> None:
    assert loss_curves_png({"stage 1": [], "stage 2": []}) is None
    png = loss_curves_png({"stage 2": [1.0, 0.5]})
    assert png is not None and png.startswith(b"\x89PNG")


def test_eval_retrieval_keeps_each_images_top_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``top``, `eval_retrieval` keeps each image's best texts (shortlisted only, best first); without,
    nothing changes, and `without_predictions` drops the lists."""
    from blip2.eval.runner import eval_retrieval, without_predictions
    from blip2.inference import tasks

    inf = float("-inf")
    i2t = torch.tensor([[0.9, 0.1, inf, 0.5], [inf, inf, 0.8, 0.7]])  # (2 images, 4 texts), k=2 shortlist

    def fake_retrieve(model: Any, images: list[str], texts: list[str], k: int, batch_size: int) -> dict[str, Any]:
        return {"itc": i2t.clamp(min=0), "i2t": i2t, "t2i": i2t.T}

    monkeypatch.setattr(tasks, "retrieve", fake_retrieve)
    texts = [["a", "b"], ["c", "d"]]
    plain = eval_retrieval(object(), ["x.png", "y.png"], texts, k=2)
    assert "i2t_top" not in plain and "texts" not in plain
    kept = eval_retrieval(object(), ["x.png", "y.png"], texts, k=2, top=5)
    assert kept["i2t_top"] == [[[0, 0.9], [3, 0.5], [1, 0.1]], [[2, 0.8], [3, 0.7]]]
    assert kept["texts"] == ["a", "b", "c", "d"] and kept["text_image"] == [0, 0, 1, 1]
    assert {k: v for k, v in kept.items() if k not in ("i2t_top", "texts", "text_image")} == plain
    assert without_predictions({"retrieval": kept})["retrieval"] == plain


@pytest.mark.browser
def test_report_in_chromium(report: tuple[Path, str, dict[str, Path]]) -> None:
    """The page renders in a real browser: every image decodes, nothing overflows sideways."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    path, _, _ = report
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(
                executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"], headless=True
            )
        except Exception as exc:  # a broken install must not fail the suite with a cryptic trace
            pytest.skip(f"chromium does not start: {exc}")
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(path.as_uri())
            broken = page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
            n_images = page.evaluate("document.images.length")
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo_report.png"), full_page=True)
        finally:
            browser.close()
    assert n_images == 3 + 2 + 1 + 1 and broken == 0
    assert overflow <= 0
