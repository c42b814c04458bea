"""Evaluation metrics on hand-computed examples, and round trips through the scene files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import blip2.eval.captions as captions_module
from blip2.data.scene_files import write_split
from blip2.data.text import clean_question
from blip2.eval.captions import caption_metrics, simple_tokenize
from blip2.eval.loaders import image_path, load_coco_captions, load_vqa
from blip2.eval.retrieval import merge_reranked, retrieval_recall
from blip2.eval.runner import eval_vqa, run_eval
from blip2.eval.scenes import attribute_accuracy, load_scenes_eval
from blip2.eval.vqa import normalize_vqa_answer, postprocess_answer, vqa_accuracy, vqa_report, vqa_score

# ------------------------------------------------------------------------------------------------ retrieval

# 3 images, 6 texts; image i's captions are texts 2i and 2i+1.
IMG_TO_TXT = [[0, 1], [2, 3], [4, 5]]
TXT_TO_IMG = [0, 0, 1, 1, 2, 2]
SIM = torch.tensor(
    [
        # t0   t1   t2   t3   t4   t5
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: its text t0 ranks 1st
        [0.9, 0.8, 0.1, 0.7, 0.0, 0.0],  # image 1: best own text t3 ranks 3rd
        [0.0, 0.0, 0.0, 0.0, 0.1, 0.0],  # image 2: t4 ranks 1st
    ]
)


def test_recall_on_a_hand_made_matrix() -> None:
    r = retrieval_recall(SIM, IMG_TO_TXT, TXT_TO_IMG, ks=(1, 2, 3))
    assert r["i2t_r1"] == pytest.approx(2 / 3)
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["i2t_r3"] == pytest.approx(1.0)
    # Text → image, per column: t0 → image 0 tied with image 1 at 0.9 (ties count against): rank 2;
    # t1 → image 1 beats image 0: rank 2; t2 → image 0 wins, image 1 is 2nd: rank 2;
    # t3 → image 1 first; t4 → image 2 first; t5 → all 0.0, tied: rank 3.
    assert r["t2i_r1"] == pytest.approx(2 / 6)
    assert r["t2i_r2"] == pytest.approx(5 / 6)
    assert r["t2i_r3"] == pytest.approx(1.0)
    assert r["i2t_r_mean"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert r["r_mean"] == pytest.approx((r["i2t_r_mean"] + r["t2i_r_mean"]) / 2)


def test_constant_scores_get_no_credit_from_ties() -> None:
    r = retrieval_recall(torch.zeros(3, 6), IMG_TO_TXT, TXT_TO_IMG, ks=(1, 5))
    assert r["i2t_r1"] == 0.0 and r["i2t_r5"] == 1.0  # 4 wrong texts tie with the right ones
    assert r["t2i_r1"] == 0.0


def test_separate_reranked_text_to_image_scores() -> None:
    perfect_t2i = torch.eye(3).repeat_interleave(2, dim=0)  # (N_txt, N_img)
    r = retrieval_recall(SIM, IMG_TO_TXT, TXT_TO_IMG, ks=(1,), sim_t2i=perfect_t2i)
    assert r["t2i_r1"] == 1.0 and r["i2t_r1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="sim_t2i"):
        retrieval_recall(SIM, IMG_TO_TXT, TXT_TO_IMG, sim_t2i=SIM)


def test_merge_reranked_puts_non_candidates_last() -> None:
    itc = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    topk = itc.topk(2, dim=1).indices  # texts 1 and 2
    merged = merge_reranked(itc, topk, torch.tensor([[0.2, 0.7]]))
    torch.testing.assert_close(merged, torch.tensor([[-100.0, 0.2, 0.7, -100.0]]))


def test_recall_matches_a_loop_over_argsort() -> None:
    g = torch.Generator().manual_seed(0)
    n_img, per_img = 40, 5
    sim = torch.randn(n_img, n_img * per_img, generator=g)
    img_to_txt = [list(range(i * per_img, (i + 1) * per_img)) for i in range(n_img)]
    txt_to_img = [t // per_img for t in range(n_img * per_img)]
    r = retrieval_recall(sim, img_to_txt, txt_to_img, ks=(1, 5, 10), row_chunk=7)
    for k in (1, 5, 10):
        i2t = [bool(set(sim[i].argsort(descending=True)[:k].tolist()) & set(img_to_txt[i])) for i in range(n_img)]
        t2i = [txt_to_img[t] in sim[:, t].argsort(descending=True)[:k].tolist() for t in range(sim.shape[1])]
        assert r[f"i2t_r{k}"] == pytest.approx(sum(i2t) / len(i2t))
        assert r[f"t2i_r{k}"] == pytest.approx(sum(t2i) / len(t2i))


def test_recall_rejects_mismatched_ground_truth() -> None:
    with pytest.raises(ValueError, match="must match"):
        retrieval_recall(SIM, IMG_TO_TXT[:2], TXT_TO_IMG)


# ------------------------------------------------------------------------------------------------------ VQA


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two.", "2"),
        ("a dog", "dog"),
        ("yes!", "yes"),
        ("The Three cats", "3 cats"),
        ("none", "0"),
        ("black-and-white", "black and white"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("Dont know", "don't know"),
        ("  red\n", "red"),
        ("what?", "what"),
    ],
)
def test_normalize_vqa_answer(raw: str, normalized: str) -> None:
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_score_with_ten_answers() -> None:
    answers = ["2"] * 2 + ["3"] * 8
    # "two" matches 2 answers: leaving out a "2" leaves 1 match (1/3), leaving out a "3" leaves 2 (2/3).
    assert vqa_score("two", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert vqa_score("3", answers) == 1.0
    assert vqa_score("four", answers) == 0.0
    # Exactly 3 matches: 2/3 when one of them is left out, 1 otherwise.
    assert vqa_score("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((3 * (2 / 3) + 7) / 10)


def test_vqa_accuracy_and_report() -> None:
    annotations = {
        1: {"answers": ["Two"], "question_type": "count", "answer_type": "number"},
        2: {"answers": ["yes"] * 10, "question_type": "exists", "answer_type": "yes/no"},
        3: {"answers": ["red"], "question_type": "color", "answer_type": "other"},
    }
    predictions = {1: "2", 2: "Yes.", 3: "blue"}
    answers = {q: a["answers"] for q, a in annotations.items()}
    assert vqa_accuracy(predictions, answers) == pytest.approx(2 / 3)
    report = vqa_report(predictions, annotations)
    assert report["overall"] == pytest.approx(2 / 3)
    assert report["per_type"] == {"color": 0.0, "count": 1.0, "exists": 1.0}
    assert report["per_answer_type"]["other"] == 0.0 and report["n_questions"] == 3
    with pytest.raises(ValueError, match="no prediction for 1 questions"):
        vqa_accuracy({1: "2", 2: "yes"}, answers)


# ------------------------------------------------------------------------------------------- caption metrics

REFS = {
    1: ["a large red circle to the left of a small blue square", "two shapes: a red circle and a blue square"],
    2: ["a small green star in the center", "a picture of a small green star"],
    3: ["a large yellow triangle on the left", "a yellow triangle"],
}
GOOD = {
    1: "A large red circle to the left of a small blue square.",
    2: "a small green star in the center",
    3: "a yellow triangle",
}
BAD = {1: "a dog", 2: "two cats on a sofa", 3: "blue sky and clouds"}


def test_bleu_and_cider_on_a_tiny_example() -> None:
    pytest.importorskip("pycocoevalcap.cider.cider")
    good = caption_metrics(GOOD, REFS, metrics=("BLEU", "CIDEr"))
    bad = caption_metrics(BAD, REFS, metrics=("BLEU", "CIDEr"))
    assert good["computed"] == ["BLEU", "CIDEr"] and good["skipped"] == {}
    assert good["tokenizer"] == "ptb" if shutil.which("java") else good["tokenizer"].startswith("simple")
    assert good["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert good["CIDEr"] > 3.0 > bad["CIDEr"]
    assert bad["BLEU-4"] < 0.01


def test_without_java_falls_back_to_simple_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pycocoevalcap.cider.cider")
    monkeypatch.setattr(captions_module.shutil, "which", lambda name: None)
    result = caption_metrics(GOOD, REFS, metrics=("BLEU", "CIDEr", "METEOR", "SPICE"))
    assert result["tokenizer"].startswith("simple")
    assert result["computed"] == ["BLEU", "CIDEr"]
    assert set(result["skipped"]) == {"METEOR", "SPICE"} and "java" in result["skipped"]["METEOR"]
    assert result["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert simple_tokenize("Two shapes: a RED circle, don't.") == "two shapes a red circle don't"


def test_a_stuck_java_scorer_is_killed_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scorer that never answers (here: a child that sleeps) is killed after the timeout and the metric is
    reported as skipped with the reason; the other metrics are still computed."""
    pytest.importorskip("pycocoevalcap.cider.cider")
    monkeypatch.setattr(captions_module, "_JAVA_METRIC_SCRIPT", "import time; time.sleep(120)")
    monkeypatch.setattr(captions_module.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(captions_module, "ptb_tokenize", lambda texts, timeout_s: [simple_tokenize(t) for t in texts])
    result = caption_metrics(GOOD, REFS, metrics=("BLEU", "METEOR"), java_timeout_s=1.0)
    assert result["computed"] == ["BLEU"]
    assert result["skipped"] == {"METEOR": "METEOR did not finish within 1s"}


def test_a_failing_java_scorer_and_missing_spice_models_are_skipped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("pycocoevalcap.cider.cider")
    spice_ready = captions_module._spice_ready
    monkeypatch.setattr(captions_module, "_JAVA_METRIC_SCRIPT", "raise SystemExit('no memory for the JVM')")
    monkeypatch.setattr(captions_module.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(captions_module, "ptb_tokenize", lambda texts, timeout_s: [simple_tokenize(t) for t in texts])
    monkeypatch.setattr(captions_module, "_spice_ready", lambda package: "needs stanford-corenlp-3.6.0.jar")
    result = caption_metrics(GOOD, REFS, metrics=("METEOR", "SPICE"))
    assert result["computed"] == []
    assert result["skipped"]["METEOR"] == "METEOR failed (exit 1): no memory for the JVM"
    assert result["skipped"]["SPICE"] == "needs stanford-corenlp-3.6.0.jar"
    # SPICE would download CoreNLP on first use: without its jars it is skipped up front, naming them.
    reason = spice_ready(tmp_path)
    assert reason is not None and "stanford-corenlp-3.6.0-models.jar" in reason and str(tmp_path) in reason


@pytest.mark.slow
def test_meteor_runs_when_java_is_present() -> None:
    pytest.importorskip("pycocoevalcap.meteor.meteor")
    if not shutil.which("java"):
        pytest.skip("needs java")
    result = caption_metrics(GOOD, REFS, metrics=("METEOR",))
    assert result["computed"] == ["METEOR"] and result["METEOR"] > 0.9


def test_caption_metrics_rejects_predictions_without_references() -> None:
    with pytest.raises(ValueError, match="no references"):
        caption_metrics({9: "a cat"}, REFS)


# --------------------------------------------------------------------------------------------------- scenes

OBJECTS = [
    [{"color": "red", "shape": "circle", "size": "large"}, {"color": "blue", "shape": "square", "size": "small"}],
    [{"color": "green", "shape": "star", "size": "small"}],
]


def test_attribute_accuracy_by_hand() -> None:
    captions = [
        "a large red circle to the left of a small blue square",  # all right
        "a large green star and a red circle",  # wrong size for the star, one hallucinated object
    ]
    r = attribute_accuracy(captions, OBJECTS)
    assert r["exact"] == 0.5
    assert r["object"] == pytest.approx(2 / 3)
    assert r["color"] == r["shape"] == 1.0
    assert r["size"] == pytest.approx(2 / 3)
    assert r["count"] == 0.5
    assert r["precision"] == pytest.approx(3 / 4)  # the green star is real, only its size is wrong
    assert attribute_accuracy(["two shapes: a red circle and a blue square"], OBJECTS[:1])["exact"] == 1.0


def test_scene_files_round_trip_through_the_loaders(tmp_path: Path) -> None:
    out = write_split(tmp_path, "val", 6, seed=2)
    images, refs = load_coco_captions(out / "captions_coco.json")
    assert [img["id"] for img in images] == list(range(6)) and all(len(r) == 5 for r in refs.values())
    questions, annotations = load_vqa(out / "vqa_questions.json", out / "vqa_annotations.json")
    assert questions.keys() == annotations.keys()
    perfect = {qid: ann["answers"][0] for qid, ann in annotations.items()}
    report = vqa_report(perfect, annotations)
    assert report["overall"] == 1.0
    assert set(report["per_type"]) <= {"color", "shape", "count", "exists", "position"}
    # Ground-truth captions name every object exactly.
    import json

    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    for k in range(5):
        r = attribute_accuracy([row["captions"][k] for row in rows], [row["objects"] for row in rows])
        assert r["exact"] == 1.0 and r["precision"] == 1.0


def test_loaders_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match="top-level keys.*annotations"):
        load_coco_captions(bad)
    with pytest.raises(ValueError, match="could not read"):
        load_coco_captions(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------ run_eval


def test_postprocess_answer_normalises_then_cuts() -> None:
    assert postprocess_answer(" Two.\n\nQuestion: next") == "2"
    assert postprocess_answer("a red circle", words=1) == "red"
    assert postprocess_answer("on the left", words=0) == "on left"
    assert postprocess_answer("", words=1) == ""


@pytest.mark.parametrize(
    ("question", "cleaned"),
    [
        ("What is the man's Shirt color?!", "what is the man's shirt color?"),  # '?' stays, '!' goes
        ('Is it "red" (or blue)?', "is it red or blue?"),
        ("How many: dogs; cats~ *#?  ", "how many dogs cats ?"),  # trailing spaces stripped
        ("Where is it, exactly...", "where is it, exactly"),  # ',' stays
    ],
)
def test_clean_question_as_the_authors_processor(question: str, cleaned: str) -> None:
    assert clean_question(question) == cleaned


def test_clean_question_keeps_the_first_fifty_words() -> None:
    long = " ".join(f"w{i}" for i in range(60))
    assert clean_question(long).split(" ") == [f"w{i}" for i in range(50)]
    assert clean_question("a b c", max_words=2) == "a b"


def test_scene_questions_are_already_clean(tmp_path: Path) -> None:
    """The demo's figures do not depend on the question cleaning the evaluation now applies by default."""
    data = load_scenes_eval(write_split(tmp_path, "test", 20, seed=3, image_size=32))
    assert data["questions"] and all(clean_question(q["question"]) == q["question"] for q in data["questions"].values())


def test_image_path_by_id(tmp_path: Path) -> None:
    (tmp_path / "COCO_val2014_000000000042.jpg").write_bytes(b"")
    (tmp_path / "7.png").write_bytes(b"")
    assert image_path(tmp_path, 42, {}).endswith("COCO_val2014_000000000042.jpg")
    assert image_path(tmp_path, 7, {}).endswith("7.png")
    assert image_path(tmp_path, 9, {9: "x.jpg"}) == "x.jpg"
    with pytest.raises(FileNotFoundError, match="image id 5"):
        image_path(tmp_path, 5, {})


def test_run_eval_with_coco_files_and_tiny_models(tmp_path: Path) -> None:
    """The same code path evaluates real datasets: COCO caption and VQA files plus an image folder."""
    from blip2.testing import make_tiny_model

    split = write_split(tmp_path, "test", 3, seed=1, image_size=32)
    result = run_eval(
        model=make_tiny_model(llm="opt"),
        retrieval_model=make_tiny_model(llm=None),
        coco_captions=split / "captions_coco.json",
        vqa_questions=split / "vqa_questions.json",
        vqa_annotations=split / "vqa_annotations.json",
        images=split,
        caption_generation={"num_beams": 1, "max_new_tokens": 3},
        vqa_generation={"num_beams": 1, "max_new_tokens": 2},
        retrieval_k=2,
        progress=False,
    )
    retrieval = result["retrieval"]
    assert (retrieval["k"], retrieval["n_images"], retrieval["n_texts"]) == (2, 3, 15)
    assert set(retrieval["itc_only"]) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert result["captions"]["n_images"] == 3 and "predictions" not in result["captions"]
    assert result["captions"]["tokenizer"] in ("ptb",) or result["captions"]["tokenizer"].startswith("simple")
    _, annotations = load_vqa(split / "vqa_questions.json", split / "vqa_annotations.json")
    assert result["vqa"]["n_questions"] == len(annotations) and "raw_answers" not in result["vqa"]
    assert set(result["vqa"]["per_type"]) == {a["question_type"] for a in annotations.values()}
    with pytest.raises(ValueError, match="both"):
        run_eval(vqa_questions=split / "vqa_questions.json", images=split)


def test_vqa_context_is_written_before_each_images_questions(tmp_path: Path) -> None:
    """``eval_vqa(context=...)`` (what the demo's LLM ceiling uses) puts each image's text before the
    template of that image's questions, and only there."""
    data = load_scenes_eval(write_split(tmp_path, "test", 3, seed=1, image_size=32))
    seen: list[tuple[str, str]] = []

    class Spy:
        def answer(self, images: list[str], questions: list[str], prompt_template: str, **kwargs: object) -> list[str]:
            seen.extend((image, prompt_template.format(q)) for image, q in zip(images, questions, strict=True))
            return ["yes"] * len(questions)

    context = {0: "a {braced} scene.", 1: "another scene"}
    told = {q: a for q, a in data["annotations"].items() if data["questions"][q]["image_id"] in context}
    report = eval_vqa(Spy(), data["questions"], told, data["paths"], template="Q: {} A:", context=context)
    assert report["context"] == "given" and set(report["predictions"]) == set(told)
    expected = {
        (
            data["paths"][data["questions"][q]["image_id"]],
            f"{context[data['questions'][q]['image_id']].rstrip('. ')}. Q: {data['questions'][q]['question']} A:",
        )
        for q in told
    }
    assert sorted(seen) == sorted(expected)
