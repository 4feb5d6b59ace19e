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
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["UnsupportedImageError", "exif_orientation", "read_image", "read_image_size", "size_mismatch_message"]

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


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1..8; 1 when it has none or an invalid one)."""
    orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    return orientation if orientation in _ORIENTATION_NAMES else 1


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file to uint8 ``[H, W, 3]`` RGB, upright (EXIF orientation applied).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded (corrupt, truncated, not an image),
            naming it.
        UnsupportedImageError: a ``ValueError``: the file's pixels have no known 8-bit
            meaning (32-bit integer or floating point), naming the file and its mode.
    """
    try:
        with Image.open(path) as image:
            # The format is that of the file; a transposed copy has none.
            file_format = image.format
            orientation = exif_orientation(image)
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image, file_format, path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {path}") from err
    except UnsupportedImageError:
        raise
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three on broken files
        raise ValueError(f"cannot read image {path}: {err}") from err


def _to_rgb(image: Image.Image, file_format: str | None, path: str | os.PathLike) -> np.ndarray:
    """uint8 ``[H, W, 3]`` pixels of an opened image; 16-bit values scaled, other wide ones refused."""
    if image.mode in _16BIT_MODES or (image.mode == "I" and file_format == "PNG"):
        # np.asarray forces the full decode (truncation shows here); a PNG's mode I holds 0..65535.
        wide = np.asarray(image).astype(np.uint32, copy=False)
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise UnsupportedImageError(
            f"image {path} is a {kind} {file_format or ''} image (PIL mode {image.mode}) whose value range is "
            "unknown; convert it to 8-bit (or 16-bit PNG) RGB or grayscale first"
        )
    # convert() forces the full decode, so truncation shows here, not later.
    return np.array(image.convert("RGB"))


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of the upright image (EXIF orientation applied), from the file's header."""
    with Image.open(path) as image:
        width, height = image.size
        if exif_orientation(image) in _SWAPS_SIDES:
            width, height = height, width
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
