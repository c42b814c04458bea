"""Bad input through the public API and the CLI: each gives a clear error naming the file and the problem."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from blip2.checkpoints import CheckpointError, convert
from blip2.cli import main
from blip2.data.images import ImageError
from blip2.model import Blip2, Blip2QFormer
from blip2.testing import make_tiny_model, zero_key_bias


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir: Callable[[str | None], Path]) -> Path:
    return tiny_model_dir("opt")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Blip2:
    return Blip2.from_pretrained(tiny_dir)


def test_truncated_jpeg_names_the_file(image_file: Callable[..., Path], tmp_path: Path, tiny: Blip2) -> None:
    good = image_file()
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match="truncated.jpg"):
        tiny.caption([bad], max_new_tokens=3)


def test_non_image_file(image_file: Callable[..., Path], tmp_path: Path, tiny: Blip2) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(ImageError, match="notes.txt"):
        tiny.caption([notes], max_new_tokens=3)


def test_odd_images_are_handled(image_file: Callable[..., Path], tmp_path: Path, tiny: Blip2) -> None:
    rgba = tmp_path / "alpha.png"
    Image.new("RGBA", (20, 20), (255, 0, 0, 128)).save(rgba)
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (0, 0, 255)).save(one)
    cmyk = image_file("cmyk.jpg", mode="CMYK")
    captions = tiny.caption([rgba, one, cmyk], max_new_tokens=3, num_beams=1)
    assert len(captions) == 3


def test_empty_question(tiny: Blip2) -> None:
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="question is empty"):
        tiny.answer(image, ["what color?", "   "])


def test_image_question_count_mismatch(tiny: Blip2) -> None:
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="2 images and 3 questions"):
        tiny.answer([image, image], ["a?", "b?", "c?"])


def test_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("hello")
    with pytest.raises(CheckpointError, match=f"'{tmp_path}' is not a checkpoint directory"):
        Blip2.from_pretrained(tmp_path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Blip2.from_pretrained(tmp_path / "nowhere" / "model")


def test_corrupt_config_json(tmp_path: Path, tiny_dir: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json' is not valid JSON"):
        Blip2.from_pretrained(d)


def test_checkpoint_shapes_do_not_match_config(tmp_path: Path, tiny_dir: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["qformer"]["intermediate_size"] = 40  # weights were saved with 37
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(
        CheckpointError, match=r"does not match its config: .*ffn_query.fc1.weight: checkpoint \(37, 32\)"
    ):
        Blip2.from_pretrained(d)


def test_checkpoint_layer_count_mismatch(tmp_path: Path, tiny_dir: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["qformer"]["num_hidden_layers"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="has 2 Q-Former layers, config says 4"):
        Blip2.from_pretrained(d)


def test_truncated_weights_file(tmp_path: Path, tiny_dir: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    (d / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors' could not be read"):
        Blip2.from_pretrained(d)


def test_missing_weight_is_reported_and_model_untouched(tmp_path: Path, tiny_dir: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    state = load_file(str(tiny_dir / "model.safetensors"))
    del state["language_projection.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks weights: \\['language_projection.weight'\\]"):
        Blip2.from_pretrained(d)


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    from blip2.config import tiny_config

    with pytest.raises(CheckpointError, match="evil.pth' could not be read"):
        Blip2QFormer.from_pretrained(path, config=tiny_config(None))


def test_unknown_model_name_in_cli(
    image_file: Callable[..., Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    image = image_file()
    code = main(["caption", str(image), "--model", "not-a-model-dir"])
    assert code == 2
    assert "checkpoint 'not-a-model-dir' does not exist" in capsys.readouterr().err


def test_cli_caption_and_ask_json(
    image_file: Callable[..., Path], capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_dir: Path
) -> None:
    image = image_file()
    assert main(["caption", str(image), str(image), "--model", str(tiny_dir), "--json", "--max-new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in result] == [str(image)] * 2 and all(isinstance(r["caption"], str) for r in result)
    assert main(["ask", str(image), "what color?", "how many shapes?", "--model", str(tiny_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["question"] for r in result] == ["what color?", "how many shapes?"]


def test_cli_bad_image_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_dir: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    assert main(["caption", str(bad), "--model", str(tiny_dir)]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def _lavis_compatible_stage1(directory: Path) -> Blip2QFormer:
    """A tiny stage-1 model LAVIS's format can hold (EVA has no key bias), saved to ``directory``."""
    model = zero_key_bias(make_tiny_model(None, llm=None))
    model.save_pretrained(directory)
    return model


