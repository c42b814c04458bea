"""The demo's HTML report: what was trained, the headline figures on three held-out splits against their
targets, the frozen parts measured alone, sample images with their captions and zero-shot answers, one
retrieval ranking, the loss curves and the run's cost. One self-contained file: images are embedded as
base64 PNG, no script, no external resource.

`write_report` is the entry point (the demo pipeline calls it); `loss_curves_png` draws the training losses.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SPLITS = ("test", "compositional", "shifted")
SPLIT_NOTES = {
    "test": "unseen scenes of the training distribution",
    "compositional": "each scene holds a colour–shape pair never seen in training",
    "shifted": "other background shades, wider placement, question wordings never seen in training",
}
# question type (blip2.data.scenes) → words for "VQA: … questions", in the order the report lists them
QUESTION_TYPES = {
    "color": "colour",
    "shape": "shape",
    "count": "counting",
    "exists": "“is there …?”",
    "position": "position",
}
PROBE_ATTRIBUTES = {
    "color": "colour",
    "shape": "shape",
    "size": "size",
    "position": "position (occupied or empty)",
    "object": "whole object (colour, shape and size all right)",
}
FROZEN_TARGET = 0.95  # what each frozen part must reach alone (used when metrics["targets"] names none)
N_SHIFTED_SAMPLES = 2
IMAGE_PX = 192

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1120px;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0 0.8em; }
td, th { border-bottom: 1px solid #e3e3e3; padding: 4px 12px; text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid #bbb; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.group th { background: #f4f4f6; font-weight: 600; }
td.indent { padding-left: 2em; }
.ok { color: #17702a; } .bad { color: #b3261e; } .muted { color: #6b6b70; font-size: 0.92em; }
td.ok, td.bad { font-weight: 600; } td .muted { font-weight: normal; }
.lead { font-size: 1.05em; max-width: 62em; }
.verdict { font-weight: 600; }
ul.splits { margin-top: 0.2em; } ul.splits li { margin: 0.1em 0; }
.samples { display: flex; flex-direction: column; gap: 1em; }
.card { display: flex; gap: 1em; border: 1px solid #e3e3e3; border-radius: 8px; padding: 0.8em; }
.card img { width: 192px; height: 192px; flex: none; image-rendering: pixelated; border-radius: 4px; }
.card table { margin: 0.3em 0 0; font-size: 0.93em; } .card td, .card th { padding: 2px 18px 2px 0; }
.card p { margin: 0 0 0.4em; }
.mark { font-weight: 700; }
figure { margin: 0.5em 0; } figure img { max-width: 100%; }
details pre { background: #f6f6f8; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""

# ------------------------------------------------------------------------------------------ formatting


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pct(value: Any) -> str:
    """A fraction as a percentage ("87.5%"); None or NaN as "–"."""
    return "–" if _missing(value) else f"{100 * float(value):.1f}%"


def _score(value: Any) -> str:
    return "–" if _missing(value) else f"{float(value):.3f}"


def _dig(mapping: Any, *keys: Any) -> Any:
    """``mapping[k1][k2]...`` or None where a level is missing or None."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _by_id(mapping: Mapping[Any, Any], key: Any, default: Any = None) -> Any:
    """``mapping[key]`` for an int id that may have become a string (results read back from JSON)."""
    if key in mapping:
        return mapping[key]
    return mapping.get(str(key), default)


def _png_data_uri(image: Path | bytes) -> str:
    data = image.read_bytes() if isinstance(image, Path) else image
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _mark(right: bool) -> str:
    return "<span class='mark ok'>✓</span>" if right else "<span class='mark bad'>✗</span>"


def _esc(text: Any) -> str:
    return html.escape(str(text))


# ------------------------------------------------------------------------------------------ loss curves


