"""Loading images from disk, bytes or PIL into fully-decoded RGB, with errors that name the file.

Policy (the same for training, evaluation and serving):

- **Decoding is eager and strict.** The whole image is decoded inside `load_image`, so a truncated or corrupt
  file fails here, with its name, rather than later inside a transform. Truncated files are errors: we never
  set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` (global state that would silently turn the missing part grey).
- **Decompression bombs** are refused before decoding: an image whose header claims more than ``max_pixels``
  pixels is an `ImageError`. PIL's own global limit (``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top;
  we read it but never change it.
- **Transparency is composited on white**, not dropped: dropping the alpha channel exposes whatever colour
  the encoder left under transparent pixels (often black, sometimes garbage). White is what a viewer shows
  and what transformers' ``convert_to_rgb`` (used by the official BLIP-2 processors) does.
- **Odd modes** are converted to 8-bit RGB: CMYK, palette, greyscale, 1-bit, 16-bit greyscale (scaled down
  by 257, not clipped: PIL's plain ``convert`` clips 16-bit values above 255 to white in some versions),
  32-bit integer (treated as 16-bit when its values exceed 255) and float (values in [0, 1] are scaled
  by 255, otherwise clipped to [0, 255]).
- **EXIF orientation** is applied (``ImageOps.exif_transpose``), so a portrait photo taken with a rotated
  camera is seen upright, as in every image viewer. Unreadable EXIF data is ignored, not fatal.
- **Files are checked before they are read.** Only regular files are read (a FIFO, a socket or ``/dev/zero``
  would be read forever; ``allow_special_files=True`` reads one anyway, up to the byte cap); a file larger than
  ``max_bytes`` is refused from its size alone; the image header (and its declared size, see above) is read
  before the pixels, so a large file that is not an image, or a bomb, costs a few kilobytes, not its size.
- **Tiny images are accepted.** Anything at least 1×1 is a valid image: every transform resizes to a fixed
  size, and bicubic resizing of a 1×1 image is a uniform image of that colour, which is the correct
  answer. Only an empty (0-pixel) image is an error. Animated images use their first frame.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageError",
    "ImageSource",
    "load_image",
    "to_rgb",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MIN_IMAGE_SIZE",
]

ImageSource = str | os.PathLike | bytes | Image.Image

# Same default as PIL (about 89 megapixels, a 9459×9459 image, ~270 MB decoded as RGB).
DEFAULT_MAX_PIXELS: int = 89_478_485
# Largest image file read: an uncompressed RGBA image at DEFAULT_MAX_PIXELS is about 358 MB.
DEFAULT_MAX_FILE_BYTES: int = 512 * 2**20
# Smallest accepted width and height: see the module docstring for why 1×1 is fine.
MIN_IMAGE_SIZE: int = 1

# What PIL and its plugins raise on broken input (besides our own ImageError, which is a ValueError).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    EOFError,
    ValueError,
    struct.error,
    IndexError,
    zlib.error,
)


class ImageError(ValueError):
    """An image that cannot be used: missing, not an image, corrupt, too large or empty."""


def load_image(
    source: ImageSource,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    allow_special_files: bool = False,
) -> Image.Image:
    """Load ``source`` (a path, encoded bytes or a PIL image) as a fully-decoded 8-bit RGB image.

    ``name`` is used in error messages (default: the path, or ``<bytes>`` / ``<PIL image>``). ``max_pixels``
    (None: no limit of ours) refuses images whose header claims more pixels, before decoding them.
    ``max_bytes`` refuses larger files before reading them; ``allow_special_files`` reads a path that is not
    a regular file (a FIFO, a device), up to ``max_bytes``. Raises `ImageError` naming the file and the problem.
    """
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        _check_pixels(source, label, max_pixels)
        _decode(source, label)
        return _finish(source, label)

    if isinstance(source, bytes | bytearray | memoryview):
        label = name or "<bytes>"
        data = bytes(source)
    elif isinstance(source, str | os.PathLike):
        label = name or str(source)
        with _open_file(Path(source), label, max_bytes, allow_special_files) as file:
            image = _open(file, label)
            _check_pixels(image, label, max_pixels)
            _decode(image, label)  # reads the pixels while the file is open
        return _finish(image, label)
    else:
        raise TypeError(f"load_image expects a path, bytes or a PIL image, got {type(source).__name__}")

    if not data:
        raise ImageError(f"'{label}' is not an image (the file is empty)")
    image = _open(io.BytesIO(data), label)
    _check_pixels(image, label, max_pixels)
    _decode(image, label)
    return _finish(image, label)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an already-decoded image of any mode to 8-bit RGB (alpha composited on white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = Image.fromarray(_high_depth_to_uint8(image), mode="L")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open_file(path: Path, label: str, max_bytes: int, allow_special_files: bool) -> BinaryIO:
    """The image file opened for reading, after checks that need no reading: it exists, is a regular file
    (unless allowed otherwise), is not empty and not larger than ``max_bytes``."""
    try:
        info = path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageError(f"image path '{label}' is a loop of symbolic links") from err
        if err.errno == errno.ENOENT and path.is_symlink():
            raise ImageError(f"image path '{label}' is a symbolic link to a file that does not exist") from err
        if err.errno == errno.ENOENT:
            raise ImageError(f"image file '{label}' does not exist") from err
        raise ImageError(f"image file '{label}' could not be read ({err.strerror or err})") from err
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"'{label}' is a directory, not an image file")
    special = not stat.S_ISREG(info.st_mode)
    if special and not allow_special_files:
        raise ImageError(
            f"'{label}' is not a regular file (a device, FIFO or socket); pass allow_special_files=True to read it"
        )
    if not special and info.st_size == 0:
        raise ImageError(f"'{label}' is not an image (the file is empty)")
    if info.st_size > max_bytes:
        raise ImageError(
            f"image file '{label}' is {info.st_size:,} bytes, more than the limit of {max_bytes:,} bytes; "
            "pass a larger max_bytes if it is genuine"
        )
    try:
        file = open(path, "rb")  # noqa: SIM115 - the caller closes it (a context manager)
    except OSError as err:
        raise ImageError(f"image file '{label}' could not be read ({err.strerror or err})") from err
    if not special:
        return file
    with file:  # a device or FIFO has no size: read it into memory, at most max_bytes
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError(f"'{label}' holds more than the limit of {max_bytes:,} bytes")
    if not data:
        raise ImageError(f"'{label}' is not an image (the file is empty)")
    return io.BytesIO(data)


def _open(file: BinaryIO, label: str) -> Image.Image:
    """The image's header, parsed (PIL reads the pixels later, in `_decode`)."""
    try:
        return Image.open(file)
    except UnidentifiedImageError as err:
        raise ImageError(f"'{label}' is not an image (cannot identify image file)") from err
    except Image.DecompressionBombError as err:
        raise ImageError(f"image '{label}' is too large to decode safely ({err})") from err
    except _DECODE_ERRORS as err:
        # The format was recognised but its header is broken (e.g. cut off inside the header).
        raise ImageError(f"image '{label}' could not be decoded ({_describe(err, None)})") from err


