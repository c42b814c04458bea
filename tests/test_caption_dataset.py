"""Dataset captioning (`blip2.caption`, ``blip2 caption --input``): inputs, outputs, errors, resuming after
SIGKILL, per-rank parts under torchrun, CapFilt and training on its output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_one_line, image_bytes, run_torchrun, src_env, tiny_train_config
from PIL import Image

from blip2.caption import CapFilt, CaptionSettings, JsonlSink, SidecarSink, caption_dataset, list_items, merge_parts
from blip2.caption.sinks import repair
from blip2.checkpoints import load_for_inference
from blip2.cli import main

GEN = {"num_beams": 2, "max_new_tokens": 4}
SETTINGS = CaptionSettings(batch_size=2, workers=0, generation=GEN, progress=False)
CLI_GEN = ["--num-beams", "2", "--max-new-tokens", "4", "--no-progress"]
HELPER = Path(__file__).with_name("caption_kill_helper.py")


def _images(folder: Path, n: int, bad: int = 0) -> list[Path]:
    """``n`` distinct images (every other one in a sub-folder) and ``bad`` files that are not images."""
    paths = []
    for i in range(n):
        path = folder / ("sub" if i % 2 else "") / f"im{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (i * 20 % 256, 90, 250 - i * 15 % 250)).save(path)
        paths.append(path)
    for i in range(bad):
        (folder / f"broken{i}.jpg").write_bytes(b"not an image")
    return paths


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def model(tiny_model_dir: Any) -> Any:
    return load_for_inference(str(tiny_model_dir("opt")), optimize=True)


# ------------------------------------------------------------------------------------------ inputs


def test_inputs_folder_glob_list_and_annotations_in_a_fixed_order(tmp_path: Path) -> None:
    paths = _images(tmp_path / "imgs", 4, bad=1)
    (tmp_path / "imgs" / "notes.md").write_text("not listed")
    folder = list_items(str(tmp_path / "imgs"))
    assert [i.key for i in folder] == ["broken0.jpg", "im00.png", "im02.png", "sub/im01.png", "sub/im03.png"]
    assert [i.index for i in folder] == [0, 1, 2, 3, 4] and Path(folder[3].path) == paths[1]

    assert [Path(i.path).name for i in list_items(str(tmp_path / "imgs" / "**" / "*.png"))] == [
        "im00.png", "im02.png", "im01.png", "im03.png",
    ]  # fmt: skip
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[2]}\n\n{paths[0]}\n{paths[2]}\n")  # order kept, blank and repeated lines dropped
    assert [i.path for i in list_items(str(listing))] == [str(paths[2]), str(paths[0])]

    rows = [{"url": "im00.png", "alt": " a photo "}, {"url": "sub/im01.png", "alt": ""}]
    (tmp_path / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    web = list_items(str(tmp_path / "web.jsonl"), "url", "alt", str(tmp_path / "imgs"))
    assert [(i.key, i.text) for i in web] == [("im00.png", "a photo"), ("sub/im01.png", None)]
    assert Path(web[1].path) == paths[1]
    (tmp_path / "web.csv").write_text("url,alt\nim00.png,a photo\n")
    assert [(i.key, i.text) for i in list_items(str(tmp_path / "web.csv"), "url", "alt")] == [("im00.png", "a photo")]

    with pytest.raises(ValueError, match="'image'"):
        list_items(str(tmp_path / "web.jsonl"))  # the default column is missing: named in the error
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_items(str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------------------ outputs


def test_jsonl_output_matches_model_caption_and_records_unreadable_images(tmp_path: Path, model: Any) -> None:
    paths = _images(tmp_path / "imgs", 5, bad=2)
    out = tmp_path / "out.jsonl"
    settings = CaptionSettings(batch_size=3, workers=1, generation=GEN, progress=False)
    summary = caption_dataset(model, list_items(str(tmp_path / "imgs")), JsonlSink(out), settings)
    assert (summary.total, summary.captioned, summary.failed, summary.skipped) == (7, 5, 2, 0)
    records = _lines(out)
    expected = model.caption([str(p) for p in paths], **GEN)
    by_key = {r["image"]: r["caption"] for r in records}
    assert by_key == {str(p.relative_to(tmp_path / "imgs")): c for p, c in zip(paths, expected, strict=True)}
    errors = _lines(tmp_path / "out.errors.jsonl")
    assert sorted(e["image"] for e in errors) == ["broken0.jpg", "broken1.jpg"]
    assert all("not an image" in e["error"] for e in errors)

    again = caption_dataset(model, list_items(str(tmp_path / "imgs")), JsonlSink(out), settings)
    assert (again.skipped, again.captioned, again.failed) == (7, 0, 0)
    assert _lines(out) == records


def test_sidecar_files_next_to_each_image(tmp_path: Path, model: Any) -> None:
    paths = _images(tmp_path / "imgs", 3)
    done_before = paths[1].with_suffix(".txt")
    done_before.write_text("kept\n")  # an image with a sidecar is done
    log = JsonlSink(tmp_path / "imgs" / "captions.jsonl")
    summary = caption_dataset(model, list_items(str(tmp_path / "imgs")), SidecarSink(log), SETTINGS)
    assert (summary.captioned, summary.skipped) == (2, 1)
    assert done_before.read_text() == "kept\n"
    expected = model.caption([str(paths[0]), str(paths[2])], **GEN)
    assert [paths[i].with_suffix(".txt").read_text() for i in (0, 2)] == [c + "\n" for c in expected]
    assert not list((tmp_path / "imgs").rglob("*.tmp"))


def test_webdataset_shards_out_train_as_they_are_and_resume_exactly_once(tmp_path: Path, model: Any) -> None:
    """5 images, 2 per shard: 3 shards holding each image once with its own bytes and caption; a shard a run
    finished but did not index (killed between the two) is not captioned again; the shards read back as
    training data."""
    from blip2.caption.sinks import ShardSink
    from blip2.data.webdataset import WebDatasetShards

    paths = _images(tmp_path / "imgs", 5, bad=1)
    shards = tmp_path / "shards"
    log = JsonlSink(shards / "captions.jsonl")
    summary = caption_dataset(model, list_items(str(tmp_path / "imgs")), ShardSink(log, shards, 2), SETTINGS)
    assert (summary.captioned, summary.failed) == (5, 1)
    tars = sorted(shards.glob("shard-*.tar"))
    assert [t.name for t in tars] == [f"shard-r0of1-{i:06d}.tar" for i in range(3)]
    expected = dict(
        zip(
            [str(p.relative_to(tmp_path / "imgs")) for p in paths],
            model.caption([str(p) for p in paths], **GEN),
            strict=True,
        )
    )
    samples = list(WebDatasetShards([str(t) for t in tars]))
    assert sorted(s["text"] for s in samples) == sorted(expected.values())
    # the index loses its last shard's lines (a kill after the rename): the shard itself still counts as done
    index = shards / "captions.jsonl"
    index.write_text("".join(line + "\n" for line in index.read_text().splitlines()[:-1]))
    again = caption_dataset(model, list_items(str(tmp_path / "imgs")), ShardSink(JsonlSink(index), shards, 2), SETTINGS)
    assert (again.captioned, again.skipped) == (0, 6)
    assert len(list(shards.glob("shard-*.tar"))) == 3 and not list(shards.glob(".tmp-*"))


def test_a_partial_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"image": "a", "caption": "x"}\n{"image": "b", "capt')
    repair(out)
    assert out.read_bytes() == b'{"image": "a", "caption": "x"}\n'
    out.write_bytes(b'{"image": "b", "capt')  # no complete line at all
    repair(out)
    assert out.read_bytes() == b""


@pytest.mark.multiprocess
def test_sigkill_mid_batch_then_rerun_captions_every_image_exactly_once(
    tmp_path: Path, tiny_model_dir: Any, model: Any
) -> None:
    """The helper hangs inside the 3rd batch's generate; SIGKILL there, a torn last line (as a kill during a
    write leaves) added, a rerun: the output equals an uninterrupted run, no duplicates, no gaps."""
    _images(tmp_path / "imgs", 9, bad=1)
    out, marker = tmp_path / "out.jsonl", tmp_path / "stalled"
    args = [str(tiny_model_dir("opt")), str(tmp_path / "imgs"), str(out)]
    proc = subprocess.Popen([sys.executable, str(HELPER), *args, "3", str(marker)], env=src_env())
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the helper never reached the 3rd batch"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    first = _lines(out) + _lines(tmp_path / "out.errors.jsonl")
    assert 3 <= len(first) < 10  # two batches written (one image unreadable), the third lost
    with out.open("ab") as f:
        f.write(b'{"image": "sub/im07.png", "capt')
    done = subprocess.run([sys.executable, str(HELPER), *args, "0", str(marker)], env=src_env(), timeout=120)
    assert done.returncode == 0

    reference = tmp_path / "reference.jsonl"
    caption_dataset(model, list_items(str(tmp_path / "imgs")), JsonlSink(reference), SETTINGS)
    keys = [r["image"] for r in _lines(out)]
    assert len(keys) == len(set(keys)) == 9
    assert sorted(_lines(out), key=str) == sorted(_lines(reference), key=str)
    assert [e["image"] for e in _lines(tmp_path / "out.errors.jsonl")] == ["broken0.jpg"]


# ------------------------------------------------------------------------------------------ many processes


def test_merge_parts_keeps_each_image_once_and_removes_the_parts(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.rank0-of-2.jsonl").write_text('{"image": "a", "caption": "1"}\n{"image": "c", "caption": "3"}\n')
    (tmp_path / "out.rank1-of-2.jsonl").write_text('{"image": "b", "caption": "2"}\n{"image": "a", "cap')
    (tmp_path / "out.rank1-of-2.errors.jsonl").write_text('{"image": "d", "error": "broken"}\n')
    assert merge_parts(out) == (3, 1)
    assert [r["image"] for r in _lines(out)] == ["a", "c", "b"]
    assert _lines(tmp_path / "out.errors.jsonl") == [{"image": "d", "error": "broken"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.errors.jsonl", "out.jsonl"]
    with pytest.raises(FileNotFoundError, match="rank0-of-N"):
        merge_parts(tmp_path / "other.jsonl")


def test_a_rerun_with_another_number_of_processes_skips_what_any_part_holds(tmp_path: Path, model: Any) -> None:
    _images(tmp_path / "imgs", 5)
    items = list_items(str(tmp_path / "imgs"))
    out = tmp_path / "out.jsonl"
    part = tmp_path / "out.rank1-of-2.jsonl"
    first = caption_dataset(model, items, JsonlSink(part, out), SETTINGS, rank=1, world_size=2)
    assert [r["image"] for r in _lines(part)] == [items[1].key, items[3].key] and first.total == 2
    rest = caption_dataset(model, items, JsonlSink(out), SETTINGS)  # one process now: rank 1's share is done
    assert (rest.skipped, rest.captioned) == (2, 3)
    assert merge_parts(out) == (5, 0)


@pytest.mark.multiprocess
def test_two_processes_under_torchrun_equal_one_process(tmp_path: Path, tiny_model_dir: Any, model: Any) -> None:
    _images(tmp_path / "imgs", 7, bad=1)
    out = tmp_path / "two.jsonl"
    cli = ["-m", "blip2.cli", "caption", "--model", str(tiny_model_dir("opt")), "--input", str(tmp_path / "imgs")]
    run_torchrun(cli[0], *cli[1:], "--output", str(out), "--batch-size", "2", "--workers", "1", *CLI_GEN)
    parts = [_lines(tmp_path / f"two.rank{r}-of-2.jsonl") for r in (0, 1)]
    assert {r["image"] for r in parts[0]}.isdisjoint(r["image"] for r in parts[1])
    assert main(["caption", "--merge", str(out)]) == 0

    one = tmp_path / "one.jsonl"
    caption_dataset(model, list_items(str(tmp_path / "imgs")), JsonlSink(one), SETTINGS)
    assert sorted(_lines(out), key=str) == sorted(_lines(one), key=str) and len(_lines(one)) == 7
    assert sorted(_lines(tmp_path / "two.errors.jsonl"), key=str) == _lines(tmp_path / "one.errors.jsonl")


# ------------------------------------------------------------------------------------------ CapFilt


@pytest.fixture(scope="module")
def scorer(tiny_model_dir: Any) -> Any:
    return load_for_inference(str(tiny_model_dir(None)))


def _web_set(tmp_path: Path) -> Path:
    _images(tmp_path / "imgs", 3)
    rows = [
        {"url": "im00.png", "alt": "a red square"},
        {"url": "sub/im01.png", "alt": ""},
        {"url": "im02.png", "alt": "buy now cheap"},
    ]
    web = tmp_path / "web.jsonl"
    web.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return web


def test_capfilt_keeps_the_best_candidates_with_scores_and_reruns_identically(
    tmp_path: Path, model: Any, scorer: Any
) -> None:
    web = _web_set(tmp_path)
    items = list_items(str(web), "url", "alt", str(tmp_path / "imgs"))
    capfilt = CapFilt(scorer, candidates=4, keep=2, rerank="itc", seed=1)
    caption_dataset(model, items, JsonlSink(tmp_path / "a.jsonl"), SETTINGS, capfilt)
    records = _lines(tmp_path / "a.jsonl")
    assert [r["image"] for r in records] == ["im00.png", "sub/im01.png", "im02.png"]
    for record in records:
        assert len(record["captions"]) == len(record["scores"]) == 2
        assert record["scores"] == sorted(record["scores"], reverse=True)
    assert records[0]["text"] == "a red square" and "text" not in records[1]

    # Every candidate and the web text were scored: keeping them all shows each with its ITC score.
    all_kept = CapFilt(scorer, candidates=4, keep=10, rerank="itc", seed=1)
    caption_dataset(model, items, JsonlSink(tmp_path / "all.jsonl"), SETTINGS, all_kept)
    full = _lines(tmp_path / "all.jsonl")
    assert "a red square" in full[0]["captions"] and full[0]["sources"].count("web") == 1
    assert full[1]["sources"] == ["generated"] * len(full[1]["captions"])
    for kept, every in zip(records, full, strict=True):
        assert kept["captions"] == every["captions"][:2]
        expected = capfilt.scores(
            model.image_processor([Image.open(tmp_path / "imgs" / kept["image"])]), [0, 0], every["captions"][:2]
        )
        assert kept["scores"] == pytest.approx(expected.tolist(), abs=1e-5)

    # Seeded per image: another batch layout, a resumed run, gives the same candidates.
    one_by_one = CaptionSettings(batch_size=1, workers=0, generation=GEN, progress=False)
    caption_dataset(model, items[::-1], JsonlSink(tmp_path / "b.jsonl"), one_by_one, capfilt)
    assert sorted(_lines(tmp_path / "b.jsonl"), key=str) == sorted(records, key=str)

    itm = CapFilt(scorer, candidates=4, keep=1, rerank="itm", seed=1)
    caption_dataset(model, items, JsonlSink(tmp_path / "itm.jsonl"), SETTINGS, itm)
    assert all(0.0 <= r["scores"][0] <= 1.0 and r["scored_by"] == "itm" for r in _lines(tmp_path / "itm.jsonl"))


def test_capfilt_refuses_a_stage2_scorer(model: Any) -> None:
    with pytest.raises(ValueError, match="stage-1"):
        CapFilt(model, candidates=2)


def test_capfilt_output_trains_a_model(tmp_path: Path, tiny_model_dir: Any) -> None:
    """``blip2 caption`` with CapFilt options, then two training steps of a stage-1 model on its jsonl."""
    from blip2.testing import make_tiny_model
    from blip2.train.recipes import train

    web = _web_set(tmp_path)
    (tmp_path / "imgs" / "broken.png").write_bytes(image_bytes()[:20])
    with web.open("a") as f:
        f.write(json.dumps({"url": "broken.png", "alt": "x"}) + "\n")
    out = tmp_path / "boot.jsonl"
    argv = ["caption", "--model", str(tiny_model_dir("opt")), "--scorer", str(tiny_model_dir(None))]
    argv += [
        "--input",
        str(web),
        "--image-column",
        "url",
        "--text-column",
        "alt",
        "--image-root",
        str(tmp_path / "imgs"),
    ]
    assert main([*argv, "--output", str(out), "--candidates", "3", "--workers", "0", *CLI_GEN]) == 0
    assert len(_lines(out)) == 3 and len(_lines(tmp_path / "boot.errors.jsonl")) == 1

    cfg = tiny_train_config(tmp_path / "run", max_steps=2, batch_size=2, model={"stage": 1})
    cfg.data = {"kind": "jsonl", "annotations": str(out), "images": str(tmp_path / "imgs"), "max_length": 24}
    train(cfg, make_tiny_model(None, llm=None))
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]


# ------------------------------------------------------------------------------------------ command line


def test_cli_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _images(tmp_path, 1)[0]
    assert main(["caption", str(img), "--input", str(tmp_path), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert_one_line(capsys.readouterr().err, "one of them")
    assert main(["caption", "--input", str(tmp_path), "--model", "none"]) == 2
    assert_one_line(capsys.readouterr().err, "--output")
    assert main(["caption", "--input", str(tmp_path), "--output", "x.jsonl", "--candidates", "2"]) == 2
    assert_one_line(capsys.readouterr().err, "--scorer")
    assert main(["caption"]) == 2
    assert_one_line(capsys.readouterr().err, "--input")


# ------------------------------------------------------------------------------------------ shards


def test_webdataset_shards_in_jsonl_out_resumable_and_split_by_shard(tmp_path: Path, model: Any) -> None:
    from blip2.caption import caption_shards
    from blip2.caption.shards import shard_urls
    from blip2.data.webdataset import write_webdataset_shards

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90), (250, 250, 0)]
    samples: list[dict[str, Any]] = [{"key": f"s{i}", "image": image_bytes(colour=c)} for i, c in enumerate(colours)]
    samples[1]["text"] = "a green picture"
    samples[3]["image"] = b"not an image"
    write_webdataset_shards(samples, tmp_path / "shards", samples_per_shard=2)
    urls = shard_urls(str(tmp_path / "shards" / "shard-{000000..000002}.tar"))
    assert urls == shard_urls(str(tmp_path / "shards" / "*.tar")) and urls is not None and len(urls) == 3

    out = tmp_path / "out.jsonl"
    summary = caption_shards(model, urls, JsonlSink(out), SETTINGS)
    assert (summary.total, summary.captioned, summary.failed) == (5, 4, 1)
    records = {r["image"]: r for r in _lines(out)}
    good = [0, 1, 2, 4]
    expected = model.caption([image_bytes(colour=colours[i]) for i in good], **GEN)
    assert {k: r["caption"] for k, r in records.items()} == {f"s{i}": c for i, c in zip(good, expected, strict=True)}
    assert records["s1"]["text"] == "a green picture"
    assert [e["image"] for e in _lines(tmp_path / "out.errors.jsonl")] == ["s3"]
    assert caption_shards(model, urls, JsonlSink(out), SETTINGS).total == 0  # all done: nothing decoded again

    parts = [tmp_path / f"two.rank{r}-of-2.jsonl" for r in (0, 1)]
    for rank, part in enumerate(parts):
        caption_shards(model, urls, JsonlSink(part, tmp_path / "two.jsonl"), SETTINGS, None, rank, 2)
    assert {r["image"] for r in _lines(parts[0])} == {"s0", "s1", "s4"}  # shards 0 and 2
    assert merge_parts(tmp_path / "two.jsonl") == (4, 1)
    assert sorted(_lines(tmp_path / "two.jsonl"), key=str) == sorted(_lines(out), key=str)
