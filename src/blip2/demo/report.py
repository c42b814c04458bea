"""The demo's HTML report: headline metrics, loss curves, and sample held-out images with their generated
captions and zero-shot answers. One self-contained file (images embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }
.sample { display: flex; gap: 1.2em; margin-bottom: 1.5em; border-bottom: 1px solid #eee; padding-bottom: 1em; }
.sample img { width: 192px; height: 192px; image-rendering: pixelated; }
.ok { color: #176117; } .bad { color: #a31515; } .muted { color: #777; font-size: 0.9em; }
"""


def _png_data_uri(image: Image.Image | Path) -> str:
    if isinstance(image, Path):
        data = image.read_bytes()
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if value is None:
        return "–"
    return html.escape(str(value))


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _samples(split_dir: Path, results: dict[str, Any], n: int) -> str:
    from blip2.eval.scenes import load_scenes_eval

    data = load_scenes_eval(split_dir)
    captions = (results.get("captions") or {}).get("predictions", {})
    vqa = results.get("vqa") or {}
    answers, raw = vqa.get("predictions", {}), vqa.get("raw_answers", {})
    by_image: dict[Any, list[Any]] = {}
    for qid, q in data["questions"].items():
        by_image.setdefault(q["image_id"], []).append(qid)
    blocks = []
    for image_id in list(data["paths"])[:n]:
        rows = []
        for qid in by_image.get(image_id, []):
            truth = data["annotations"][qid]["answers"][0]
            got = answers.get(qid, answers.get(str(qid)))
            shown = raw.get(qid, raw.get(str(qid), ""))
            cls = "ok" if got is not None and got == _normal(truth) else "bad"
            rows.append(
                f"<tr><td>{html.escape(data['questions'][qid]['question'])}</td>"
                f"<td class='{cls}'>{_fmt(got)}</td><td>{html.escape(truth)}</td>"
                f"<td class='muted'>{html.escape(str(shown))}</td></tr>"
            )
        caption = captions.get(image_id, captions.get(str(image_id), "–"))
        refs = "<br>".join(html.escape(r) for r in data["references"][image_id][:2])
        blocks.append(
            "<div class='sample'>"
            f"<img src='{_png_data_uri(Path(data['paths'][image_id]))}' alt='scene {image_id}'>"
            f"<div><p><b>generated caption:</b> {html.escape(str(caption))}</p>"
            f"<p class='muted'>reference captions:<br>{refs}</p>"
            "<table><tr><th>question (zero-shot)</th><th>answer</th><th>truth</th><th>raw generation</th></tr>"
            + "".join(rows)
            + "</table></div></div>"
        )
    return "".join(blocks)


def _normal(answer: str) -> str:
    from blip2.eval.vqa import normalize_vqa_answer

    return normalize_vqa_answer(answer)


def write_report(
    path: Path,
    split_dir: Path,
    results: dict[str, Any],
    metrics: dict[str, Any],
    plots: Sequence[Path],
    n_samples: int,
) -> Path:
    """Write ``report.html`` and return its path."""
    head = metrics.get("headline", {})
    rows: list[tuple[str, Any]] = [
        ("image→text R@1 (ITC + ITM re-rank)", head.get("i2t_r1")),
        ("text→image R@1", head.get("t2i_r1")),
        ("caption attribute accuracy (objects named right)", head.get("caption_attribute_accuracy")),
        ("captions naming every object", head.get("caption_exact")),
        ("CIDEr", head.get("CIDEr")),
        ("BLEU-4", head.get("BLEU-4")),
        ("zero-shot VQA accuracy", head.get("vqa_overall")),
    ]
    rows += [(f"  VQA: {t}", a) for t, a in (head.get("vqa_per_type") or {}).items()]
    if head.get("vqa_true_caption_overall") is not None:
        rows.append(
            ("LLM ceiling: VQA with the true description before the question", head["vqa_true_caption_overall"])
        )
        per_type = (head.get("vqa_true_caption_per_type") or {}).items()
        rows += [(f"  VQA (true description): {t}", a) for t, a in per_type]
    rows += [("wall time (s)", metrics.get("wall_time_s")), ("peak memory (MB)", metrics.get("peak_rss_mb"))]
    retrieval = results.get("retrieval") or {}
    recall_rows = [(k, retrieval.get(k)) for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")]
    plots_html = "".join(
        f"<figure><img src='{_png_data_uri(p)}' style='max-width:100%'><figcaption>{html.escape(p.stem)}"
        "</figcaption></figure>"
        for p in plots
    )
    settings = html.escape(json.dumps(metrics.get("settings", {}), indent=2))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>BLIP-2 offline demo</title>"
        f"<style>{_STYLE}</style></head><body>"
        "<h1>BLIP-2, pretrained offline on synthetic scenes</h1>"
        "<p>A frozen image encoder and a frozen Gemma 3 270M, bridged by a Q-Former trained in two stages "
        "(stage 1: contrastive, matching and captioning losses; stage 2: the LLM learns to caption from the "
        "Q-Former's visual prompt). No question was seen in training: the answers below are zero-shot. Every "
        "test image holds a colour–shape pair that never appears in training.</p>"
        f"<h2>Held-out results</h2>{_table(rows)}"
        f"<h3>Retrieval recall</h3>{_table(recall_rows)}"
        f"<h2>Training</h2>{plots_html}"
        f"<h2>Samples</h2>{_samples(split_dir, results, n_samples)}"
        f"<h2>Settings</h2><pre>{settings}</pre></body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path
