"""Reading image files as every reader of the project does: upright, 8-bit RGB, or an error that says why.

One function, :func:`read_image`, serves the COCO and Cityscapes datasets and
``mode=predict``, so a file loads the same way in training, evaluation and prediction:

- **EXIF orientation** is applied, as Detectron2's ``read_image`` does: a camera that
  stores a portrait photo as landscape pixels plus an orientation tag shows it
  upright in every viewer, and COCO's (and Detectron2's) annotations refer to that
  upright image. Sizes are compared with a json after the rotation;
  :func:`size_mismatch_message` says so, and says when the json's size is that of the
  unrotated pixels.
- **16-bit images** (PIL modes ``I;16*``, and ``I`` from a PNG) are scaled to 8 bits
  by keeping each value's high byte, as Pillow itself does for 16-bit colour PNGs.
  PIL's ``convert("RGB")`` would clip them instead: a 0..65535 gradient came out 99%
  white. 32-bit integer and floating-point images (``I`` from a TIFF, ``F``) have no
  known value range and are refused with a message.
- **Only regular files** are opened (:func:`check_regular_file`): a named pipe would block
  the read forever (in a DataLoader worker, the whole epoch), a device would stream.
- **Size limits** (:class:`ImageLimits`, ``data.image_limits``) are checked from the
  file's header before the pixels are decoded: an image above the pixel limit, with an
  aspect ratio above the limit, or one that the model's resize would shrink to a
  0-pixel side, is refused naming the file. PIL's own ``DecompressionBombError`` (at
  twice ``Image.MAX_IMAGE_PIXELS``, 179 MPix) is caught and named like any broken file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "ImageLimitError",
    "ImageLimits",
    "UnsupportedImageError",
    "check_regular_file",
    "exif_orientation",
    "read_image",
    "read_image_size",
    "size_mismatch_message",
]

# EXIF tag 0x0112: how the stored pixels must be turned to show the image upright (1 = as stored).
_ORIENTATION_TAG = 0x0112
# Orientations 5-8 turn the image by 90 or 270 degrees, which swaps its width and height.
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_ORIENTATION_NAMES = {
    2: "mirrored",
    3: "rotated 180°",
    4: "mirrored vertically",
    5: "mirrored and rotated 90°",
    6: "rotated 90° clockwise",
    7: "mirrored and rotated 270°",
    8: "rotated 90° counter-clockwise",
}
# PIL modes of 16-bit single-channel images.
_16BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class UnsupportedImageError(ValueError):
    """An image that decodes, but whose pixels have no known 8-bit meaning (32-bit integer, floating point)."""


class ImageLimitError(ValueError):
    """An image above the run's :class:`ImageLimits`."""


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words (for messages)."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_regular_file(path: str | os.PathLike, what: str = "image file") -> None:
    """Raises unless ``path`` is a regular file (or a link to one); never opens it, so it never blocks.

    Raises:
        FileNotFoundError: nothing is there, naming ``what`` and the path.
        ValueError: a folder, named pipe, device or socket, saying which.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what} not found: {path}") from err
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path} is {file_kind(mode)}, not a regular file")


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """The largest images a run accepts, and the model input size that must leave every side >= 1 pixel.

    Checked from sizes alone (a json's, or a file's header), before any pixel is decoded.

    Args:
        max_pixels: most pixels (width x height) per image; ``data.image_limits.max_pixels``.
        max_aspect_ratio: most ``longer side / shorter side``; ``data.image_limits.max_aspect_ratio``.
        min_size, max_size: the model's resize (``data.min_size``, ``data.max_size``): an image whose shorter
            side this would shrink below one pixel is refused. ``None``: not checked.
    """

    max_pixels: int = 8192 * 8192
    max_aspect_ratio: float = 20.0
    min_size: int | Sequence[int] | None = None
    max_size: int | None = None

    def problem(self, height: int, width: int) -> str | None:
        """Why a ``height x width`` image is refused, or ``None``."""
        if height * width > self.max_pixels:
            return (
                f"has {height * width / 1e6:.1f} MPix ({width}x{height}), above data.image_limits.max_pixels="
                f"{self.max_pixels} ({self.max_pixels / 1e6:.1f} MPix); downscale it or raise the limit"
            )
        short, long = min(height, width), max(height, width)
        if long > self.max_aspect_ratio * short:
            return (
                f"is {width}x{height}, an aspect ratio of {long / short:.1f}:1, above "
                f"data.image_limits.max_aspect_ratio={self.max_aspect_ratio:g}; crop it into tiles or raise the limit"
            )
        if self.min_size is not None and self.max_size is not None:
            sizes = [self.min_size] if isinstance(self.min_size, int) else list(self.min_size)
            # torchvision's GeneralizedRCNNTransform: scale = min(size / short, max_size / long), sides floored.
            scale = min(min(sizes) / short, self.max_size / long)
            if math.floor(short * scale) < 1:
                return (
                    f"is {width}x{height}: the model's resize (data.min_size={self.min_size}, data.max_size="
                    f"{self.max_size}) would shrink its shorter side to {short * scale:.2f} pixels, below one"
                )
        return None

    def check(self, path: str | os.PathLike, height: int, width: int, source: str = "") -> None:
        """Raises ``ValueError`` naming ``path`` (and where its size came from) when :meth:`problem` finds one."""
        problem = self.problem(height, width)
        if problem:
            raise ImageLimitError(f"image {path}{f' (size from {source})' if source else ''} {problem}")


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1..8; 1 when it has none or an invalid one)."""
    orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    return orientation if orientation in _ORIENTATION_NAMES else 1


