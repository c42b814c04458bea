"""Image loading (bad and odd inputs) and eval preprocessing parity with transformers' BlipImageProcessor."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from blip2.config import CLIP_MEAN, CLIP_STD, VisionConfig
from blip2.data.images import ImageError, load_image, to_rgb
from blip2.data.transforms import ImageProcessor
from blip2.testing import make_tiny_model


def _noise(width: int, height: int, seed: int = 0, channels: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- bad input


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path: Path) -> None:
    data = _jpeg_bytes(_noise(64, 48))
    path = tmp_path / "x.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"image '.*x\.jpg' could not be decoded \(truncated JPEG\)"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global PIL state untouched


def test_jpeg_cut_inside_its_header_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "head.jpg"
    path.write_bytes(_jpeg_bytes(_noise(64, 48))[:200])
    with pytest.raises(ImageError, match="head.jpg"):
        load_image(path)


def test_png_alpha_is_composited_on_white(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 0] = 255  # red ...
    pixels[:2, :, 3] = 128  # ... half transparent on the top rows
    pixels[2:, :, 3] = 0  # ... fully transparent below (black under it would leak if alpha were dropped)
    pixels[2:, :, 0] = 0
    path = tmp_path / "a.png"
    Image.fromarray(pixels, mode="RGBA").save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == pytest.approx((255, 127, 127), abs=1)
    assert image.getpixel((0, 3)) == (255, 255, 255)


def test_palette_transparency_and_la_are_composited_on_white(tmp_path: Path) -> None:
    palette = Image.new("P", (3, 3), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    image = load_image(tmp_path / "p.png")
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 1)) == (0, 255, 0)

    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_1x1_image_is_accepted_and_processed_to_a_uniform_image(tmp_path: Path) -> None:
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 200, 30)).save(path)
    image = load_image(path)
    assert image.size == (1, 1)
    pixels = ImageProcessor(8, CLIP_MEAN, CLIP_STD)([image])
    expected = (torch.tensor([10, 200, 30]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert pixels.shape == (1, 3, 8, 8)
    torch.testing.assert_close(pixels[0], expected.view(3, 1, 1).expand(3, 8, 8), atol=1e-5, rtol=0)


def test_empty_image_is_an_error() -> None:
    with pytest.raises(ImageError, match=r"0×0 pixels; at least 1×1 is needed"):
        load_image(Image.new("RGB", (0, 0)), name="empty.png")


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((4, 4)) == pytest.approx((255, 0, 0), abs=3)


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    pixels = np.array([[0, 257 * 128], [65535, 257 * 10]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert image.mode == "RGB"
    assert [image.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 128, 255, 10]


def test_greyscale_and_float_modes() -> None:
    assert load_image(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    assert load_image(path).size == (10, 20)


def test_non_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image at all")
    with pytest.raises(ImageError, match=r"'.*notes\.txt' is not an image \(cannot identify image file\)"):
        load_image(path)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"image file '.*nope\.jpg' does not exist"):
        load_image(tmp_path / "nope.jpg")


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_decompression_bomb_limit_without_global_state(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    pil_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match=r"40×30 = 1200 pixels, more than the limit of 1000"):
        load_image(path, max_pixels=1000)
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # not changed
    assert load_image(path, max_pixels=1200).size == (40, 30)


def test_bytes_and_pil_sources() -> None:
    data = _jpeg_bytes(_noise(10, 7))
    assert load_image(data).size == (10, 7)
    with pytest.raises(ImageError, match="'upload.jpg' is not an image"):
        load_image(b"garbage", name="upload.jpg")
    original = _noise(5, 5).convert("RGBA")
    assert load_image(original).mode == "RGB"
    assert original.mode == "RGBA"  # the caller's image is not modified
    with pytest.raises(TypeError):
        load_image(123)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def hf_processor():  # noqa: ANN201 - transformers type
    # The PIL backend of BlipImageProcessor (the default backend needs torchvision), configured as the
    # official BLIP-2 checkpoints' preprocessor_config.json.
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(
        size={"height": 224, "width": 224},
        resample=3,  # bicubic
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


@pytest.mark.parametrize(
    ("width", "height", "mode"),
    [(224, 224, "RGB"), (640, 480, "RGB"), (97, 311, "RGB"), (13, 7, "RGB"), (300, 200, "RGBA"), (50, 80, "L")],
)
def test_image_processor_matches_transformers(hf_processor, width: int, height: int, mode: str) -> None:  # noqa: ANN001
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    image = _noise(width, height, seed=width * height, channels=channels)
    ours = ImageProcessor.from_vision_config(VisionConfig())([image])
    reference = hf_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, reference.to(torch.float32), atol=1e-5, rtol=0)


def test_image_processor_batches() -> None:
    processor = ImageProcessor(16, CLIP_MEAN, CLIP_STD)
    images = [_noise(20, 30, seed=i) for i in range(3)]
    batch = processor(images)
    assert batch.shape == (3, 3, 16, 16)
    torch.testing.assert_close(batch[1], processor.process(images[1]))
    assert processor([]).shape == (0, 3, 16, 16)


# ----------------------------------------------------------------------------------------------------------
# Files are checked before they are read (bounded memory on hostile paths)


def test_device_files_are_refused_without_reading(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a regular file"):
        load_image("/dev/zero")  # would be read forever


def test_fifo_is_refused_unless_asked_then_read_up_to_the_cap(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)
    png = io.BytesIO()
    Image.new("RGB", (3, 2), (0, 255, 0)).save(png, "PNG")
    writer = threading.Thread(target=fifo.write_bytes, args=(png.getvalue(),))
    writer.start()
    image = load_image(fifo, allow_special_files=True)
    writer.join()
    assert image.size == (3, 2) and image.getpixel((0, 0)) == (0, 255, 0)


def test_a_file_over_the_byte_cap_is_refused_from_its_size(tmp_path: Path) -> None:
    big = tmp_path / "zeros.jpg"
    with open(big, "wb") as file:  # sparse: 3 GB of size, no disk used
        file.truncate(3 * 2**30)
    with pytest.raises(ImageError, match="more than the limit of"):
        load_image(big)
    small = tmp_path / "ok.png"
    Image.new("RGB", (4, 4)).save(small)
    with pytest.raises(ImageError, match="more than the limit of 10 bytes"):
        load_image(small, max_bytes=10)


def test_symbolic_link_problems_are_named(tmp_path: Path) -> None:
    loop_a, loop_b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    with pytest.raises(ImageError, match="loop of symbolic links"):
        load_image(loop_a)
    dangling = tmp_path / "gone.jpg"
    dangling.symlink_to(tmp_path / "nothing-here.jpg")
    with pytest.raises(ImageError, match="symbolic link to a file that does not exist"):
        load_image(dangling)
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.jpg")


def test_cli_caption_of_dev_zero_is_one_line(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "model", llm="opt")
    result = subprocess.run(
        [sys.executable, "-m", "blip2.cli", "caption", "/dev/zero", "--model", str(tmp_path / "model")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'/dev/zero' is not a regular file" in result.stderr