def _check_pixels(image: Image.Image, label: str, max_pixels: int | None) -> None:
    width, height = image.size
    if width < MIN_IMAGE_SIZE or height < MIN_IMAGE_SIZE:
        raise ImageError(
            f"image '{label}' is {width}×{height} pixels; at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} is needed"
        )
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"image '{label}' is {width}×{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels} (a possible decompression bomb); pass a larger max_pixels if it is genuine"
        )


def _decode(image: Image.Image, label: str) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as err:
        raise ImageError(f"image '{label}' is too large to decode safely ({err})") from err
    except _DECODE_ERRORS as err:
        raise ImageError(f"image '{label}' could not be decoded ({_describe(err, image.format)})") from err


def _finish(image: Image.Image, label: str) -> Image.Image:
    with contextlib.suppress(*_DECODE_ERRORS):  # broken EXIF: keep the pixels as stored, keep the sample
        image = ImageOps.exif_transpose(image)
    try:
        return to_rgb(image)
    except _DECODE_ERRORS as err:
        raise ImageError(f"image '{label}' has mode {image.mode!r}, which cannot be converted to RGB") from err


def _describe(err: BaseException, fmt: str | None) -> str:
    message = str(err) or type(err).__name__
    if "truncated" in message.lower():
        return f"truncated {fmt}" if fmt else "truncated file"
    return f"{fmt}: {message}" if fmt else message


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """16/32-bit integer or float single-channel pixels → uint8, keeping the full range visible."""
    pixels = np.asarray(image)
    if image.mode == "F":
        values = pixels.astype(np.float64)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        return np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    values = pixels.astype(np.int64)
    if image.mode.startswith("I;16") or (values.size and values.max() > 255):
        return (np.clip(values, 0, 65535) / 257.0).round().astype(np.uint8)
    return np.clip(values, 0, 255).astype(np.uint8)