def loss_curves_png(losses: Mapping[str, Sequence[float]], dpi: int = 100) -> bytes | None:
    """The training losses as one PNG: one small subplot per non-empty list (titled with its name, in the
    given order, two per row), the logged values and, for longer runs, their running mean. None when every
    list is empty or matplotlib is not installed."""
    curves = [(name, [float(v) for v in values]) for name, values in losses.items() if len(values) > 0]
    if not curves:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    cols = min(2, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(curves) :]:
        ax.set_visible(False)
    for ax, (name, values) in zip(axes.flat, curves, strict=False):
        steps = range(1, len(values) + 1)
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = [
                sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                for i in range(len(values))
            ]
            ax.plot(steps, values, color="#9ab8de", linewidth=0.8)
            ax.plot(steps, smooth, color="#1f5fae", linewidth=1.6)
        else:
            ax.plot(steps, values, color="#1f5fae", linewidth=1.4, marker="." if len(values) < 30 else None)
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("logged step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def _training(losses: Mapping[str, Sequence[float]]) -> str:
    png = loss_curves_png(losses)
    lines = [
        f"<li><b>{_esc(name)}</b>: {float(values[0]):.3f} → {float(values[-1]):.3f}"
        f" over {len(values)} logged steps</li>"
        for name, values in losses.items()
        if len(values) > 0
    ]
    if png is None:
        return "<p class='muted'>No loss was logged (or matplotlib is not installed).</p>" + (
            f"<ul>{''.join(lines)}</ul>" if lines else ""
        )
    return (
        f"<figure><img src='{_png_data_uri(png)}' alt='loss curves of the training stages'>"
        f"<figcaption><ul>{''.join(lines)}</ul></figcaption></figure>"
    )


# ------------------------------------------------------------------------------------------ headline table

_I2T = "image → text retrieval, recall@1 (each image's full description)"
_T2I = "text → image retrieval, recall@1 (each image's full description)"
_I2T_CAPTIONS = "image → text recall@1, five captions per image"
_OBJECT = ("captions", "attributes", "object")
_EXACT = ("captions", "attributes", "exact")
# (label, headline key, path in one split's run_eval result, formatter)
_HEADLINE_ROWS: tuple[tuple[str, str, tuple[str, ...], Any], ...] = (
    (_I2T, "image_to_text_R@1", ("retrieval", "i2t_r1"), _pct),
    (_T2I, "text_to_image_R@1", ("retrieval", "t2i_r1"), _pct),
    (_I2T_CAPTIONS, "image_to_text_R@1_captions", ("retrieval_captions", "i2t_r1"), _pct),
    ("objects named with their colour and shape", "caption_attribute_accuracy", _OBJECT, _pct),
    ("captions naming each object's colour and shape", "captions_naming_every_object", _EXACT, _pct),
    ("CIDEr (captions against the references)", "CIDEr", ("captions", "CIDEr"), _score),
    ("BLEU-4 (captions against the references)", "BLEU-4", ("captions", "BLEU-4"), _score),
    ("zero-shot VQA accuracy", "zero_shot_vqa", ("vqa", "overall"), _pct),
)


def _question_types(*per_type: Any) -> list[str]:
    seen = {t for mapping in per_type if isinstance(mapping, Mapping) for t in mapping}
    return [t for t in QUESTION_TYPES if t in seen] + sorted(seen - set(QUESTION_TYPES))


def _type_label(question_type: str) -> str:
    return f"VQA: {QUESTION_TYPES.get(question_type, question_type)} questions"


def _vqa_type_target(targets: Mapping[str, Any], question_type: str) -> Any:
    per_type = targets.get("zero_shot_vqa_per_type")
    if isinstance(per_type, Mapping) and question_type in per_type:
        return per_type[question_type]
    if isinstance(per_type, int | float):  # one floor for every question type
        return per_type
    return targets.get(f"zero_shot_vqa_{question_type}")


def _headline(results: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    head = metrics.get("headline") or {}
    targets = metrics.get("targets") or {}
    rows: list[tuple[str, Any, list[Any], Any, Any, bool]] = []  # label, test, others, target, fmt, indented
    for label, key, where, fmt in _HEADLINE_ROWS:
        test = head[key] if key in head else _dig(results.get("test"), *where)  # metrics.json is the record
        others = [_dig(results.get(s), *where) for s in SPLITS[1:]]
        rows.append((label, test, others, targets.get(key), fmt, False))
    head_types = head.get("zero_shot_vqa_per_type") or {}
    split_types = [_dig(results.get(s), "vqa", "per_type") for s in SPLITS]
    for t in _question_types(head_types, *split_types):
        test = head_types[t] if isinstance(head_types, Mapping) and t in head_types else _dig(split_types[0], t)
        others = [_dig(p, t) for p in split_types[1:]]
        rows.append((_type_label(t), test, others, _vqa_type_target(targets, t), _pct, True))

    body, met, judged = [], 0, 0
    for label, test, others, target, fmt, indented in rows:
        cls = ""
        if not _missing(target) and not _missing(test):
            judged += 1
            met += float(test) >= float(target)
            cls = " ok" if float(test) >= float(target) else " bad"
        target_text = "–" if _missing(target) else "≥ " + fmt(target)
        cells = f"<td class='num{cls}'>{fmt(test)}</td>" + "".join(f"<td class='num'>{fmt(v)}</td>" for v in others)
        body.append(
            f"<tr><td{' class=indent' if indented else ''}>{_esc(label)}</td>{cells}"
            f"<td class='num muted'>{target_text}</td></tr>"
        )
    held = _dig(results.get("compositional"), "held_out_pairs") or {}
    target = targets.get("compositional_held_out_pairs")
    for label, key in (
        ("held-out pairs: objects named with their colour and shape", "caption_attribute_accuracy"),
        ("held-out pairs: zero-shot VQA on questions about them", "vqa"),
    ):
        if key in held:
            value = held[key]
            ok = "" if _missing(value) or _missing(target) else (" ok" if float(value) >= float(target) else " bad")
            body.append(
                f"<tr><td>{_esc(label)}</td><td class='num'>–</td><td class='num{ok}'>{_pct(value)}</td>"
                f"<td class='num'>–</td><td class='num muted'>{'–' if _missing(target) else '≥ ' + _pct(target)}"
                "</td></tr>"
            )
    header = "".join(f"<th class='num'>{s}</th>" for s in SPLITS)
    verdict = (
        f"<p class='verdict'>On the test split, {met} of the {judged} figures with a target meet it "
        "(green: met, red: missed).</p>"
        if judged
        else ""
    )
    notes = "".join(f"<li><b>{s}</b>: {_esc(SPLIT_NOTES[s])}</li>" for s in SPLITS)
    return (
        f"{verdict}<table><thead><tr><th></th>{header}<th class='num'>target</th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table><ul class='splits muted'>{notes}</ul>"
    )


# ------------------------------------------------------------------------------------------ frozen parts


def _frozen_parts(metrics: Mapping[str, Any]) -> str:
    targets = metrics.get("targets") or {}
    probe = metrics.get("image_encoder_probe") or {}
    ceiling = metrics.get("llm_ceiling") or {}
    llm = ceiling.get("llm") or metrics.get("llm_name") or "the LLM"

    def row(label: str, value: Any, target: Any, indented: bool = True) -> str:
        target = FROZEN_TARGET if _missing(target) else target
        cls = "" if _missing(value) else (" ok" if float(value) >= float(target) else " bad")
        return (
            f"<tr><td{' class=indent' if indented else ''}>{_esc(label)}</td>"
            f"<td class='num{cls}'>{_pct(value)}</td><td class='num muted'>≥ {_pct(target)}</td></tr>"
        )

    probe_target = targets.get("image_encoder_probe")
    rows = ["<tr class='group'><th colspan='3'>image encoder: linear probe on its frozen features</th></tr>"]
    extra = sorted(k for k in set(probe) - set(PROBE_ATTRIBUTES) if not k.startswith("n_"))  # n_*: counts
    keys = [k for k in PROBE_ATTRIBUTES if k in probe] + extra
    rows += [row(PROBE_ATTRIBUTES.get(k, k), probe[k], probe_target) for k in keys]
    if "n_train" in probe and "n_test" in probe:
        rows.append(
            f"<tr><td class='indent muted' colspan='3'>probe trained on {probe['n_train']} training images, "
            f"scored on {probe['n_test']} test images</td></tr>"
        )
    if not keys:
        rows.append("<tr><td class='indent muted' colspan='3'>not measured</td></tr>")
    llm_target = targets.get("llm_ceiling")
    rows.append(
        f"<tr class='group'><th colspan='3'>{_esc(llm)}: the true description in words, then the question</th></tr>"
    )
    rows.append(row("all questions", ceiling.get("overall"), llm_target))
    per_type = ceiling.get("per_type") or {}
    rows += [row(_type_label(t), per_type[t], llm_target) for t in _question_types(per_type)]
    return (
        "<p>Before BLIP-2 connects them, each frozen part is measured on its own. A fresh linear classifier on the "
        "image encoder's frozen features must read every object's colour, shape, size and place; the LLM, "
        "told the true scene description in words before each question, must answer it. The second figure "
        "is the ceiling for the zero-shot answers above: the Q-Former can at best tell the LLM what the "
        "description does.</p>"
        "<table><thead><tr><th></th><th class='num'>accuracy</th><th class='num'>target</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


# ------------------------------------------------------------------------------------------ samples


def _load(split_dir: Path) -> Any:
    from blip2.eval.scenes import load_scenes_eval

    return load_scenes_eval(split_dir)


def _sample_cards(data: Any, result: Mapping[str, Any], n: int) -> str:
    from blip2.data.scenes import detailed_caption
    from blip2.eval.scenes import attribute_accuracy
    from blip2.eval.vqa import normalize_vqa_answer, vqa_score

    captions = _dig(result, "captions", "predictions") or {}
    answers = _dig(result, "vqa", "predictions") or {}
    raw = _dig(result, "vqa", "raw_answers") or {}
    by_image: dict[Any, list[Any]] = {}
    for qid, q in data["questions"].items():
        by_image.setdefault(q["image_id"], []).append(qid)
    cards = []
    for image_id in list(data["paths"])[:n]:
        objects = data["objects"][image_id]
        caption = _by_id(captions, image_id)
        if caption is None:
            caption_html = "<p><b>caption:</b> <span class='muted'>– (not generated)</span></p>"
        else:
            names_all = attribute_accuracy([caption], [objects])["exact"] == 1.0
            verdict = "names every object" if names_all else "misses or misnames an object"
            caption_html = (
                f"<p><b>caption:</b> {_mark(names_all)} “{_esc(caption)}” <span class='muted'>({verdict})</span></p>"
            )
        rows, n_right, n_asked = [], 0, 0
        for qid in sorted(by_image.get(image_id, []), key=str):
            truths = data["annotations"][qid]["answers"] if qid in data["annotations"] else []
            truth = truths[0] if truths else "–"
            got = _by_id(answers, qid)
            if got is None:
                answer_cell = "<td class='muted'>–</td>"
            else:
                right = bool(truths) and vqa_score(str(got), truths) > 0
                n_right += right
                n_asked += 1
                said = str(_by_id(raw, qid, "")).strip()
                cut = said and normalize_vqa_answer(said) != got  # the answer read is not all the LLM said
                extra = f" <span class='muted'>(said “{_esc(said)}”)</span>" if cut else ""
                answer_cell = f"<td class='{'ok' if right else 'bad'}'>{_mark(right)} {_esc(got)}{extra}</td>"
            rows.append(
                f"<tr><td>{_esc(data['questions'][qid]['question'])}</td>{answer_cell}"
                f"<td class='muted'>{_esc(truth)}</td></tr>"
            )
        score = f": {n_right} of {n_asked} answered right" if n_asked else ""
        questions = (
            f"<p><b>zero-shot questions</b>{score}</p>"
            "<table><thead><tr><th>question</th><th>answer</th><th>truth</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            if rows
            else ""
        )
        cards.append(
            "<div class='card'>"
            f"<img src='{_png_data_uri(Path(data['paths'][image_id]))}' alt='scene {_esc(image_id)}'>"
            f"<div>{caption_html}<p class='muted'>true scene: {_esc(detailed_caption(objects))}</p>{questions}</div>"
            "</div>"
        )
    return f"<div class='samples'>{''.join(cards)}</div>"


# ------------------------------------------------------------------------------------------ retrieval


def _retrieval_example(data: Any, retrieval: Mapping[str, Any] | None) -> str:
    top = _dig(retrieval, "i2t_top")
    texts = _dig(retrieval, "texts")
    text_image = _dig(retrieval, "text_image")
    if not top or texts is None or text_image is None:
        return "<p class='muted'>No ranking was kept (the evaluation ran without predictions).</p>"
    image_ids = list(data["references"])
    index = 0
    image_id = image_ids[index]
    rows = []
    for rank, (text_index, score) in enumerate(top[index], start=1):
        right = text_image[text_index] == index
        rows.append(
            f"<tr><td class='num'>{rank}</td><td class='{'ok' if right else ''}'>{_mark(right) if right else ''}</td>"
            f"<td>{_esc(texts[text_index])}</td><td class='num muted'>{float(score):.2f}</td></tr>"
        )
    n_right = sum(text_image[t] == index for t, _ in top[index])
    return (
        f"<p>All {len(texts)} texts of the test split's retrieval pool (one full description per image) ranked for "
        "the first test image: the image–text "
        "contrastive similarity picks a shortlist, the matching head re-scores it. "
        f"{n_right} of the top {len(top[index])} belong to this image (✓); the others describe other scenes.</p>"
        "<div class='card'>"
        f"<img src='{_png_data_uri(Path(data['paths'][image_id]))}' alt='retrieval query scene {_esc(image_id)}'>"
        "<div><table><thead><tr><th class='num'>rank</th><th></th><th>text</th>"
        "<th class='num'>score</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        "<p class='muted'>score: matching logit + contrastive similarity</p></div></div>"
    )


# ------------------------------------------------------------------------------------------ the page


def _duration(seconds: Any) -> str:
    if _missing(seconds):
        return "–"
    s = round(float(seconds))
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s"


def write_report(
    path: Path,
    split_dirs: Mapping[str, Path],
    results: Mapping[str, Mapping[str, Any]],
    metrics: Mapping[str, Any],
    losses: Mapping[str, Sequence[float]],
    n_samples: int,
) -> Path:
    """Write the report to ``path`` and return it.

    ``split_dirs``: split name → scenes split folder (`blip2.data.scenes.write_split`); ``results``: split
    name → `run_eval(..., keep_predictions=True)`'s result on it; ``metrics``: the demo's metrics.json
    ("headline", "targets", "image_encoder_probe", "llm_ceiling", "llm_name", "wall_time_s", "peak_rss_mb",
    "settings"); ``losses``: training stage → loss per logged step; ``n_samples``: test images shown.
    Missing figures show as "–".
    """
    llm = metrics.get("llm_name") or _dig(metrics, "llm_ceiling", "llm") or "a small LLM"
    data = {s: _load(Path(d)) for s, d in split_dirs.items()}
    test_data, test_result = data.get("test"), results.get("test") or {}
    samples = _sample_cards(test_data, test_result, n_samples) if test_data is not None else ""
    if "shifted" in data:
        samples += (
            "<h3>Two scenes from the shifted split</h3><p class='muted'>Other background shades, wider placement and "
            "question wordings the model never saw.</p>"
            + _sample_cards(data["shifted"], results.get("shifted") or {}, N_SHIFTED_SAMPLES)
        )
    retrieval = _retrieval_example(test_data, test_result.get("retrieval")) if test_data is not None else ""
    settings = html.escape(json.dumps(metrics.get("settings", {}), indent=2, default=str))
    rss = metrics.get("peak_rss_mb")
    memory = "–" if _missing(rss) else f"{float(rss) / 1024:.1f} GB" if float(rss) >= 1024 else f"{float(rss):.0f} MB"
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>BLIP-2 offline demo: results</title><style>{_STYLE}</style></head><body>"
        "<h1>BLIP-2, trained offline on synthetic scenes</h1>"
        "<p class='lead'>Two frozen parts, each pretrained on its own: a small CNN image encoder and a text-only "
        f"language model ({_esc(llm)}). Between them, a Q-Former initialised from MiniLM-L6 learns in stage 1 "
        "to match, contrast and caption images (ITC + ITM + ITG), and in stage 2 to caption through the frozen "
        "LLM. No question was ever paired with an image in training, so every answer below is zero-shot.</p>"
        f"<h2>Results</h2>{_headline(results, metrics)}"
        f"<h2>The frozen parts, measured alone</h2>{_frozen_parts(metrics)}"
        "<h2>Samples</h2><p>The first test images: the generated caption (✓ when it names every object's colour "
        "and shape) and the zero-shot answers to the scene's questions, with the true answer.</p>"
        f"{samples}"
        f"<h2>Retrieval example</h2>{retrieval}"
        f"<h2>Training</h2>{_training(losses)}"
        f"<h2>Cost</h2><p>Wall time {_duration(metrics.get('wall_time_s'))}, peak memory {memory}.</p>"
        f"<details><summary>settings</summary><pre>{settings}</pre></details>"
        "</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path
