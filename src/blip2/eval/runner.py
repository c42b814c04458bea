"""Evaluation metrics: retrieval recall@K, caption metrics, VQA accuracy, synthetic-scene attribute accuracy.

Pure functions of predictions and references, plus loaders for COCO-format files; running a model over a
dataset happens elsewhere and calls these. Every score is a fraction in [0, 1] (caption metrics are the raw
pycocoevalcap values); multiply by 100 for paper-style tables.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blip2.config import VQA_PROMPT
from blip2.data.scenes import caption_attributes

# ------------------------------------------------------------------------------------------------ retrieval


def _wrong_candidates_at_least_as_good(scores: Tensor, positive: Tensor, row_chunk: int) -> Tensor:
    """For each row, how many non-positive columns score >= the row's best positive.

    That count is the 0-based rank of the best correct candidate, with ties resolved against the model (a
    constant score matrix gets no credit). `positive` is a bool mask of the same shape as `scores`.
    """
    ranks = []
    for start in range(0, scores.shape[0], row_chunk):
        s, pos = scores[start : start + row_chunk], positive[start : start + row_chunk]
        best = s.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)  # (b, 1)
        ranks.append(((s >= best) & ~pos).sum(dim=1))
    return torch.cat(ranks)


def retrieval_recall(
    sim_i2t: Tensor,
    img_to_txt: Sequence[Sequence[int]],
    txt_to_img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    sim_t2i: Tensor | None = None,
    row_chunk: int = 1024,
) -> dict[str, float]:
    """Image→text and text→image recall@K from final score matrices.

    sim_i2t: (N_img, N_txt) scores used to rank texts for each image. sim_t2i: (N_txt, N_img) scores used
    to rank images for each text; defaults to `sim_i2t.T`. Pass both when scores were re-ranked per
    direction (BLIP-2 re-scores each query's ITC top-k with ITM; see `merge_reranked`).
    An image query is a hit at K if any of its ground-truth texts `img_to_txt[i]` ranks in the top K;
    a text query if its image `txt_to_img[t]` does. Returns `i2t_r{k}`, `t2i_r{k}`, their means
    `i2t_r_mean`/`t2i_r_mean`, and the overall `r_mean` (fractions, not percent).
    """
    n_img, n_txt = sim_i2t.shape
    if len(img_to_txt) != n_img or len(txt_to_img) != n_txt:
        raise ValueError(
            f"sim_i2t is {n_img}x{n_txt} but got {len(img_to_txt)} img_to_txt entries and "
            f"{len(txt_to_img)} txt_to_img entries; they must match the matrix's rows and columns"
        )
    if sim_t2i is None:
        sim_t2i = sim_i2t.T
    elif sim_t2i.shape != (n_txt, n_img):
        raise ValueError(f"sim_t2i must be ({n_txt}, {n_img}) to match sim_i2t, got {tuple(sim_t2i.shape)}")
    if any(len(texts) == 0 for texts in img_to_txt):
        raise ValueError("every image needs at least one ground-truth text in img_to_txt")

    i2t_positive = torch.zeros(n_img, n_txt, dtype=torch.bool)
    rows = torch.tensor([i for i, texts in enumerate(img_to_txt) for _ in texts], dtype=torch.long)
    cols = torch.tensor([t for texts in img_to_txt for t in texts], dtype=torch.long)
    i2t_positive[rows, cols] = True
    t2i_positive = torch.zeros(n_txt, n_img, dtype=torch.bool)
    t2i_positive[torch.arange(n_txt), torch.as_tensor(list(txt_to_img), dtype=torch.long)] = True

    i2t_rank = _wrong_candidates_at_least_as_good(sim_i2t.float(), i2t_positive, row_chunk)  # (N_img,)
    t2i_rank = _wrong_candidates_at_least_as_good(sim_t2i.float(), t2i_positive, row_chunk)  # (N_txt,)
    result: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in ks:
            result[f"{direction}_r{k}"] = (ranks < k).float().mean().item()
        result[f"{direction}_r_mean"] = sum(result[f"{direction}_r{k}"] for k in ks) / len(ks)
    result["r_mean"] = (result["i2t_r_mean"] + result["t2i_r_mean"]) / 2
    return result


def merge_reranked(base_scores: Tensor, topk_indices: Tensor, topk_scores: Tensor, fill: float = -100.0) -> Tensor:
    """A score matrix holding `topk_scores` at the re-ranked candidates and `fill` everywhere else.

    base_scores: (N_query, N_candidate), only its shape and dtype are used; topk_indices/topk_scores:
    (N_query, k). This is how the reference builds its final matrix after ITM re-ranking the ITC top-k, so
    a candidate outside a query's top-k always ranks below every re-ranked one.
    """
    merged = torch.full_like(base_scores, fill)
    return merged.scatter(1, topk_indices, topk_scores.to(base_scores.dtype))


# ------------------------------------------------------------------------------------------- caption metrics

# PTB tokens that the COCO caption evaluation drops after tokenising.
_PTB_PUNCTUATION = {
    "''",
    "'",
    "``",
    "`",
    "-lrb-",
    "-rrb-",
    "-lcb-",
    "-rcb-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}


def _pycocoevalcap_dir() -> Path | None:
    try:
        from pycocoevalcap.bleu import bleu  # noqa: F401  (namespace package: locate it through a module)
    except ImportError:
        return None
    return Path(bleu.__file__).resolve().parent.parent


def simple_tokenize(text: str) -> str:
    """Fallback for the Java PTB tokenizer: lowercase, split off punctuation, drop it, keep contractions."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def ptb_tokenize(texts: Sequence[str], timeout_s: float = 60.0) -> list[str]:
    """Tokenise like the COCO caption evaluation (Stanford PTBTokenizer, lowercased, punctuation removed).

    Needs `java` and pycocoevalcap's bundled CoreNLP jar; raises RuntimeError when either is missing or the
    tokenizer fails, so callers can fall back to `simple_tokenize`.
    """
    package = _pycocoevalcap_dir()
    jar = package / "tokenizer" / "stanford-corenlp-3.4.1.jar" if package else None
    if shutil.which("java") is None or jar is None or not jar.exists():
        raise RuntimeError("PTB tokenizer needs `java` on PATH and pycocoevalcap installed")
    lines = [t.replace("\n", " ").replace("\r", " ") for t in texts]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write("\n".join(lines))
    try:
        proc = subprocess.run(
            ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", f.name],
            capture_output=True,
            timeout=timeout_s,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as e:
        raise RuntimeError(f"PTB tokenizer failed: {e}") from e
    finally:
        os.unlink(f.name)
    out = proc.stdout.decode("utf-8").split("\n")[: len(lines)]
    if len(out) != len(lines):
        raise RuntimeError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in _PTB_PUNCTUATION) for line in out]


