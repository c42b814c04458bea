"""Zero-shot VQA: answer normalisation and the VQAv2 accuracy (questions are cleaned by `blip2.data.text`).

Pure functions of questions, predictions and reference answers; `blip2.eval.runner.eval_vqa` runs a model
and calls them. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

# ------------------------------------------------------------------------------------------------ answers

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


def postprocess_answer(text: str, words: int = 0) -> str:
    """A generated answer as VQA evaluation reads it: its first line, normalised (`normalize_vqa_answer`),
    cut to its first ``words`` words when ``words`` > 0."""
    lines = text.strip().splitlines()
    answer = normalize_vqa_answer(lines[0] if lines else "")
    return " ".join(answer.split()[:words]) if words > 0 else answer