def test_cli_convert_round_trip(tmp_path: Path, tiny_dir: Path) -> None:
    qformer_dir = tmp_path / "stage1"
    model = _lavis_compatible_stage1(qformer_dir)
    assert main(["convert", str(qformer_dir), str(tmp_path / "lavis.pth"), "--to", "lavis"]) == 0
    state = torch.load(tmp_path / "lavis.pth", weights_only=True)["model"]
    assert "Qformer.bert.embeddings.LayerNorm.weight" in state
    assert main(["convert", str(tmp_path / "lavis.pth"), str(tmp_path / "back"), "--config", "tiny-stage1"]) == 0
    back = Blip2QFormer.from_pretrained(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_bytes_and_pil_inputs(tiny: Blip2) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    assert len(tiny.caption([buf.getvalue(), Image.new("L", (8, 8))], max_new_tokens=2, num_beams=1)) == 2


def test_cli_packs_frozen_weights_by_default_with_the_same_output(
    image_file: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    tiny_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`blip2 caption`/`ask` pre-pack the frozen weights on CPU (inference only); --no-optimize keeps them
    plain; both print the same captions and answers."""
    from blip2 import cli
    from blip2.inference import fast as fast_generate

    if not fast_generate.can_prepack():
        pytest.skip("this torch build has no oneDNN linear")
    packed_counts: list[int] = []
    original = fast_generate.optimize_for_cpu_inference

    def spy(model: Any) -> int:
        packed_counts.append(original(model))
        return packed_counts[-1]

    monkeypatch.setattr(fast_generate, "optimize_for_cpu_inference", spy)
    image = image_file()
    outputs = []
    for extra in ([], ["--no-optimize"]):
        caption = ["caption", str(image), "--model", str(tiny_dir), "--json", "--max-new-tokens", "5"]
        assert cli.main([*caption, *extra]) == 0
        assert cli.main(["ask", str(image), "what color?", "--model", str(tiny_dir), "--json", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert len(packed_counts) == 2 and all(n > 0 for n in packed_counts)  # only the default runs packed
    assert outputs[0] == outputs[1]


def test_config_json_that_is_a_list_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json' holds a JSON list, not an object"):
        Blip2.from_pretrained(tmp_path)


def test_corrupt_tokenizer_json_names_the_file(tmp_path: Path, tiny_dir: Path) -> None:
    for f in tiny_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "tokenizer.json").write_text((tiny_dir / "tokenizer.json").read_text()[:33])
    with pytest.raises(CheckpointError, match=r"tokenizer file '.*tokenizer\.json' is not valid JSON"):
        Blip2.from_pretrained(tmp_path)


def _cli_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_convert_to_lavis_into_a_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The destination is checked before the source is even read: here the source does not exist."""
    (tmp_path / "out").mkdir()
    err = _cli_error(capsys, ["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "lavis"])
    assert "is a folder, but a LAVIS checkpoint is one file" in err and "model.pth" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_convert_onto_an_existing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_dir: Path) -> None:
    target = tmp_path / "old.pth"
    target.write_bytes(b"keep me")
    err = _cli_error(capsys, ["convert", str(tiny_dir), str(target), "--to", "lavis"])
    assert "old.pth' already exists: delete it or choose another file name" in err
    assert target.read_bytes() == b"keep me"
    err = _cli_error(capsys, ["convert", str(tiny_dir), str(target / "x.pth"), "--to", "lavis"])
    assert "old.pth' is a file, not a folder" in err
    err = _cli_error(capsys, ["convert", str(tiny_dir), str(target), "--to", "blip2"])
    assert "old.pth' is a file, but this format is a folder" in err
    err = _cli_error(capsys, ["convert", str(tiny_dir), str(tiny_dir), "--to", "blip2"])
    assert "already holds a checkpoint" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_convert_into_a_read_only_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_dir: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        err = _cli_error(capsys, ["convert", str(tiny_dir), str(locked / "m.pth"), "--to", "lavis"])
    finally:
        locked.chmod(0o755)
    assert "cannot write the LAVIS checkpoint into" in err and "choose a writable folder" in err


def test_convert_write_failure_leaves_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails half-way (disk full, a folder made read-only meanwhile) leaves no partial file."""
    _lavis_compatible_stage1(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()

    def failing_save(obj: Any, f: Any) -> None:
        Path(f).write_bytes(b"half a checkpoint")
        raise RuntimeError("File cannot be opened: [enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(torch, "save", failing_save)
    err = _cli_error(capsys, ["convert", str(tmp_path / "src"), str(out / "m.pth"), "--to", "lavis"])
    assert "could not write" in err and "m.pth" in err and "nothing was written" in err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umask_mode(tmp_path: Path, tiny_dir: Path, umask: int) -> None:
    """Files written by save_pretrained / convert are readable as a plain write would make them (0644 under
    umask 022), not 0600 as temporary-file writers create them."""
    old = os.umask(umask)
    try:
        Blip2.from_pretrained(tiny_dir).save_pretrained(tmp_path / "saved")
        convert(tiny_dir, tmp_path / "converted")
    finally:
        os.umask(old)
    for path in [tmp_path / "saved" / "model.safetensors", tmp_path / "saved" / "config.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((tmp_path / "converted" / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_lavis_file_gets_the_umask_mode(tmp_path: Path) -> None:
    _lavis_compatible_stage1(tmp_path / "src")
    old = os.umask(0o022)
    try:
        convert(tmp_path / "src", tmp_path / "m.pth", to="lavis")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.pth").stat().st_mode) == 0o644


def test_a_question_template_without_its_placeholder_is_refused(tiny: Blip2) -> None:
    """A template without '{}' would drop every question and answer something unrelated: refused, as are
    templates with two places or stray braces."""
    image = Image.new("RGB", (32, 32))
    for template in ("Question: Answer:", "Q: {} {}", "Q: {0} A:", "Q: {} A: }"):
        with pytest.raises(ValueError, match="exactly one '{}'"):
            tiny.answer(image, "what color?", prompt_template=template)
    assert len(tiny.answer(image, "what color?", prompt_template="Q: {} A:", max_new_tokens=2, num_beams=1)) == 1
    # escaped braces are literal text (e.g. a described scene in front of the question)
    assert len(tiny.answer(image, "what?", prompt_template="{{a}} Q: {} A:", max_new_tokens=2, num_beams=1)) == 1