def read_image(path: str | os.PathLike, limits: ImageLimits | None = None) -> np.ndarray:
    """Decodes an image file to uint8 ``[H, W, 3]`` RGB, upright (EXIF orientation applied).

    Args:
        limits: checked on the header's size before decoding; ``None``: PIL's own limit only.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a regular file, is above ``limits``, or cannot be
            decoded (corrupt, truncated, not an image, a decompression bomb), naming it.
        UnsupportedImageError: a ``ValueError``: the file's pixels have no known 8-bit
            meaning (32-bit integer or floating point), naming the file and its mode.
    """
    check_regular_file(path)
    try:
        with Image.open(path) as image:
            # The format is that of the file; a transposed copy has none.
            file_format = image.format
            if limits is not None:
                # Before the EXIF orientation, which decodes a PNG whose tag may follow its pixels. A turn by
                # 90 degrees changes neither the pixel count nor the aspect ratio nor the shorter side.
                width, height = image.size
                limits.check(path, height, width)
            orientation = exif_orientation(image)
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image, file_format, path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {path}") from err
    except (UnsupportedImageError, ImageLimitError):
        raise
    except Image.DecompressionBombError as err:
        raise ValueError(f"image {path} is refused by PIL as a decompression bomb: {err}") from err
    except MemoryError as err:
        raise ValueError(f"image {path} does not fit in memory when decoded: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three on broken files
        raise ValueError(f"cannot read image {path}: {err}") from err


def _to_rgb(image: Image.Image, file_format: str | None, path: str | os.PathLike) -> np.ndarray:
    """uint8 ``[H, W, 3]`` pixels of an opened image; 16-bit values scaled, other wide ones refused."""
    if image.mode in _16BIT_MODES or (image.mode == "I" and file_format == "PNG"):
        # np.asarray forces the full decode (truncation shows here); a PNG's mode I holds 0..65535.
        wide = np.asarray(image).astype(np.uint32, copy=False)
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    _check_mode(image.mode, file_format, path)
    # convert() forces the full decode, so truncation shows here, not later.
    return np.array(image.convert("RGB"))


def _check_mode(mode: str, file_format: str | None, path: str | os.PathLike) -> None:
    """Refuses a PIL mode whose pixels have no known 8-bit meaning (32-bit integer but a PNG's, floating point)."""
    if mode == "F" or (mode == "I" and file_format != "PNG"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise UnsupportedImageError(
            f"image {path} is a {kind} {file_format or ''} image (PIL mode {mode}) whose value range is "
            "unknown; convert it to 8-bit (or 16-bit PNG) RGB or grayscale first"
        )


def read_image_size(path: str | os.PathLike, limits: ImageLimits | None = None) -> tuple[int, int]:
    """``(height, width)`` of the upright image (EXIF orientation applied), from the file's header.

    Args:
        limits: checked on the stored size first: finding a PNG's EXIF orientation may decode it.

    Raises:
        ValueError: not a regular file, not an image, above ``limits`` or a decompression bomb, naming the file.
        UnsupportedImageError: a ``ValueError``: pixels with no known 8-bit meaning (the mode is in the header).
    """
    check_regular_file(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if limits is not None:
                limits.check(path, height, width)
            _check_mode(image.mode, image.format, path)
            if exif_orientation(image) in _SWAPS_SIDES:
                width, height = height, width
    except (ImageLimitError, UnsupportedImageError):
        raise
    except Image.DecompressionBombError as err:
        raise ValueError(f"image {path} is refused by PIL as a decompression bomb: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read the header of image {path}: {err}") from err
    return height, width


def size_mismatch_message(
    path: str | os.PathLike, shape: tuple[int, int], expected: tuple[int, int], source: str
) -> str:
    """Why an image read with :func:`read_image` does not have the size ``source`` gives it.

    Args:
        path: the image file.
        shape: ``(height, width)`` that :func:`read_image` returned (EXIF orientation applied).
        expected: ``(height, width)`` that ``source`` gives.
        source: what gives the expected size, e.g. the json's path.

    Returns:
        A message naming both sizes, the EXIF orientation, and what to do when the
        expected size is that of the file's unrotated pixels.
    """
    (height, width), (expected_height, expected_width) = shape, expected
    message = f"image {path} is {width}x{height} (WxH) but {source} says {expected_width}x{expected_height}"
    try:
        with Image.open(path) as image:
            stored_width, stored_height = image.size
            orientation = exif_orientation(image)
    except (OSError, SyntaxError, ValueError):
        return message
    if orientation == 1:
        return f"{message} (the file has no EXIF orientation)"
    name = _ORIENTATION_NAMES[orientation]
    if (stored_height, stored_width) == tuple(expected):
        return (
            f"{message}: its EXIF orientation ({orientation}, {name}) was applied, as COCO and Detectron2 do "
            f"(annotations refer to the upright image), but {expected_width}x{expected_height} is the size of the "
            "stored, unrotated pixels. If the annotations were drawn on the unrotated image, remove the file's "
            "EXIF orientation tag (e.g. exiftool -Orientation= FILE); otherwise correct the size in the annotations"
        )
    return f"{message} (after applying its EXIF orientation {orientation}, {name})"