# Runs METEOR or SPICE in a child process so that a stuck Java scorer can be killed after a timeout.
_JAVA_METRIC_SCRIPT = """
import json, sys
job = json.load(sys.stdin)
if job["metric"] == "METEOR":
    from pycocoevalcap.meteor.meteor import Meteor as Scorer
else:
    from pycocoevalcap.spice.spice import Spice as Scorer
score, _ = Scorer().compute_score(job["gts"], job["res"])
json.dump({"score": float(score)}, sys.stdout)
"""


def _run_java_metric(metric: str, gts: dict[str, list[str]], res: dict[str, list[str]], timeout_s: float) -> float:
    proc = subprocess.Popen(
        [sys.executable, "-c", _JAVA_METRIC_SCRIPT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, so the Java grandchild dies with it
    )
    try:
        stdout, stderr = proc.communicate(
            json.dumps({"metric": metric, "gts": gts, "res": res}).encode(), timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.communicate()
        raise RuntimeError(f"{metric} did not finish within {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no error output"]
        raise RuntimeError(f"{metric} failed (exit {proc.returncode}): {tail[0]}")
    return float(json.loads(stdout)["score"])


def _spice_ready(package: Path) -> str | None:
    """Why SPICE cannot run offline, or None. pycocoevalcap would download CoreNLP on first use; we never do."""
    lib = package / "spice" / "lib"
    missing = [j for j in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar") if not (lib / j).exists()]
    if missing:
        return (
            f"needs {', '.join(missing)} in {lib} (run pycocoevalcap's spice/get_stanford_models.py "
            "with internet access once)"
        )
    return None


def caption_metrics(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    metrics: Sequence[str] = ("BLEU", "CIDEr", "METEOR", "SPICE"),
    java_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """COCO caption metrics of `predictions` (image id → caption) against `references` (id → captions).

    Scores every id in `predictions`; each must have references. BLEU-1..4 and CIDEr(-D) come from
    pycocoevalcap in-process; METEOR and SPICE run its Java scorers in a child process killed after
    `java_timeout_s`. Captions are tokenised with the PTB tokenizer when Java works, else with
    `simple_tokenize` (scores then differ slightly from the official ones). The result holds the scores
    plus `computed` (metric names), `skipped` (metric → reason) and `tokenizer` ("ptb" or "simple: why").
    CIDEr's document frequencies come from the evaluated references, so score a few images at least.
    """
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"{len(missing)} predicted images have no references (e.g. image id {missing[0]!r})")
    wanted = {m.upper() for m in metrics}
    unknown = wanted - {"BLEU", "CIDER", "METEOR", "SPICE"}
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; choose from BLEU, CIDEr, METEOR, SPICE")
    result: dict[str, Any] = {"computed": [], "skipped": {}}
    package = _pycocoevalcap_dir()
    if package is None:
        result["skipped"] = {m: "pycocoevalcap is not installed (pip install pycocoevalcap)" for m in metrics}
        result["tokenizer"] = "none"
        return result

    ids = list(predictions)
    texts = [predictions[i] for i in ids] + [r for i in ids for r in references[i]]
    try:
        tokens = ptb_tokenize(texts, timeout_s=java_timeout_s)
        result["tokenizer"] = "ptb"
    except RuntimeError as e:
        tokens = [simple_tokenize(t) for t in texts]
        result["tokenizer"] = f"simple: {e}"
    # Keys as strings: the Java scorers exchange them through JSON.
    res = {str(i): [tokens[n]] for n, i in enumerate(ids)}
    gts: dict[str, list[str]] = {}
    offset = len(ids)
    for i in ids:
        n_refs = len(references[i])
        gts[str(i)] = tokens[offset : offset + n_refs]
        offset += n_refs

    if "BLEU" in wanted:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        result.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
        result["computed"].append("BLEU")
    if "CIDER" in wanted:
        from pycocoevalcap.cider.cider import Cider

        result["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        result["computed"].append("CIDEr")
    for name in ("METEOR", "SPICE"):
        if name not in wanted:
            continue
        reason = "`java` not found on PATH" if shutil.which("java") is None else None
        if reason is None and name == "SPICE":
            reason = _spice_ready(package)
        if reason is None:
            try:
                result[name] = _run_java_metric(name, gts, res, java_timeout_s)
                result["computed"].append(name)
            except (RuntimeError, ValueError, OSError) as e:
                reason = str(e)
        if reason is not None:
            result["skipped"][name] = reason
    return result


# ------------------------------------------------------------------------------------------------------ VQA

# Following the VQAv2 evaluation script (the EvalAI/LAVIS version); written from its documented behaviour.
_VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit (the official pattern's look-behind is malformed, so it only checks after).
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Apostrophe-less spellings → the canonical contraction.
# fmt: off
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "id've": "i'd've", "i'dve": "i'd've", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebodyd": "somebody'd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# fmt: on


def _vqa_punctuation(text: str) -> str:
    # A punctuation mark is deleted when it touches a space somewhere in the answer (or the answer has a
    # "1,000"-style number), else replaced by a space, so "black-and-white" → "black and white".
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCTUATION:
        delete = delete_all or (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if delete else " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """The standard VQAv2 answer normalisation: "Two." → "2", "a dog" → "dog", "yes!" → "yes", "dont" → "don't".

    Whitespace is collapsed, punctuation removed (see `_vqa_punctuation`), text lowercased, number words
    zero..ten mapped to digits ("none" → "0"), articles dropped, and apostrophe-less contractions restored.
    """
    text = _vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy of one prediction against its human answers, both normalised.

    With several answers: min(#matching others / 3, 1) averaged over leaving each answer out (for ten
    answers, the average over all 10-choose-9 subsets). With a single answer: exact match.
    """
    if not answers:
        raise ValueError("a question needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def _check_covered(predictions: Mapping[Any, str], question_ids: Sequence[Any]) -> None:
    missing = [q for q in question_ids if q not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} questions (e.g. question id {missing[0]!r})")


def vqa_accuracy(predictions: Mapping[Any, str], answers: Mapping[Any, Sequence[str]]) -> float:
    """Mean `vqa_score` over every question in `answers` (question id → reference answers)."""
    if not answers:
        raise ValueError("no questions to score")
    _check_covered(predictions, list(answers))
    return sum(vqa_score(predictions[q], a) for q, a in answers.items()) / len(answers)


def vqa_report(predictions: Mapping[Any, str], annotations: Mapping[Any, Mapping[str, Any]]) -> dict[str, Any]:
    """Overall accuracy plus breakdowns by `question_type` and `answer_type`.

    annotations: question id → {"answers": [str, ...], "question_type": ..., "answer_type": ...}, as
    returned by `load_vqa`. Returns {"overall", "per_type", "per_answer_type", "n_questions"}.
    """
    if not annotations:
        raise ValueError("no questions to score")
    _check_covered(predictions, list(annotations))
    by_type: dict[str, list[float]] = defaultdict(list)
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    scores = []
    for qid, ann in annotations.items():
        score = vqa_score(predictions[qid], ann["answers"])
        scores.append(score)
        by_type[str(ann.get("question_type", "unknown"))].append(score)
        by_answer_type[str(ann.get("answer_type", "unknown"))].append(score)
    return {
        "overall": sum(scores) / len(scores),
        "per_type": {t: sum(s) / len(s) for t, s in sorted(by_type.items())},
        "per_answer_type": {t: sum(s) / len(s) for t, s in sorted(by_answer_type.items())},
        "n_questions": len(scores),
    }


# --------------------------------------------------------------------------------------------------- scenes


def attribute_accuracy(
    generated_captions: Sequence[str], scenes_objects: Sequence[Sequence[Mapping[str, Any]]]
) -> dict[str, float]:
    """How well generated captions describe synthetic scenes (objects as in scenes' captions.jsonl).

    An object is *named* when the caption mentions its color and shape together ("red circle") with the
    right size or none. Returns fractions:
      exact:      images whose caption names every object
      object:     objects named
      color:      objects whose color is mentioned; shape: objects whose shape is mentioned
      size:       of the objects named with a size, those with the right size
      count:      images with exactly one mention per object
      precision:  mentions whose color+shape is in the scene (1 - hallucination rate)
    """
    if len(generated_captions) != len(scenes_objects):
        raise ValueError(f"{len(generated_captions)} captions for {len(scenes_objects)} scenes")
    if not generated_captions:
        raise ValueError("no captions to score")
    n_exact = n_count = n_obj = n_named = n_color = n_shape = n_sized = n_size_ok = 0
    n_mentions = n_true_mentions = 0
    for caption, objects in zip(generated_captions, scenes_objects, strict=True):
        mentions = caption_attributes(caption)
        all_named = True
        for obj in objects:
            sizes = {size for size, color, shape in mentions if (color, shape) == (obj["color"], obj["shape"])}
            named = bool(sizes) and (None in sizes or obj["size"] in sizes)
            all_named &= named
            n_named += named
            n_color += any(color == obj["color"] for _, color, _ in mentions)
            n_shape += any(shape == obj["shape"] for _, _, shape in mentions)
            stated = sizes - {None}
            n_sized += bool(stated)
            n_size_ok += stated == {obj["size"]}
        n_obj += len(objects)
        n_exact += all_named
        n_count += len(mentions) == len(objects)
        scene_pairs = {(o["color"], o["shape"]) for o in objects}
        n_mentions += len(mentions)
        n_true_mentions += sum((c, s) in scene_pairs for _, c, s in mentions)
    n_img = len(generated_captions)
    return {
        "exact": n_exact / n_img,
        "object": n_named / max(n_obj, 1),
        "color": n_color / max(n_obj, 1),
        "shape": n_shape / max(n_obj, 1),
        "size": n_size_ok / n_sized if n_sized else float("nan"),
        "count": n_count / n_img,
        "precision": n_true_mentions / n_mentions if n_mentions else 0.0,
    }


# -------------------------------------------------------------------------------------------------- loaders


def load_coco_captions(path: str | Path) -> tuple[list[dict[str, Any]], dict[int, list[str]]]:
    """Read a COCO caption file: (images [{"id", "file_name", ...}], image id → reference captions)."""
    data = _read_json(path, ("images", "annotations"))
    refs: dict[int, list[str]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in refs:
            raise ValueError(f"{path}: annotation {ann.get('id')!r} refers to unknown image {ann['image_id']!r}")
        refs[ann["image_id"]].append(ann["caption"])
    return data["images"], refs


def load_vqa(
    questions_path: str | Path, annotations_path: str | Path
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Read VQA-format files: (question id → {"image_id", "question"}, question id → annotation).

    Each annotation is {"image_id", "answers": [str, ...], "question_type", "answer_type"}, ready for
    `vqa_report` (and `{q: a["answers"] for q, a in annotations.items()}` for `vqa_accuracy`).
    """
    questions = {
        q["question_id"]: {"image_id": q["image_id"], "question": q["question"]}
        for q in _read_json(questions_path, ("questions",))["questions"]
    }
    annotations: dict[int, dict[str, Any]] = {}
    for ann in _read_json(annotations_path, ("annotations",))["annotations"]:
        qid = ann["question_id"]
        if qid not in questions:
            raise ValueError(f"{annotations_path}: question id {qid!r} is not in {questions_path}")
        answers = [a["answer"] if isinstance(a, Mapping) else a for a in ann["answers"]]
        annotations[qid] = {
            "image_id": ann["image_id"],
            "answers": answers,
            "question_type": ann.get("question_type", "unknown"),
            "answer_type": ann.get("answer_type", "unknown"),
        }
    return questions, annotations


def _read_json(path: str | Path, required: Sequence[str]) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read {path}: {e}") from e
    if not isinstance(data, dict) or any(key not in data for key in required):
        raise ValueError(f"{path} is not in the expected format: it needs top-level keys {list(required)}")
    return data


# ---------------------------------------------------------------------------------------------- running models
# `run_eval` runs models over a dataset (the demo's scenes, or COCO-format caption / VQA files) and scores the
# outputs with the functions above. `main` is `blip2 eval`.


def postprocess_answer(text: str, words: int = 0) -> str:
    """A generated answer as VQA evaluation reads it: its first line, normalised (`normalize_vqa_answer`),
    cut to its first ``words`` words when ``words`` > 0."""
    lines = text.strip().splitlines()
    answer = normalize_vqa_answer(lines[0] if lines else "")
    return " ".join(answer.split()[:words]) if words > 0 else answer


def _progress(iterable: Any, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, disable=not enabled)


def load_scenes_eval(directory: str | Path) -> dict[str, Any]:
    """A scenes split written by `blip2.data.scenes.write_split`, in the shape `run_eval` uses."""
    root = Path(directory)
    if not (root / "captions_coco.json").is_file():
        raise FileNotFoundError(f"'{root}' is not a scenes split directory (no captions_coco.json)")
    images, refs = load_coco_captions(root / "captions_coco.json")
    questions, annotations = load_vqa(root / "vqa_questions.json", root / "vqa_annotations.json")
    objects = {}
    with open(root / "captions.jsonl", encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            objects[row["image"]] = row["objects"]
    paths = {img["id"]: str(root / img["file_name"]) for img in images}
    return {
        "paths": paths,
        "references": refs,
        "objects": {img["id"]: objects[img["file_name"]] for img in images},
        "questions": questions,
        "annotations": annotations,
    }


def _image_path(folder: Path, image_id: Any, known: Mapping[Any, str]) -> str:
    """An image's file: from a COCO caption file's ``file_name`` when known, else found by its id in
    ``folder`` (``{id}.jpg``/``.png``, or a name ending in the zero-padded id, as VQAv2's COCO images)."""
    if image_id in known:
        return known[image_id]
    for name in (f"{image_id}.jpg", f"{image_id}.png", f"{image_id}.jpeg"):
        if (folder / name).is_file():
            return str(folder / name)
    if isinstance(image_id, int):
        matches = sorted(folder.glob(f"*{image_id:012d}.*"))
        if matches:
            return str(matches[0])
    raise FileNotFoundError(f"no image for image id {image_id!r} in '{folder}'")


def eval_retrieval(
    model: Any,
    paths: Sequence[str],
    texts_per_image: Sequence[Sequence[str]],
    k: int = 16,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Image↔text recall@1/5/10 of a stage-1 model: ITC shortlist of ``k`` re-ranked by ITM (as LAVIS), and the
    ITC-only recall for comparison."""
    from blip2.inference.tasks import retrieve

    texts = [t for group in texts_per_image for t in group]
    img_to_txt: list[list[int]] = []
    txt_to_img: list[int] = []
    for i, group in enumerate(texts_per_image):
        img_to_txt.append(list(range(len(txt_to_img), len(txt_to_img) + len(group))))
        txt_to_img.extend([i] * len(group))
    with torch.no_grad():
        out = retrieve(model, list(paths), texts, k=k, batch_size=batch_size)
    result: dict[str, Any] = retrieval_recall(out["i2t"], img_to_txt, txt_to_img, sim_t2i=out["t2i"])
    itc = retrieval_recall(out["itc"], img_to_txt, txt_to_img)
    result["itc_only"] = {key: itc[key] for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}
    result.update({"k": k, "n_images": len(paths), "n_texts": len(texts)})
    return result


def eval_captions(
    model: Any,
    paths: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    prompt: str | None = None,
    generation: Mapping[str, Any] | None = None,
    metric_names: Sequence[str] = ("BLEU", "CIDEr"),
    objects: Mapping[Any, Sequence[Mapping[str, Any]]] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate one caption per image and score it (COCO metrics; attribute accuracy when ``objects`` of
    synthetic scenes are given). Returns the scores and ``predictions`` (image id → caption)."""
    ids = list(paths)
    predictions: dict[Any, str] = {}
    for start in _progress(range(0, len(ids), batch_size), "captions", progress):
        part = ids[start : start + batch_size]
        captions = model.caption([paths[i] for i in part], prompt=prompt, batch_size=batch_size, **(generation or {}))
        predictions.update(zip(part, captions, strict=True))
    result: dict[str, Any] = {"n_images": len(ids)}
    if metric_names:
        scores = caption_metrics(predictions, {i: references[i] for i in ids}, metrics=metric_names)
        result.update({k: v for k, v in scores.items() if k not in ("computed",)})
    if objects is not None:
        result["attributes"] = attribute_accuracy([predictions[i] for i in ids], [objects[i] for i in ids])
    result["predictions"] = predictions
    return result


def eval_vqa(
    model: Any,
    questions: Mapping[Any, Mapping[str, Any]],
    annotations: Mapping[Any, Mapping[str, Any]],
    paths: Mapping[Any, str],
    template: str = VQA_PROMPT,
    generation: Mapping[str, Any] | None = None,
    answer_words: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    context: Mapping[Any, str] | None = None,
) -> dict[str, Any]:
    """Zero-shot VQA: answer every question with ``model.answer`` and score with the VQA accuracy, per question
    type and answer type. Returns the report plus ``predictions`` and ``raw_answers`` (question id → text).

    ``context`` (image id → text, e.g. the model's own caption of that image) is put before the template, so
    the LLM reads the question after a description of the image in words as well as the visual prompt.
    """
    qids = [q for q in annotations if q in questions]
    qids.sort(key=lambda q: (str(questions[q]["image_id"]), str(q)))  # one image's questions share a batch
    groups: list[tuple[str, list[Any]]] = []  # (template, question ids) in order
    for q in qids:
        image_id = questions[q]["image_id"]
        tpl = template
        if context is not None:
            tpl = context[image_id].replace("{", "{{").replace("}", "}}").rstrip(". ") + ". " + template
        if not groups or groups[-1][0] != tpl or len(groups[-1][1]) >= 8 * batch_size:
            groups.append((tpl, []))
        groups[-1][1].append(q)
    raw: dict[Any, str] = {}
    for tpl, part in _progress(groups, "questions", progress):
        answers = model.answer(
            [paths[questions[q]["image_id"]] for q in part],
            [questions[q]["question"] for q in part],
            prompt_template=tpl,
            batch_size=batch_size,
            **(generation or {}),
        )
        raw.update(zip(part, answers, strict=True))
    predictions = {q: postprocess_answer(a, answer_words) for q, a in raw.items()}
    report = vqa_report(predictions, {q: annotations[q] for q in qids})
    report.update({"template": template, "answer_words": answer_words, "predictions": predictions, "raw_answers": raw})
    report["context"] = "caption" if context is not None else None
    return report


def run_eval(
    model: Any = None,
    retrieval_model: Any = None,
    scenes: str | Path | None = None,
    coco_captions: str | Path | None = None,
    vqa_questions: str | Path | None = None,
    vqa_annotations: str | Path | None = None,
    images: str | Path | None = None,
    caption_prompt: str | None = None,
    caption_generation: Mapping[str, Any] | None = None,
    vqa_template: str = VQA_PROMPT,
    vqa_generation: Mapping[str, Any] | None = None,
    answer_words: int = 0,
    retrieval_k: int = 16,
    caption_metric_names: Sequence[str] = ("BLEU", "CIDEr"),
    batch_size: int = 8,
    max_images: int | None = None,
    keep_predictions: bool = False,
    progress: bool = True,
    vqa_caption_context: bool = False,
    vqa_true_description: int = 0,
) -> dict[str, Any]:
    """Evaluate loaded models on a scenes split (``scenes``) or on COCO-format files with an image folder.

    ``model`` (a `Blip2`) captions and answers; ``retrieval_model`` (a `Blip2QFormer`) retrieves. Each part
    runs when its model and data are there: retrieval and captions need captions (the scenes or
    ``coco_captions``), VQA needs questions and annotations. ``max_images`` keeps the first N images (and
    their questions). Returns {"retrieval", "captions", "vqa"} (absent parts are None); per-item predictions
    are dropped unless ``keep_predictions``. ``vqa_caption_context`` also answers every question a second
    time with the model's own caption of the image written before the question (``vqa_with_caption``).
    ``vqa_true_description`` (scenes only) answers the questions of the first N images once more with the
    true scene description written before each (``vqa_true_caption``): what the LLM answers when it is told
    exactly what the image shows, the ceiling for answers read from the visual prompt.
    """
    if vqa_true_description > 0 and scenes is None:
        raise ValueError("vqa_true_description needs a scenes split (it describes each image from its objects)")
    paths: dict[Any, str] = {}
    references: dict[Any, list[str]] | None = None
    objects = None
    questions = annotations = None
    if scenes is not None:
        data = load_scenes_eval(scenes)
        paths, references, objects = data["paths"], data["references"], data["objects"]
        questions, annotations = data["questions"], data["annotations"]
    if coco_captions is not None:
        if images is None:
            raise ValueError("--coco-captions needs --images (the folder the file names are relative to)")
        image_list, references = load_coco_captions(coco_captions)
        paths = {img["id"]: str(Path(images) / img["file_name"]) for img in image_list}
    if (vqa_questions is None) != (vqa_annotations is None):
        raise ValueError("VQA evaluation needs both --vqa-questions and --vqa-annotations")
    if vqa_questions is not None and vqa_annotations is not None:
        if images is None:
            raise ValueError("VQA files need --images (the folder holding the question images)")
        questions, annotations = load_vqa(vqa_questions, vqa_annotations)
        folder = Path(images)
        for q in questions.values():
            if q["image_id"] not in paths:
                paths[q["image_id"]] = _image_path(folder, q["image_id"], paths)
    image_ids = list(references) if references is not None else list(dict.fromkeys(paths))
    if max_images is not None:
        image_ids = image_ids[:max_images]
    kept = set(image_ids)

    result: dict[str, Any] = {
        "retrieval": None,
        "captions": None,
        "vqa": None,
        "vqa_with_caption": None,
        "vqa_true_caption": None,
    }
    if retrieval_model is not None and references is not None:
        result["retrieval"] = eval_retrieval(
            retrieval_model, [paths[i] for i in image_ids], [references[i] for i in image_ids], k=retrieval_k
        )
    if model is not None and references is not None:
        result["captions"] = eval_captions(
            model,
            {i: paths[i] for i in image_ids},
            references,
            prompt=caption_prompt,
            generation=caption_generation,
            metric_names=caption_metric_names,
            objects=objects,
            batch_size=batch_size,
            progress=progress,
        )
    if model is not None and questions is not None and annotations is not None:
        wanted = {q: a for q, a in annotations.items() if questions[q]["image_id"] in kept or not references}
        vqa_kwargs = {
            "template": vqa_template,
            "generation": vqa_generation,
            "answer_words": answer_words,
            "batch_size": batch_size,
            "progress": progress,
        }
        result["vqa"] = eval_vqa(model, questions, wanted, paths, **vqa_kwargs)
        if vqa_caption_context and result["captions"] is not None:
            context = result["captions"]["predictions"]
            result["vqa_with_caption"] = eval_vqa(model, questions, wanted, paths, context=context, **vqa_kwargs)
        if vqa_true_description > 0 and objects is not None:
            from blip2.data.scenes import detailed_caption

            first = image_ids[:vqa_true_description]
            first_set = set(first)
            told = {q: a for q, a in wanted.items() if questions[q]["image_id"] in first_set}
            described = {i: detailed_caption(objects[i]) for i in first}
            report = eval_vqa(model, questions, told, paths, context=described, **vqa_kwargs)
            report.update({"context": "true description", "n_images": len(first)})
            result["vqa_true_caption"] = report
    if not keep_predictions:
        for part in ("captions", "vqa", "vqa_with_caption", "vqa_true_caption"):
            if result[part] is not None:
                result[part] = {k: v for k, v in result[part].items() if k not in ("predictions", "raw_answers")}
    return result


def _format_summary(result: Mapping[str, Any]) -> list[str]:
    lines = []
    if result.get("retrieval"):
        r = result["retrieval"]
        lines.append(
            "retrieval: "
            + " ".join(f"{k}={r[k]:.3f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"))
        )
    if result.get("captions"):
        c = result["captions"]
        scores = [f"{k}={c[k]:.3f}" for k in ("CIDEr", "BLEU-4", "METEOR", "SPICE") if isinstance(c.get(k), float)]
        if c.get("attributes"):
            scores.append(f"attribute_accuracy={c['attributes']['object']:.3f}")
        lines.append("captions: " + " ".join(scores))
    for key in ("vqa", "vqa_with_caption", "vqa_true_caption"):
        if result.get(key):
            v = result[key]
            per_type = " ".join(f"{t}={a:.3f}" for t, a in v["per_type"].items())
            lines.append(f"{key}: overall={v['overall']:.3f} ({per_type})")
    return lines or ["nothing to evaluate: give a model and --scenes, --coco-captions or --vqa-* files"]


def main(args: Any) -> None:
    """`blip2 eval`: load the models named by ``args`` and run `run_eval`; print a summary or JSON."""
    from blip2.checkpoints import load_any

    device = getattr(args, "device", "cpu")
    model = load_any(args.model, map_location=device).eval() if args.model else None
    retrieval_model = None
    retrieval_path = getattr(args, "retrieval_model", None)
    if retrieval_path is None and args.model and (Path(args.model).parent / "qformer" / "config.json").is_file():
        retrieval_path = str(Path(args.model).parent / "qformer")  # the demo saves stage 1 next to the model
    if retrieval_path:
        retrieval_model = load_any(retrieval_path, map_location=device).eval()
    if model is not None and not hasattr(model, "answer"):  # a stage-1 model given as --model
        retrieval_model, model = retrieval_model or model, None
    generation: dict[str, Any] = {}
    if getattr(args, "num_beams", None):
        generation["num_beams"] = args.num_beams
    result = run_eval(
        model=model,
        retrieval_model=retrieval_model,
        scenes=args.scenes,
        coco_captions=args.coco_captions,
        vqa_questions=args.vqa_questions,
        vqa_annotations=args.vqa_annotations,
        images=args.images,
        caption_prompt=getattr(args, "prompt", None),
        caption_generation=generation,
        vqa_template=getattr(args, "vqa_template", VQA_PROMPT),
        vqa_generation=generation,
        answer_words=getattr(args, "answer_words", 0),
        retrieval_k=getattr(args, "retrieval_k", 16),
        caption_metric_names=getattr(args, "metrics", None) or ("BLEU", "CIDEr"),
        max_images=getattr(args, "max_images", None),
        keep_predictions=args.output is not None,
        vqa_caption_context=getattr(args, "vqa_caption_context", False),
        vqa_true_description=getattr(args, "vqa_true_description", 0),
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2, default=str))
    summary = {k: v for k, v in result.items()}
    if args.json:
        print(json.dumps(_without_predictions(summary), indent=2, default=str))
    else:
        print("\n".join(_format_summary(result)))


def _without_predictions(result: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in ("predictions", "raw_answers")}
        out[key] = value
    return out
