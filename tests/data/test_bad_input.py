"""The bad-input corpus: every kind of broken annotation file, image or folder the loaders handle, and its outcome.

Each case corrupts a freshly generated split (``tests/helpers/data.py``) one way and says what must happen:

- :class:`Stops`: building the dataset (or, ``at_read``, reading the item) raises, with a message naming the file;
- :class:`Skipped`: the dataset builds, the annotation is left out, counted under its reason and named (by id)
  in the log line with the json's path; ``at_read``: found only when its item is read, and counted then;
- :class:`Repaired`: the annotation is kept after a repair (counted, or logged, or a field filled in);
- :class:`Reads`: the image loads, with the pixels it should have;
- :class:`Capped`: an image with more annotations than ``max_annotations_per_image`` keeps the largest, counted;
- :class:`Disagrees`: a json bbox far from its mask is counted, and used for training and evaluation alike.

Every case runs in a forked child with a time limit (``Case.timeout``) and a memory cap
(``CHILD_EXTRA_MEMORY``): a named pipe that blocks a read, a ground truth that makes ``COCOeval`` loop forever in
C, a polygon whose rasterising or an image whose decoding allocates without bound, fails its case instead of
hanging or exhausting the machine. Annotation cases that reach evaluation (skipped, repaired) also read every item
and score perfect predictions with ``CocoEvaluator``. Further tables: Cityscapes trees, ``mode=predict`` inputs
and outputs, checkpoints for evaluate/predict, config values, and evaluations with nothing to score. Add a new
kind of bad input as one row of a table here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import re
import resource
import shutil
import struct
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.data.cityscapes import CityscapesDataset, read_instance_ids
from mrcnn.data.coco import CocoDataset
from mrcnn.data.datamodule import InstanceDataModule
from mrcnn.data.images import ImageLimits
from mrcnn.evaluation import STAT_NAMES, CocoEvaluator
from tests.helpers.data import cityscapes_instance_ids, make_cityscapes, make_coco_split, uncompressed_rle

# Generous for a loaded 2-core machine: a case takes about a second.
CHILD_TIMEOUT_S = 60
# Address space a child may add to what it inherits: a few MiB are needed, an unbounded allocation fails.
CHILD_EXTRA_MEMORY = 2 * 2**30
# The generated split's first image (id 100, 48x64 JPEG), which every bad annotation is added to.
IMAGE_ID, HEIGHT, WIDTH = 100, 48, 64
FIRST_FILE = f"{IMAGE_ID:012d}.jpg"
BAD_ID = 9001  # the id of the bad annotation


# ---------------------------------------------------------------------------------------------- outcomes


@dataclasses.dataclass(frozen=True)
class Stops:
    """An error whose message matches ``match`` (which names the file); ``at_read``: when the item is read."""

    match: str
    error: type[Exception] = ValueError
    at_read: bool = False


@dataclasses.dataclass(frozen=True)
class Skipped:
    """The bad annotation (``BAD_ID``) skipped and counted under ``reason``; ``at_read``: when its item is read.

    ``in_ground_truth``: counted when the dataset is built and left out of the targets, but kept in the evaluation
    ground truth (where pycocotools on the json reads it too): a miss for perfect predictions, as for pycocotools.
    """

    reason: str
    at_read: bool = False
    in_ground_truth: bool = False


@dataclasses.dataclass(frozen=True)
class Repaired:
    """The bad annotation kept: ``counted`` in ``dataset.repaired``, or ``logged`` (a warning), plus ``check``.

    ``pycocotools``: pycocotools evaluates the json file itself and gets our numbers (where it cannot, the
    repair is what makes the numbers right).
    """

    counted: str | None = None
    logged: str | None = None
    check: Callable[[CocoDataset], None] | None = None
    pycocotools: bool = False
    # The json pycocotools must agree with, as an edit of the case's json (the repair it implies).
    corrected: Callable[[dict], None] | None = None


@dataclasses.dataclass(frozen=True)
class Reads:
    """The image reads as ``expected(path)`` says: uint8 ``[H, W, 3]`` pixels, within ``tolerance`` levels."""

    expected: Callable[[Path], np.ndarray]
    tolerance: int = 0


@dataclasses.dataclass(frozen=True)
class Capped:
    """``left_out`` annotations of the first image left out of its target by ``max_annotations_per_image``."""

    left_out: int


@dataclasses.dataclass(frozen=True)
class Disagrees:
    """The bad annotation's json bbox differs from its mask beyond the tolerance: counted, kept, used as its box.

    ``check_box``: the case's box is ``bbox_far_from_its_mask``'s (checked in the target, and AP against
    pycocotools); otherwise only counted and kept.
    """

    check_box: bool = True


@dataclasses.dataclass(frozen=True)
class LeftOut:
    """``mode=predict`` on a folder: the bad file is skipped and counted (``ImageFiles.skipped``, its reason matching
    ``match``, which names it) and the folder's other images are predicted; given alone, it stops with that message."""

    match: str


@dataclasses.dataclass(frozen=True)
class Case:
    """One kind of bad input: ``make(tmp_path, split) -> paths`` writes it, ``outcome`` is what must happen.

    The whole case (writing the input included) runs in a forked child that must finish within ``timeout``
    seconds and may map at most ``CHILD_EXTRA_MEMORY`` more bytes than the test process.
    """

    name: str
    make: Callable
    outcome: Stops | Skipped | Repaired | Reads | Capped | Disagrees | LeftOut
    kwargs: dict = dataclasses.field(default_factory=dict)  # dataset arguments
    timeout: float = CHILD_TIMEOUT_S

    def __str__(self) -> str:
        return self.name


# ------------------------------------------------------------------------------------------ COCO corruptions


@dataclasses.dataclass(frozen=True)
class Split:
    """The generated COCO split the cases start from (read-only: cases write copies)."""

    json_path: Path
    image_dir: Path

    def data(self) -> dict:
        return json.loads(self.json_path.read_text())


def edit_json(edit: Callable[[dict], object]) -> Callable:
    """A case maker: the split's json changed by ``edit(data)``, the split's images."""

    def make(tmp_path: Path, split: Split) -> tuple[Path, Path]:
        data = split.data()
        edit(data)
        path = tmp_path / "case.json"
        path.write_text(json.dumps(data))  # NaN and Infinity are written as json.dump writes them
        return split.image_dir, path

    return make


def raw_json(text: bytes) -> Callable:
    """A case maker: a json file holding ``text``."""

    def make(tmp_path: Path, split: Split) -> tuple[Path, Path]:
        path = tmp_path / "case.json"
        path.write_bytes(text)
        return split.image_dir, path

    return make


def good_annotation(**fields) -> dict:
    """A usable annotation (``BAD_ID``, a triangle on the first image) with ``fields`` replaced.

    Its bbox and area are its mask's, as in COCO's files, so that perfect predictions score AP 1.
    """
    annotation = {
        "id": BAD_ID,
        "image_id": IMAGE_ID,
        "category_id": 1,
        "iscrowd": 0,
        "area": 36.0,
        "segmentation": [[1, 1, 10, 1, 10, 10]],
        "bbox": [2.0, 1.0, 8.0, 8.0],
    }
    annotation.update(fields)
    return annotation


def add_annotation(*without: str, **fields) -> Callable:
    """A case maker: the split plus :func:`good_annotation` with ``fields`` replaced and the keys ``without`` removed."""
    annotation = good_annotation(**fields)
    for key in without:
        del annotation[key]
    return edit_json(lambda data: data["annotations"].append(annotation))


def edit_first_image(**fields) -> Callable:
    """A case maker: the first json image entry with ``fields`` replaced (``None`` removes the key)."""

    def edit(data: dict) -> None:
        for key, value in fields.items():
            data["images"][0].pop(key, None)
            if value is not None:
                data["images"][0][key] = value

    return edit_json(edit)


def edit_categories(edit: Callable[[list], object]) -> Callable:
    return edit_json(lambda data: edit(data["categories"]))


def edit_image_file(write: Callable[[Path], object], **image_fields) -> Callable:
    """A case maker: a copy of the split's images with the first file rewritten by ``write(path)``.

    ``image_fields`` replace the first json image entry's fields (e.g. ``file_name``, ``width``).
    """

    def make(tmp_path: Path, split: Split) -> tuple[Path, Path]:
        image_dir = tmp_path / "images"
        shutil.copytree(split.image_dir, image_dir)
        data = split.data()
        data["images"][0].update(image_fields)
        path = image_dir / data["images"][0]["file_name"]
        if path.name != FIRST_FILE:
            (image_dir / FIRST_FILE).unlink()
        write(path)
        json_path = tmp_path / "case.json"
        json_path.write_text(json.dumps(data))
        return image_dir, json_path

    return make


def compressed(mask: np.ndarray) -> str:
    """The compressed RLE string of a uint8 mask."""
    return mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")


def triangle_mask(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    rle = mask_utils.merge(mask_utils.frPyObjects([[1, 1, 10, 1, 10, 10]], height, width))
    return mask_utils.decode(rle)


def uncompressed_counts(height: int = HEIGHT, width: int = WIDTH) -> list[int]:
    return uncompressed_rle(triangle_mask(height, width))["counts"]


# ----------------------------------------------------------------------------------------- image writers


def gradient_16bit(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """uint16 ``[H, W]``: 0 at the left edge to 65535 at the right."""
    return np.broadcast_to(np.linspace(0, 65535, width).round().astype(np.uint16), (height, width)).copy()


def write_16bit_png(path: Path) -> None:
    Image.fromarray(gradient_16bit()).save(path)


def expected_16bit(path: Path) -> np.ndarray:
    """The 16-bit gradient's high bytes, in all three channels."""
    return np.repeat((gradient_16bit() >> 8).astype(np.uint8)[:, :, None], 3, axis=2)


def stored_pixels(height: int, width: int) -> np.ndarray:
    """Pixels with a different value everywhere, so that any rotation or mirroring shows."""
    values = np.arange(height * width * 3, dtype=np.int64).reshape(height, width, 3)
    return (values * 7 % 251).astype(np.uint8)


def write_exif_rotated(path: Path) -> None:
    """A PNG stored 48 wide and 64 high, with EXIF orientation 6: shown turned clockwise, 64 wide and 48 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored_pixels(WIDTH, HEIGHT)).save(path, exif=exif)


def expected_exif_rotated(path: Path) -> np.ndarray:
    # Orientation 6: the stored image turned 90 degrees clockwise.
    return np.rot90(stored_pixels(WIDTH, HEIGHT), k=-1)


def write_float_tiff(path: Path) -> None:
    Image.fromarray(np.linspace(0, 1, HEIGHT * WIDTH, dtype=np.float32).reshape(HEIGHT, WIDTH)).save(path)


def write_cmyk_jpeg(path: Path) -> None:
    Image.new("CMYK", (WIDTH, HEIGHT), (0, 255, 255, 0)).save(path, quality=100)


def write_grayscale_png(path: Path) -> None:
    Image.fromarray(stored_pixels(HEIGHT, WIDTH)[:, :, 0]).save(path)


def expected_grayscale(path: Path) -> np.ndarray:
    return np.repeat(stored_pixels(HEIGHT, WIDTH)[:, :, :1], 3, axis=2)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width x height`` (1-bit gray) and that holds no pixel data: readers see its size
    without the file holding the pixels, as a decompression bomb's header does."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_png_header(width: int, height: int) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(png_header(width, height))


def make_fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def make_folder(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


def link_to_dev_null(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/null")


def link_to_nothing(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(path.with_name("moved_away.jpg"))


def tiny_annotations(count: int) -> Callable:
    """A case maker: ``count`` one-pixel-square annotations on the first image (ids from ``BAD_ID``)."""

    def edit(data: dict) -> None:
        for i in range(count):
            x, y = 1 + i % 60, 1 + (i // 60) % 44
            data["annotations"].append(
                good_annotation(
                    id=BAD_ID + i,
                    segmentation=[[x, y, x + 2, y, x + 2, y + 2, x, y + 2]],
                    bbox=[x, y, 2, 2],
                    area=4.0,
                )
            )

    return edit_json(edit)


def expected_red(path: Path) -> np.ndarray:
    # CMYK (0, 255, 255, 0) is red; JPEG may move a value by a few levels.
    return np.broadcast_to(np.array([255, 0, 0], dtype=np.uint8), (HEIGHT, WIDTH, 3))


# -------------------------------------------------------------------------------------------- COCO cases

AREA_REPAIR = "area outside (0, image pixels] replaced by the mask's area"


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _mask_area(data: dict) -> None:
    """The json pycocotools must score as we do: the bad annotation with its mask's area."""
    next(a for a in data["annotations"] if a["id"] == BAD_ID)["area"] = float(triangle_mask().sum())


COCO_CASES = [
    # ---- the json file: stops naming it
    Case(
        "json_missing", lambda tmp, split: (split.image_dir, tmp / "nope.json"), Stops(r"nope\.json", FileNotFoundError)
    ),
    Case("json_empty", raw_json(b""), Stops(r"case\.json is empty")),
    Case("json_truncated", raw_json(b'{"images": ['), Stops(r"case\.json is not valid JSON")),
    Case("json_not_utf8", raw_json(b'{"images": ["\xff\xfe"]}'), Stops(r"case\.json is not valid JSON")),
    Case("json_a_list", raw_json(b"[]"), Stops(r"case\.json must hold a JSON object, got list")),
    Case(
        "json_without_annotations",
        edit_json(lambda data: data.pop("annotations")),
        Stops(r"case\.json has no 'annotations' list"),
    ),
    Case(
        "json_without_categories",
        edit_json(lambda data: data["categories"].clear()),
        Stops(r"case\.json declares no categories"),
    ),
    Case(
        "category_without_name",
        edit_categories(lambda cats: cats[0].pop("name")),
        Stops(r"case\.json: every category needs an 'id' and a 'name'"),
    ),
    Case(
        "category_id_twice",
        edit_categories(lambda cats: cats.append({"id": 1, "name": "other"})),
        Stops(r"case\.json: category id 1 appears twice"),
    ),
    Case(
        "category_name_twice",
        edit_categories(lambda cats: cats.append({"id": 2, "name": "person"})),
        Stops(r"case\.json: category name 'person' appears twice"),
    ),
    Case(
        "classes_not_in_the_json",
        edit_json(lambda data: None),
        Stops(r"\['unicorn'\].*case\.json"),
        kwargs={"classes": ["dog", "unicorn"]},
    ),
    # ---- image entries: stop naming the file and the image
    Case(
        "image_without_size",
        edit_first_image(height=None, width=None),
        Stops(r"case\.json: image entry .* lacks \['height', 'width'\]"),
    ),
    Case("image_id_a_string", edit_first_image(id="100"), Stops(r"case\.json: image .* has id '100', not an integer")),
    Case(
        "image_id_twice",
        edit_json(lambda data: data["images"].append(dict(data["images"][0], file_name="x.jpg"))),
        Stops(r"case\.json: image id 100 appears twice"),
    ),
    Case("image_size_zero", edit_first_image(width=0), Stops(r"case\.json: image id 100 .* has size 0x48")),
    Case(
        "image_width_a_string",
        edit_first_image(width="64"),
        Stops(r"case\.json: image id 100 \(000000000100\.jpg\) has width '64' \(str\), not a whole number"),
    ),
    Case(
        "image_height_fractional",
        edit_first_image(height=47.5),
        Stops(r"case\.json: image id 100 .* has height 47\.5 \(float\)"),
    ),
    Case(
        "image_file_name_a_number",
        edit_first_image(file_name=7),
        Stops(r"case\.json: image id 100 has file_name 7, not a file name"),
    ),
    Case(
        "image_file_missing",
        edit_first_image(file_name="gone.jpg"),
        Stops(r"1 of 7 image files listed in .*case\.json are missing.*gone\.jpg", FileNotFoundError),
    ),
    Case(
        "image_folder_missing",
        lambda tmp, split: (tmp / "missing_dir", split.json_path),
        Stops(r"image folder not found: .*missing_dir", FileNotFoundError),
    ),
    Case(
        "image_folder_a_file",  # data.train_images=train.json: the json given for the folder
        lambda tmp, split: (split.json_path, split.json_path),
        Stops(r"image folder .*\.json \(for .*\.json\) is a file: give the folder", NotADirectoryError),
    ),
    # ---- annotations: skipped and counted
    Case(
        "annotation_not_an_object",
        edit_json(lambda data: data["annotations"].append("oops")),
        Skipped("not a JSON object"),
    ),
    Case("annotation_of_an_unknown_image", add_annotation(image_id=123456), Skipped("unknown image id")),
    Case("annotation_of_an_unknown_category", add_annotation(category_id=2), Skipped("unknown category id")),
    Case("bbox_missing", add_annotation("bbox"), Skipped("missing or malformed bbox")),
    Case("bbox_of_two_numbers", add_annotation(bbox=[1, 2]), Skipped("missing or malformed bbox")),
    Case("bbox_of_strings", add_annotation(bbox=["1", "1", "9", "9"]), Skipped("missing or malformed bbox")),
    Case("bbox_zero_width", add_annotation(bbox=[5, 5, 0, 4]), Skipped("zero-area box")),
    Case("bbox_zero_height", add_annotation(bbox=[5, 5, 3, 0]), Skipped("zero-area box")),
    # Positive in the json, empty once xyxy in float32 (float noise from a converter; a box at the image's edge).
    Case(
        "bbox_thinner_than_float32",
        add_annotation(bbox=[2.0, 1.0, 1e-7, 8.0]),
        Skipped("box too thin (empty once clipped to the image in float32)", in_ground_truth=True),
    ),
    Case(
        "bbox_within_float32_of_the_edge",
        add_annotation(bbox=[WIDTH - 1e-6, 1.0, 8.0, 8.0]),
        Skipped("box too thin (empty once clipped to the image in float32)", in_ground_truth=True),
    ),
    Case("bbox_outside_the_image", add_annotation(bbox=[500, 5, 3, 3]), Skipped("box outside the image")),
    Case("bbox_nan", add_annotation(bbox=[1, 1, float("nan"), 9]), Skipped("non-finite bbox")),
    Case("bbox_infinite", add_annotation(bbox=[1, 1, float("inf"), 9]), Skipped("non-finite bbox")),
    # json reads a 400-digit integer exactly, beyond any float: float() of it overflows.
    Case("bbox_beyond_a_float", add_annotation(bbox=[1, 1, 10**400, 9]), Skipped("non-finite bbox")),
    Case("segmentation_missing", add_annotation("segmentation"), Skipped("no segmentation")),
    Case("segmentation_empty", add_annotation(segmentation=[]), Skipped("no segmentation")),
    Case("polygon_of_strings", add_annotation(segmentation=[["1", 1, 10, 1, 10, 10]]), Skipped("malformed polygon")),
    Case("polygon_not_nested", add_annotation(segmentation=[1, 1, 10, 1, 10, 10]), Skipped("malformed polygon")),
    Case(
        "polygon_of_two_points",
        add_annotation(segmentation=[[1, 1, 10, 10]]),
        Skipped("polygon with fewer than 3 points"),
    ),
    Case(
        "polygon_nan",
        add_annotation(segmentation=[[1, 1, 10, float("nan"), 10, 10]]),
        Skipped("non-finite polygon coordinate"),
    ),
    Case(
        "polygon_infinite",
        add_annotation(segmentation=[[1, 1, float("-inf"), 1, 10, 10]]),
        Skipped("non-finite polygon coordinate"),
    ),
    Case(
        "polygon_beyond_a_float",
        add_annotation(segmentation=[[1, 1, 10**400, 1, 10, 10]]),
        Skipped("non-finite polygon coordinate"),
    ),
    Case(
        "polygon_far_outside_the_image",
        add_annotation(segmentation=[[1, 1, 1e9, 1, 10, 10]]),
        Skipped("polygon far outside the image"),
    ),
    Case(
        "rle_without_counts",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH]}),
        Skipped("malformed RLE segmentation"),
    ),
    Case(
        "rle_size_not_numbers",
        add_annotation(segmentation={"size": "48x64", "counts": [HEIGHT * WIDTH]}),
        Skipped("malformed RLE segmentation"),
    ),
    Case(
        "rle_of_another_size",
        add_annotation(segmentation={"size": [3, 3], "counts": "abc"}),
        Skipped("RLE size differs from the image size"),
    ),
    Case(
        "rle_counts_short",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH], "counts": [5, 3, 2]}),
        Skipped("RLE runs do not add up to the image size"),
    ),
    Case(
        "rle_counts_long",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH], "counts": [*uncompressed_counts(), 7]}),
        Skipped("RLE runs do not add up to the image size"),
    ),
    Case(
        "rle_counts_negative",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH], "counts": [-5, 5, HEIGHT * WIDTH]}),
        Skipped("malformed RLE segmentation"),
    ),
    Case(
        "rle_counts_fractional",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH], "counts": [5.5, HEIGHT * WIDTH - 5.5]}),
        Skipped("malformed RLE segmentation"),
    ),
    Case(
        "rle_counts_a_number",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH], "counts": 7}),
        Skipped("malformed RLE segmentation"),
    ),
    Case(
        "rle_string_garbage",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH], "counts": "abc"}),
        Skipped("malformed RLE segmentation"),
    ),
    Case(
        "rle_string_empty",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH], "counts": ""}),
        Skipped("RLE runs do not add up to the image size"),
    ),
    Case(
        "rle_string_non_ascii",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH], "counts": "é1"}),
        Skipped("malformed RLE segmentation"),
    ),
    Case(
        "rle_string_ends_inside_a_number",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH], "counts": compressed(triangle_mask()) + "o"}),
        Skipped("malformed RLE segmentation"),
    ),
    Case(
        "rle_string_of_a_smaller_mask",
        add_annotation(segmentation={"size": [HEIGHT, WIDTH], "counts": compressed(triangle_mask(20, 20))}),
        Skipped("RLE runs do not add up to the image size"),
    ),
    Case("area_nan", add_annotation(area=float("nan")), Skipped("malformed or NaN area")),
    Case("area_a_string", add_annotation(area="40"), Skipped("malformed or NaN area")),
    Case("iscrowd_a_string", add_annotation(iscrowd="0"), Skipped("malformed iscrowd")),
    # ---- found when the item is read: skipped and counted then
    Case(
        "polygon_collinear", add_annotation(segmentation=[[2, 2, 20, 20, 11, 11]]), Skipped("empty mask", at_read=True)
    ),
    Case(
        "polygon_between_pixel_centres",
        add_annotation(segmentation=[[10.1, 10.1, 10.4, 10.1, 10.2, 10.3]]),
        Skipped("empty mask", at_read=True),
    ),
    # ---- repaired
    Case(
        "polygon_part_of_two_points",
        add_annotation(segmentation=[[1, 1, 10, 1, 10, 10], [3, 3, 4, 4]]),
        Repaired(counted="polygon part with fewer than 3 points removed", pycocotools=True),
    ),
    # pycocotools reads a list of RLEs as the union of their masks (Detectron2 drops it).
    Case(
        "rle_list",
        add_annotation(segmentation=[{"size": [HEIGHT, WIDTH], "counts": uncompressed_counts()}] * 2),
        Repaired(counted="list of RLEs merged into one RLE", pycocotools=True),
    ),
    Case(
        "rle_list_of_compressed_strings",
        add_annotation(segmentation=[{"size": [HEIGHT, WIDTH], "counts": compressed(triangle_mask())}]),
        Repaired(counted="list of RLEs merged into one RLE", corrected=lambda data: _rle_list_as_one(data)),
    ),
    Case(
        "rle_list_of_another_size",
        add_annotation(segmentation=[{"size": [HEIGHT, WIDTH + 1], "counts": uncompressed_counts(HEIGHT, WIDTH + 1)}]),
        Skipped("RLE size differs from the image size"),
    ),
    Case(
        "rle_list_mixed_with_polygons",
        add_annotation(
            segmentation=[{"size": [HEIGHT, WIDTH], "counts": uncompressed_counts()}, [1, 1, 10, 1, 10, 10]]
        ),
        Skipped("segmentation mixes polygons and RLEs"),
    ),
    # pycocotools reads annotation id 0 as "unmatched", and keeps one annotation of a duplicated id.
    Case("annotation_id_zero", add_annotation(id=0), Repaired(logged="renumbering them 1..N")),
    Case(
        "annotation_ids_twice",
        edit_json(lambda data: data["annotations"][1].update(id=data["annotations"][0]["id"])),
        Repaired(logged="renumbering them 1..N"),
    ),
    # COCOeval needs both fields (a KeyError on the json file itself).
    Case(
        "area_and_iscrowd_missing",
        add_annotation("area", "iscrowd"),
        Repaired(check=lambda dataset: _check_completed(dataset)),
    ),
    # ---- image files
    Case(
        "image_not_an_image",
        edit_image_file(lambda path: path.write_bytes(b"this is not a jpeg")),
        Stops(rf"cannot read image .*{FIRST_FILE}", at_read=True),
    ),
    Case(
        "image_truncated",
        edit_image_file(lambda path: path.write_bytes(path.read_bytes()[:200])),
        Stops(rf"cannot read image .*{FIRST_FILE}", at_read=True),
    ),
    Case(
        "image_of_another_size",
        edit_image_file(lambda path: Image.new("RGB", (30, 20)).save(path, format="JPEG")),
        Stops(
            rf"{FIRST_FILE} is 30x20 \(WxH\) but .*case\.json says 64x48 \(the file has no EXIF orientation\)",
            at_read=True,
        ),
    ),
    # The same, found when the dataset is built (data=coco_format's check_sizes): one header read a file.
    Case(
        "image_of_another_size_checked_at_build",
        edit_image_file(lambda path: Image.new("RGB", (30, 20)).save(path, format="JPEG")),
        Stops(
            rf"1 of \d+ images in .*case\.json are not the size it gives them; the first: image .*{FIRST_FILE} is "
            r"30x20 \(WxH\) but .*case\.json says 64x48 \(the file has no EXIF orientation\)"
        ),
        kwargs={"check_sizes": True},
    ),
    Case(
        "image_exif_rotated", edit_image_file(write_exif_rotated, file_name="rotated.png"), Reads(expected_exif_rotated)
    ),
    Case(
        "image_exif_rotated_checked_at_build",  # its upright size is the json's: built, and read
        edit_image_file(write_exif_rotated, file_name="rotated.png"),
        Reads(expected_exif_rotated),
        kwargs={"check_sizes": True},
    ),
    Case(
        "image_exif_rotated_json_of_the_stored_pixels",
        edit_image_file(write_exif_rotated, file_name="rotated.png", height=WIDTH, width=HEIGHT),
        Stops(
            r"rotated\.png is 64x48 \(WxH\) but .*case\.json says 48x64: its EXIF orientation \(6, rotated 90° "
            r"clockwise\) was applied.*remove the file's EXIF orientation tag",
            at_read=True,
        ),
    ),
    Case("image_16bit_png", edit_image_file(write_16bit_png, file_name="deep.png"), Reads(expected_16bit)),
    Case(
        "image_floating_point_tiff",
        edit_image_file(write_float_tiff, file_name="float.tif"),
        Stops(r"image .*float\.tif is a floating-point TIFF image \(PIL mode F\)", at_read=True),
    ),
    Case("image_grayscale_png", edit_image_file(write_grayscale_png, file_name="gray.png"), Reads(expected_grayscale)),
    Case("image_cmyk_jpeg", edit_image_file(write_cmyk_jpeg), Reads(expected_red, tolerance=3)),
    # ---- 1. the types of the json's fields: stop naming the json and the id, or skip and count
    Case(
        "category_id_a_string",
        edit_categories(lambda cats: cats[1].update(id="1")),
        Stops(r"case\.json: category 'person' has id '1' \(str\), not an integer within int64"),
    ),
    Case(
        "category_id_a_list",
        edit_categories(lambda cats: cats[1].update(id=[1])),
        Stops(r"case\.json: category 'person' has id \[1\] \(list\)"),
    ),
    Case(
        "category_id_null",
        edit_categories(lambda cats: cats[1].update(id=None)),
        Stops(r"case\.json: category 'person' has id None \(NoneType\)"),
    ),
    Case(
        "category_id_beyond_int64",
        edit_categories(lambda cats: cats[1].update(id=2**70)),
        Stops(r"case\.json: category 'person' has id 1180591620717411303424 \(int\), not an integer within int64"),
    ),
    Case(
        "category_name_null",
        edit_categories(lambda cats: cats[1].update(name=None)),
        Stops(r"case\.json: category id 1 has name None, not a non-empty string"),
    ),
    Case(
        "category_name_a_number",
        edit_categories(lambda cats: cats[1].update(name=7)),
        Stops(r"case\.json: category id 1 has name 7, not a non-empty string"),
    ),
    Case(
        "image_id_beyond_int64",
        edit_first_image(id=2**64),
        Stops(r"case\.json: image '000000000100\.jpg' has id 18446744073709551616, not an integer within int64"),
    ),
    Case("image_id_a_list", edit_first_image(id=[100]), Stops(r"case\.json: image .* has id \[100\], not an integer")),
    Case(
        "image_id_null",
        edit_json(lambda data: data["images"][0].update(id=None)),
        Stops(r"case\.json: image .* has id None, not an integer"),
    ),
    Case(
        "info_nested_too_deeply",
        raw_json(b'{"info": ' + b"[" * 100_000 + b"]" * 100_000 + b', "images": [], "annotations": []}'),
        Stops(r"case\.json nests its values too deeply"),
    ),
    Case("annotation_image_id_a_string", add_annotation(image_id="100"), Skipped("malformed image id")),
    Case("annotation_image_id_a_list", add_annotation(image_id=[100]), Skipped("malformed image id")),
    Case("annotation_category_id_null", add_annotation(category_id=None), Skipped("malformed category id")),
    Case("annotation_category_id_a_fraction", add_annotation(category_id=1.5), Skipped("malformed category id")),
    Case("annotation_image_id_a_fraction", add_annotation(image_id=100.5), Skipped("malformed image id")),
    Case("annotation_category_id_a_bool", add_annotation(category_id=True), Skipped("malformed category id")),
    # Whole-number floats (ids passed through pandas by a converter): pycocotools reads 1.0 as the key 1.
    Case(
        "annotation_ids_whole_floats",
        add_annotation(category_id=1.0, image_id=float(IMAGE_ID), id=float(BAD_ID)),
        Repaired(check=lambda dataset: _check_int_ids(dataset), pycocotools=True),
    ),
    Case(
        "image_and_category_ids_whole_floats",
        edit_json(lambda data: _float_ids(data)),
        Repaired(check=lambda dataset: _check_int_ids(dataset), pycocotools=True),
    ),
    # pycocotools keeps annotation ids in float64 arrays: above 2**53 two ids can compare equal.
    Case("annotation_id_beyond_2_53", add_annotation(id=2**60), Repaired(logged="renumbering them 1..N")),
    Case("annotation_id_a_string", add_annotation(id="9001"), Repaired(logged="renumbering them 1..N")),
    # ---- 2. files that are not regular files: refused when the dataset is built, never opened
    Case(
        "json_a_named_pipe",
        lambda tmp, split: (split.image_dir, _fifo(tmp / "pipe.json")),
        Stops(r"COCO annotation file .*pipe\.json is a named pipe, not a regular file"),
    ),
    Case(
        "json_a_folder",
        lambda tmp, split: (split.image_dir, _folder(tmp / "folder.json")),
        Stops(r"COCO annotation file .*folder\.json is a folder, not a regular file"),
    ),
    Case(
        "image_a_named_pipe",
        edit_image_file(make_fifo),
        Stops(rf"1 of 7 image files listed in .*case\.json are not regular files.*{FIRST_FILE} \(a named pipe\)"),
    ),
    Case(
        "image_a_folder",
        edit_image_file(make_folder),
        Stops(rf"are not regular files.*{FIRST_FILE} \(a folder\)"),
    ),
    Case(
        "image_a_link_to_a_device",
        edit_image_file(link_to_dev_null),
        Stops(rf"are not regular files.*{FIRST_FILE} \(a character device\)"),
    ),
    Case(
        "image_a_link_to_nothing",
        edit_image_file(link_to_nothing),
        Stops(
            rf"1 of 7 image files listed in .*case\.json are missing.*{FIRST_FILE} \(a symbolic link to "
            r".*moved_away\.jpg, which does not exist\)",
            FileNotFoundError,
        ),
    ),
    # ---- 3. images that cannot be held: refused from the json's sizes or the file header, never decoded
    Case(
        "image_of_144_megapixels",
        edit_first_image(height=12000, width=12000),
        Stops(r"case\.json: 1 images are refused by their size, e\.g\.\s+image id 100 .* has 144\.0 MPix .*max_pix"),
        kwargs={"image_limits": ImageLimits()},
    ),
    Case(
        "image_20000_by_20",
        edit_first_image(height=20, width=20000),
        Stops(r"image id 100 .* is 20000x20, an aspect ratio of 1000\.0:1, above data\.image_limits\.max_aspect"),
        kwargs={"image_limits": ImageLimits()},
    ),
    Case(
        "image_that_resizes_to_zero_pixels",
        edit_first_image(height=20, width=20000),
        Stops(r"image id 100 .* would shrink its shorter side to 0\.02 pixels, below one"),
        kwargs={"image_limits": ImageLimits(max_aspect_ratio=1000, min_size=8, max_size=16)},
    ),
    Case(
        "image_header_of_144_megapixels_json_small",
        edit_image_file(write_png_header(12000, 12000), file_name="huge.png"),
        Stops(r"image .*huge\.png has 144\.0 MPix \(12000x12000\), above data\.image_limits", at_read=True),
        kwargs={"image_limits": ImageLimits()},
    ),
    Case(
        "image_a_decompression_bomb",
        edit_image_file(write_png_header(14000, 14000), file_name="bomb.png"),
        Stops(r"image .*bomb\.png is refused by PIL as a decompression bomb", at_read=True),
    ),
    # ---- 4. annotation volume: the largest kept, the rest counted; the read stays within the memory cap
    Case("fifty_thousand_annotations", tiny_annotations(50_000), Capped(50_000), {"max_annotations_per_image": 100}),
    # ---- 5. what evaluation scores: the mask's area where the json's is out of range; the json bbox
    Case(
        "area_zero",
        add_annotation(area=0),
        Repaired(counted=AREA_REPAIR, check=lambda dataset: _check_completed(dataset), corrected=_mask_area),
    ),
    Case(
        "area_above_1e10",
        add_annotation(area=1e12),
        Repaired(counted=AREA_REPAIR, check=lambda dataset: _check_completed(dataset), corrected=_mask_area),
    ),
    Case(
        "area_negative",
        add_annotation(area=-3.0),
        Repaired(counted=AREA_REPAIR, check=lambda dataset: _check_completed(dataset), corrected=_mask_area),
    ),
    Case(
        "area_infinite",
        add_annotation(area=float("inf")),
        Repaired(counted=AREA_REPAIR, check=lambda dataset: _check_completed(dataset), corrected=_mask_area),
    ),
    Case("bbox_far_from_its_mask", add_annotation(bbox=[30.0, 30.0, 20.0, 15.0]), Disagrees()),
    # Every box written as [x1, y1, x2, y2]: each matches its mask only when read that way.
    Case(
        "bboxes_in_xyxy",
        edit_json(lambda data: _boxes_as_corners(data)),
        Stops(
            r"case\.json: \d+ of its \d+ usable annotations have a bbox that matches its segmentation only when read "
            r"as \[x1, y1, x2, y2\] \(e\.g\. annotation id .*\); COCO's bbox is \[x, y, width, height\]"
        ),
    ),
    # One such box among many (a slip of the pen) is counted and kept, as any box far from its mask.
    Case("one_bbox_in_xyxy", edit_json(lambda data: _boxes_as_corners(data, first=1)), Disagrees(check_box=False)),
    Case(
        "images_list_empty",
        edit_json(lambda data: (data["images"].clear(), data["annotations"].clear())),
        Stops(r"case\.json leaves no image to use: its 'images' list is empty"),
    ),
    Case(
        "no_image_with_a_usable_annotation",
        edit_json(lambda data: data["annotations"].clear()),
        Stops(r"case\.json leaves no image to use: none of its 7 images has a usable non-crowd annotation"),
        kwargs={"drop_images_without_annotations": True},
    ),
    Case("classes_empty", edit_json(lambda data: None), Stops(r"classes is empty"), kwargs={"classes": []}),
    # ---- 10. messages that state the actual problem
    Case(
        "polygon_of_an_odd_number_of_coordinates",
        add_annotation(segmentation=[[1, 1, 10, 1, 10, 10, 5]]),
        Skipped("polygon with an odd number of coordinates"),
    ),
    Case(
        "polygon_part_of_an_odd_number_of_coordinates",
        add_annotation(segmentation=[[1, 1, 10, 1, 10, 10], [3, 3, 4, 4, 5]]),
        Repaired(counted="polygon part with an odd number of coordinates removed", pycocotools=False),
    ),
]


def _check_completed(dataset: CocoDataset) -> None:
    """The json left out area and iscrowd: the ground truth has them, area the mask's pixel count."""
    annotation = dataset.coco_gt.anns[BAD_ID]
    assert annotation["iscrowd"] == 0
    assert annotation["area"] == float(triangle_mask().sum())


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Split:
    json_path, image_dir = make_coco_split(tmp_path_factory.mktemp("coco"))
    return Split(json_path, image_dir)


@pytest.mark.parametrize("case", COCO_CASES, ids=str)
def test_coco(case: Case, split: Split, tmp_path: Path, caplog):
    run_in_child(_coco_case, case, split, tmp_path, caplog, timeout=case.timeout)


def _coco_case(case: Case, split: Split, tmp_path: Path, caplog) -> None:
    image_dir, json_path = case.make(tmp_path, split)
    outcome = case.outcome
    if isinstance(outcome, Stops) and not outcome.at_read:
        with pytest.raises(outcome.error, match=outcome.match):
            CocoDataset(image_dir, json_path, **case.kwargs)
        return
    with caplog.at_level(logging.WARNING, logger="mrcnn.data.coco"):
        dataset = CocoDataset(image_dir, json_path, **case.kwargs)
    first = dataset.image_ids.index(IMAGE_ID)
    if isinstance(outcome, Stops):
        with pytest.raises(outcome.error, match=outcome.match):
            dataset[first]
    elif isinstance(outcome, Reads):
        image, _ = dataset[first]
        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        expected = outcome.expected(image_dir / dataset.record(first)[0]["file_name"])
        np.testing.assert_allclose(pixels, expected, atol=outcome.tolerance, rtol=0)
    elif isinstance(outcome, Skipped):
        _check_skipped(case, dataset, split, image_dir, json_path, caplog.text)
    elif isinstance(outcome, Capped):
        _check_capped(case, dataset, split, json_path, caplog.text)
    elif isinstance(outcome, Disagrees):
        _check_disagrees(dataset, image_dir, json_path, caplog.text, outcome.check_box)
    else:
        _check_repaired(case, dataset, split, image_dir, json_path, caplog.text)


def _check_capped(case: Case, dataset: CocoDataset, split: Split, json_path: Path, log: str) -> None:
    """The first image's target holds the cap's count; the rest is counted and logged; the ground truth keeps all."""
    cap = case.kwargs["max_annotations_per_image"]
    left_out = _instances(split)[IMAGE_ID] + case.outcome.left_out - cap
    assert dataset.capped == (left_out, 1)
    assert f"left {left_out} annotations of 1 images out of the targets" in log and str(json_path) in log
    _, target = dataset[dataset.image_ids.index(IMAGE_ID)]
    assert len(target["labels"]) == cap and target["masks"].shape == (cap, HEIGHT, WIDTH)
    # The split's own annotations are larger than the added 2x2 squares: all of them are kept.
    assert int((target["area"] > 4).sum()) == _instances(split)[IMAGE_ID]
    assert (
        len(dataset.coco_gt.getAnnIds(imgIds=[IMAGE_ID]))
        == len(split.data()["annotations"])
        - sum(a["image_id"] != IMAGE_ID for a in split.data()["annotations"])
        + case.outcome.left_out
    )


def _check_disagrees(dataset: CocoDataset, image_dir: Path, json_path: Path, log: str, check_box: bool = True) -> None:
    """Counted and named; the json bbox is the target's box; perfect predictions score as pycocotools on the json."""
    assert dataset.bbox_disagreements == 1 and not dataset.skipped
    assert "1 annotations have a bbox that differs from their segmentation's extent" in log
    assert f"(e.g. annotation id {BAD_ID}); the json bbox is used for training and evaluation alike" in log
    if not check_box:
        return
    _, target = dataset[dataset.image_ids.index(IMAGE_ID)]
    assert [30.0, 30.0, 50.0, 45.0] in target["boxes"].tolist()
    result = run_in_child(read_and_evaluate, image_dir, json_path, True)
    assert result["metrics"] == pytest.approx(result["reference"], abs=1e-9)
    assert result["metrics"]["segm_AP"] == result["metrics"]["bbox_AP"] == 1.0


def _check_skipped(case: Case, dataset: CocoDataset, split: Split, image_dir: Path, json_path: Path, log: str) -> None:
    """Counted under its reason, named in the log line with the json; every item reads; evaluation finishes at AP 1."""
    reason = case.outcome.reason
    bad_id = "?" if case.name == "annotation_not_an_object" else BAD_ID
    if case.outcome.at_read:
        assert not dataset.skipped  # the mask is decoded only when the item is read
    else:
        assert dataset.skipped == {reason: 1}
        assert f"{json_path}: skipped 1 annotations: 1 {reason} (e.g. annotation id {bad_id})" in log
    # Kept in the records (and the evaluation ground truth) only when found at read time, or where it says so.
    kept_ids = {a["id"] for a in dataset.record(dataset.image_ids.index(IMAGE_ID))[1]}
    in_ground_truth = case.outcome.at_read or case.outcome.in_ground_truth
    assert (BAD_ID in kept_ids) == in_ground_truth

    result = run_in_child(read_and_evaluate, image_dir, json_path, in_ground_truth)
    assert result["instances"] == _instances(split)  # the bad annotation in no target
    if case.outcome.in_ground_truth:
        # A miss for perfect predictions, scored as pycocotools scores it on the json file.
        assert result["metrics"] == pytest.approx(result["reference"], abs=1e-9)
        assert result["metrics"]["bbox_AP"] < 1
    elif case.outcome.at_read:
        assert result["skipped"] == {reason: 1}
        assert f"{json_path}: 1 more annotations have an empty mask" in result["report"]
        assert f"(e.g. annotation id {BAD_ID})" in result["report"]
        # The ground truth keeps it, as pycocotools on the json file does: a miss for both IoU types.
        assert result["metrics"] == pytest.approx(result["reference"], abs=1e-9)
        assert result["metrics"]["segm_AP"] < 1 and result["metrics"]["bbox_AP"] < 1
    else:
        assert result["metrics"]["segm_AP"] == result["metrics"]["bbox_AP"] == 1.0


def _check_repaired(case: Case, dataset: CocoDataset, split: Split, image_dir: Path, json_path: Path, log: str):
    """Kept, the repair counted or logged; evaluation finishes with pycocotools' numbers on the json file."""
    outcome = case.outcome
    assert not dataset.skipped
    if outcome.counted:
        assert dataset.repaired == {outcome.counted: 1}
        assert f"repaired 1 annotations: 1 {outcome.counted}" in log
    if outcome.logged:
        assert outcome.logged in log and str(json_path) in log
        ids = [a["id"] for a in dataset.coco_gt.dataset["annotations"]]
        assert ids == list(range(1, len(ids) + 1))
    if outcome.check:
        outcome.check(dataset)
    reference_json = json_path
    if outcome.corrected:
        data = json.loads(json_path.read_text())
        outcome.corrected(data)
        reference_json = json_path.with_name("corrected.json")
        reference_json.write_text(json.dumps(data))
    reference = outcome.pycocotools or outcome.corrected is not None
    result = run_in_child(read_and_evaluate, image_dir, json_path, reference_json if reference else None)
    if reference:
        assert result["metrics"] == pytest.approx(result["reference"], abs=1e-9)
    assert result["metrics"]["segm_AP"] == result["metrics"]["bbox_AP"] == 1.0


def _boxes_as_corners(data: dict, first: int | None = None) -> None:
    """The json's boxes (the ``first`` ones, or all) written as ``[x1, y1, x2, y2]``; one of them gets ``BAD_ID``."""
    annotations = [a for a in data["annotations"] if a["bbox"][2] > 1 and a["bbox"][3] > 1][:first]
    for annotation in annotations:
        x, y, w, h = annotation["bbox"]
        annotation["bbox"] = [x, y, x + w, y + h]
    annotations[0]["id"] = BAD_ID


def _float_ids(data: dict) -> None:
    """Every image and category id, and every annotation's references to them, written as whole floats."""
    for entry in [*data["images"], *data["categories"]]:
        entry["id"] = float(entry["id"])
    for annotation in data["annotations"]:
        annotation.update(image_id=float(annotation["image_id"]), category_id=float(annotation["category_id"]))
    data["annotations"].append(good_annotation())


def _check_int_ids(dataset: CocoDataset) -> None:
    """The dataset holds the ids as ints, the float-written annotation included."""
    gt = dataset.coco_gt.dataset
    for entry in [*gt["images"], *gt["categories"]]:
        assert type(entry["id"]) is int
    for annotation in gt["annotations"]:
        assert all(type(annotation[key]) is int for key in ("id", "image_id", "category_id")), annotation
    assert BAD_ID in {a["id"] for a in gt["annotations"]}
    assert all(type(i) is int for i in [*dataset.image_ids, *dataset.label_to_category_id.values()])


def _rle_list_as_one(data: dict) -> None:
    """The case's list of one compressed RLE, as that RLE (pycocotools reads a list of RLEs only uncompressed)."""
    annotation = next(a for a in data["annotations"] if a["id"] == BAD_ID)
    annotation["segmentation"] = annotation["segmentation"][0]


def _instances(split: Split) -> dict[int, int]:
    """Non-crowd annotations per image id in the clean split."""
    data = split.data()
    counts = {image["id"]: 0 for image in data["images"]}
    for annotation in data["annotations"]:
        counts[annotation["image_id"]] += not annotation["iscrowd"]
    return counts


@pytest.mark.parametrize("drop_images_without_annotations", [False, True])
def test_a_training_set_with_no_usable_annotation_stops_before_training(
    split: Split, tmp_path: Path, drop_images_without_annotations
):
    # A box-only export (no segmentations): every annotation is skipped. Training it would learn background only.
    data = split.data()
    for annotation in data["annotations"]:
        annotation["segmentation"] = []
    path = tmp_path / "boxes_only.json"
    path.write_text(json.dumps(data))
    count = len(data["annotations"])
    if drop_images_without_annotations:
        # No image is left: the error says why, at the build.
        with pytest.raises(
            ValueError,
            match=rf"boxes_only\.json leaves no image to use: .*\(skipped {count} annotations: {count} no segmentation",
        ):
            CocoDataset(split.image_dir, path, drop_images_without_annotations=True)
        return
    dataset = CocoDataset(split.image_dir, path)
    assert len(dataset) == len(data["images"]) and dataset.num_trainable_annotations == 0
    datamodule = InstanceDataModule(dataset, dataset, batch_size=2)
    with pytest.raises(
        ValueError,
        match=rf"boxes_only\.json.* has no annotation to train on: skipped {count} annotations: {count} no segmentation",
    ):
        datamodule.train_dataloader()
    # Crowd regions alone are nothing to train on either: training keeps them out, also in the targets.
    data = split.data()
    for annotation in data["annotations"]:
        annotation["iscrowd"] = 1
    path.write_text(json.dumps(data))
    for include_crowd in (False, True):
        crowd = CocoDataset(split.image_dir, path, include_crowd=include_crowd)
        with pytest.raises(ValueError, match="has no annotation to train on"):
            InstanceDataModule(crowd, dataset, batch_size=2).train_dataloader()
    # One annotation is enough.
    data["annotations"][0]["iscrowd"] = 0
    path.write_text(json.dumps(data))
    InstanceDataModule(CocoDataset(split.image_dir, path), dataset, batch_size=2).train_dataloader()


def test_skips_are_counted_in_one_log_line(split: Split, tmp_path: Path, caplog):
    """All load-time skips of the corpus in one json: one line counts them by reason, with example ids."""
    data = split.data()
    skipped = [case for case in COCO_CASES if isinstance(case.outcome, Skipped) and not case.outcome.at_read]
    for number, case in enumerate(skipped):
        _, path = case.make(tmp_path, split)
        bad = json.loads(path.read_text())["annotations"][-1]
        if isinstance(bad, dict):
            bad["id"] = BAD_ID + number
        data["annotations"].append(bad)
    data["annotations"].append(good_annotation(id=8001, segmentation=[[1, 1, 10, 1, 10, 10], [3, 3, 4, 4]]))
    path = tmp_path / "bad_annotations.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="mrcnn.data.coco"):
        dataset = CocoDataset(split.image_dir, path)
    expected = {}
    for case in skipped:
        expected[case.outcome.reason] = expected.get(case.outcome.reason, 0) + 1
    assert dataset.skipped == expected
    assert dataset.repaired == {"polygon part with fewer than 3 points removed": 1}
    message = caplog.text
    assert "bad_annotations.json" in message and f"skipped {len(skipped)} annotations" in message
    assert dataset.skip_report in message
    zero_area = [BAD_ID + n for n, case in enumerate(skipped) if case.outcome.reason == "zero-area box"]
    assert f"2 zero-area box (e.g. annotation id {zero_area[0]}, {zero_area[1]})" in message
    assert "1 polygon with fewer than 3 points (e.g. annotation id" in message
    # The usable annotations remain, and the image still loads.
    index = dataset.image_ids.index(IMAGE_ID)
    _, target = dataset[index]
    assert len(target["labels"]) == _instances(split)[IMAGE_ID] + 1
    # The ground truth: the clean split's, the repaired one's, and those skipped from the targets only.
    in_ground_truth = sum(case.outcome.in_ground_truth for case in skipped)
    assert len(dataset.coco_gt.dataset["annotations"]) == len(split.data()["annotations"]) + 1 + in_ground_truth


def test_missing_image_file_without_the_check_stops_when_read(split: Split, tmp_path: Path):
    _, path = edit_first_image(file_name="gone.jpg")(tmp_path, split)
    dataset = CocoDataset(split.image_dir, path, check_files=False)
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg"):
        dataset[0]


def test_empty_mask_found_in_a_worker_is_counted_after_the_pass(split: Split, tmp_path: Path, caplog):
    """A skip found in a DataLoader worker process reaches the main process's count and log at the end of the pass."""
    image_dir, path = add_annotation(segmentation=[[2, 2, 20, 20, 11, 11]])(tmp_path, split)
    dataset = CocoDataset(image_dir, path)
    datamodule = InstanceDataModule(dataset, dataset, batch_size=2, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="mrcnn.data.coco"):
        for loader in (datamodule.val_dataloader(), datamodule.val_dataloader()):
            targets = [target for _, batch in loader for target in batch]
    assert {t["image_id"]: len(t["labels"]) for t in targets} == _instances(split)
    # Counted once although two passes read it; one line naming the json and the annotation.
    assert dataset.skipped == {"empty mask": 1}
    assert caplog.text.count("more annotations have an empty mask") == 1
    assert f"{path}: 1 more annotations have an empty mask" in caplog.text and f"annotation id {BAD_ID}" in caplog.text
    assert "skipped 1 annotations: 1 empty mask" in dataset.skip_report
    assert dataset.report_read_skips() == ""  # nothing new


def test_an_empty_mask_is_named_by_its_json_id_when_the_ids_were_renumbered(split: Split, tmp_path: Path, caplog):
    # Another annotation's id 0 makes the dataset renumber all of them (for pycocotools): the message about the
    # collinear polygon still names it as the json does.
    def edit(data: dict) -> None:
        data["annotations"][0]["id"] = 0
        data["annotations"].append(good_annotation(segmentation=[[2, 2, 20, 20, 11, 11]]))

    image_dir, path = edit_json(edit)(tmp_path, split)
    dataset = CocoDataset(image_dir, path)
    with caplog.at_level(logging.WARNING, logger="mrcnn.data.coco"):
        for index in range(len(dataset)):
            dataset[index]
        dataset.report_read_skips()
    assert "renumbering them 1..N" in caplog.text
    assert f"(e.g. annotation id {BAD_ID})" in caplog.text


# ------------------------------------------------------------------------------- evaluation in a bounded child


def run_in_child(function: Callable, *args, timeout: float = CHILD_TIMEOUT_S):
    """``function(*args)`` in a forked child with a time limit and a memory cap; fails the test if it hangs or dies.

    A thread could not be stopped: ``COCOeval`` looping in C holds it for good, and no Python signal gets in.
    A child can be killed. Inside a child (a whole case runs in one) the call runs inline, under the child's bounds.
    """
    if _IN_CHILD:
        return function(*args)
    call = f"{function.__name__}({', '.join(str(a)[:60] for a in args)})"
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(sender, function, args), daemon=True)
    child.start()
    sender.close()  # the child's end only: the pipe reports EOF when the child dies
    try:
        if not receiver.poll(timeout):
            pytest.fail(f"{call} did not finish within {timeout} s (a hang)")
        try:
            outcome = receiver.recv()
        except EOFError:
            child.join(5)
            pytest.fail(f"{call} died without a result (exit code {child.exitcode})")
    finally:
        child.kill()
        child.join()
    if "error" in outcome:
        pytest.fail(f"{call} raised:\n{outcome['error']}")
    return outcome["result"]


_IN_CHILD = False


def _send_result(sender, function: Callable, args: tuple) -> None:
    global _IN_CHILD
    _IN_CHILD = True
    try:
        _cap_memory()
        torch.set_num_threads(1)  # no OpenMP pool in a forked child
        sender.send({"result": function(*args)})
    except BaseException:  # noqa: BLE001  (whatever it is, the parent reports it)
        sender.send({"error": traceback.format_exc()})


def _cap_memory() -> None:
    """Lets this process map only ``CHILD_EXTRA_MEMORY`` more than it has: an unbounded allocation fails fast."""
    with open("/proc/self/status") as status:
        mapped_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = mapped_kib * 1024 + CHILD_EXTRA_MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def read_and_evaluate(image_dir: Path, json_path: Path, reference: bool | Path | None) -> dict:
    """Reads every item, reports read-time skips, scores perfect predictions (the non-crowd targets).

    Returns:
        ``instances`` (targets per image id), ``skipped`` and ``report`` after the pass, ``metrics`` of
        ``CocoEvaluator`` and, with ``reference``, pycocotools' own numbers on the json file (or on the json
        file ``reference`` names) for the same detections (only for a json that pycocotools can evaluate).
    """
    dataset = CocoDataset(image_dir, json_path)
    evaluator = CocoEvaluator(**InstanceDataModule(dataset, dataset).evaluator_kwargs())
    instances = {}
    for index in range(len(dataset)):
        _, target = dataset[index]
        instances[target["image_id"]] = len(target["labels"])
        prediction = {
            "boxes": target["boxes"],
            "labels": target["labels"],
            "scores": torch.ones(len(target["labels"])),
            "masks": target["masks"],
        }
        evaluator.update([prediction], [target])
    result = {
        "instances": instances,
        "report": dataset.report_read_skips(),
        "skipped": dict(dataset.skipped),
        "metrics": evaluator.compute(),
    }
    if reference:
        reference_json = json_path if reference is True else reference
        result["reference"] = _pycocotools_on_the_json(reference_json, evaluator.results_json())
    return result


def _pycocotools_on_the_json(json_path: Path, results: list[dict]) -> dict[str, float]:
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(json_path))
        for iou_type, key in (("bbox", "bbox"), ("segm", "segmentation")):
            detections = gt.loadRes([{k: r[k] for k in ("image_id", "category_id", "score", key)} for r in results])
            evaluator = COCOeval(gt, detections, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats.update({f"{iou_type}_{name}": float(evaluator.stats[i]) for i, name in enumerate(STAT_NAMES)})
    return stats


def test_a_hang_fails_the_case_instead_of_blocking():
    import time

    with pytest.raises(pytest.fail.Exception, match="did not finish within 0.5 s"):
        run_in_child(time.sleep, 30, timeout=0.5)


# --------------------------------------------------------------------------------------- Cityscapes cases


def cityscapes(corrupt: Callable[[Path], object]) -> Callable[[Path], Path]:
    """A case maker: a 2-image Cityscapes train split, then ``corrupt(root)``."""

    def make(tmp_path: Path) -> Path:
        root = make_cityscapes(tmp_path, splits=("train",), cities=("aachen",), per_city=2)
        corrupt(root)
        return root

    return make


def _second_instance_ids(root: Path) -> Path:
    return sorted((root / "gtFine" / "train" / "aachen").iterdir())[1]


def _first_image(root: Path) -> Path:
    return sorted((root / "leftImg8bit" / "train" / "aachen").iterdir())[0]


def _expected_16bit_left_image(path: Path) -> np.ndarray:
    height, width = cityscapes_instance_ids(0).shape
    return np.repeat((gradient_16bit(height, width) >> 8).astype(np.uint8)[:, :, None], 3, axis=2)


CITYSCAPES_CASES = [
    Case(
        "instance_ids_8bit",
        cityscapes(
            lambda root: Image.fromarray((cityscapes_instance_ids(0) % 256).astype(np.uint8)).save(
                _second_instance_ids(root)
            )
        ),
        Stops(r"aachen_000000_000001_gtFine_instanceIds\.png is 8-bit \(mode L\).*16-bit"),
    ),
    Case(
        "instance_ids_missing",
        cityscapes(lambda root: _second_instance_ids(root).unlink()),
        Skipped("no gtFine instanceIds file"),
    ),
    Case(
        "image_missing",  # an incomplete leftImg8bit extraction: its ground truth is counted, not silently dropped
        cityscapes(lambda root: sorted((root / "leftImg8bit" / "train" / "aachen").iterdir())[1].unlink()),
        Skipped("no leftImg8bit image file (its gtFine instanceIds file is there)"),
    ),
    Case(
        "instance_ids_corrupt",
        cityscapes(lambda root: _second_instance_ids(root).write_bytes(b"\x89PNG broken")),
        Stops(r"cannot read the header of .*aachen_000000_000001"),
    ),
    Case(
        "pair_of_two_sizes",
        cityscapes(lambda root: Image.fromarray(np.zeros((16, 32), np.uint16)).save(_second_instance_ids(root))),
        Stops(r"instanceIds\.png is 32x16 but its image .*_leftImg8bit\.png is 64x32"),
    ),
    Case(
        "split_folder_missing",
        cityscapes(lambda root: shutil.rmtree(root / "leftImg8bit" / "train")),
        Stops(r"Cityscapes folder not found: .*leftImg8bit/train", FileNotFoundError),
    ),
    Case(
        "no_images",
        cityscapes(lambda root: [p.unlink() for p in (root / "leftImg8bit" / "train").rglob("*.png")]),
        Stops(r"no '\*_leftImg8bit\.png' images .* under .*leftImg8bit/train", FileNotFoundError),
    ),
    Case(
        "image_corrupt",
        cityscapes(lambda root: _first_image(root).write_bytes(b"\x89PNG broken")),
        Stops(r"cannot read the header of .*aachen_000000_000000_leftImg8bit\.png"),
    ),
    Case(
        "image_16bit",
        cityscapes(
            lambda root: Image.fromarray(gradient_16bit(*cityscapes_instance_ids(0).shape)).save(_first_image(root))
        ),
        Reads(_expected_16bit_left_image),
    ),
    # 1 in a value's labelId: counted when read; the official evaluation reads it as void instead of a KeyError
    Case("label_id_outside_the_table", cityscapes(lambda root: _add_region(root, 40_001)), Skipped("labelId outside")),
    Case("region_id_outside_the_table", cityscapes(lambda root: _add_region(root, 50)), Skipped("labelId outside")),
    Case(
        "instance_ids_32bit_tiff_named_png",
        cityscapes(
            lambda root: Image.fromarray(cityscapes_instance_ids(1).astype(np.int32) * 1000).save(
                _second_instance_ids(root), format="TIFF"
            )
        ),
        Stops(r"aachen_000000_000001_gtFine_instanceIds\.png is a TIFF image in mode I .*not a 16-bit PNG"),
    ),
    Case(
        "city_level_missing",
        cityscapes(lambda root: _flatten_cities(root)),
        Stops(r"leftImg8bit/train, but 2 directly in it .*leftImg8bit/<split>/<city>/", FileNotFoundError),
    ),
    Case(
        "image_a_named_pipe",
        cityscapes(lambda root: make_fifo(_first_image(root))),
        Stops(r"Cityscapes image .*aachen_000000_000000_leftImg8bit\.png is a named pipe, not a regular file"),
    ),
    Case(
        "instance_ids_a_named_pipe",
        cityscapes(lambda root: make_fifo(_second_instance_ids(root))),
        Stops(r"instanceIds file .*aachen_000000_000001_gtFine_instanceIds\.png is a named pipe"),
    ),
    Case(
        "image_over_the_pixel_limit",
        cityscapes(lambda root: None),
        Stops(r"image .*aachen_000000_000000_leftImg8bit\.png has 0\.0 MPix \(64x32\), above data\.image_limits"),
        kwargs={"image_limits": ImageLimits(max_pixels=1000)},
    ),
    Case(
        "more_instances_than_the_cap",
        cityscapes(lambda root: None),
        Skipped("above max_annotations_per_image=1"),
        kwargs={"max_annotations_per_image": 1},
    ),
]


def _add_region(root: Path, value: int) -> None:
    """Writes ``value`` into a corner of the second instanceIds file (a labelId outside the table)."""
    path = _second_instance_ids(root)
    ids = np.array(Image.open(path), dtype=np.uint16)
    ids[:3, :3] = value
    Image.fromarray(ids).save(path)


def _flatten_cities(root: Path) -> None:
    """Moves the images out of their city folder, directly into leftImg8bit/train."""
    for path in list((root / "leftImg8bit" / "train" / "aachen").iterdir()):
        path.rename(root / "leftImg8bit" / "train" / path.name)


@pytest.mark.parametrize("case", CITYSCAPES_CASES, ids=str)
def test_cityscapes(case: Case, tmp_path: Path, caplog):
    run_in_child(_cityscapes_case, case, tmp_path, caplog, timeout=case.timeout)


# Why a Cityscapes image is left out when its files are paired (the rest are counted when read).
PAIRING_REASONS = ("no gtFine instanceIds file", "no leftImg8bit image file (its gtFine instanceIds file is there)")


def _cityscapes_case(case: Case, tmp_path: Path, caplog) -> None:
    root = case.make(tmp_path)
    outcome = case.outcome
    if isinstance(outcome, Stops):
        with pytest.raises(outcome.error, match=outcome.match):
            CityscapesDataset(root, split="train", **case.kwargs)
    elif isinstance(outcome, Skipped) and outcome.reason not in PAIRING_REASONS:
        _check_counted_when_read(case, root, caplog)
    elif isinstance(outcome, Skipped):
        with caplog.at_level(logging.WARNING, logger="mrcnn.data.cityscapes"):
            dataset = CityscapesDataset(root, split="train")
        assert len(dataset) == 1 and dataset.skipped_images == {outcome.reason: 1}
        assert f"left out 1 images: 1 {outcome.reason}" in caplog.text
        assert "aachen_000000_000001_gtFine_instanceIds.png" in caplog.text
        dataset[0]
    else:
        dataset = CityscapesDataset(root, split="train")
        image, _ = dataset[0]
        pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(pixels, outcome.expected(dataset.image_files[0]))


def _check_counted_when_read(case: Case, root: Path, caplog) -> None:
    """Left out of the targets when read, counted once in one line; the official evaluation still runs."""
    from mrcnn.cityscapes_eval import evaluate_results

    dataset = CityscapesDataset(root, split="train", include_crowd=True, **case.kwargs)
    with caplog.at_level(logging.WARNING, logger="mrcnn.data.cityscapes"):
        for _ in range(2):  # a second pass counts nothing new
            targets = [dataset[i][1] for i in range(len(dataset))]
            report = dataset.report_read_skips()
    assert case.outcome.reason in caplog.text and caplog.text.count(case.outcome.reason) == 1
    assert report == "" and "aachen_000000_00000" in caplog.text
    for target in targets:
        assert set(target["labels"].tolist()) <= set(range(1, 9))
    metrics = evaluate_results([], dict(zip(dataset.image_ids, dataset.instance_files)))
    assert metrics["cityscapes_AP"] in (0.0, -1.0)


def test_cityscapes_image_broken_after_the_check_stops_naming_it(tmp_path: Path):
    root = make_cityscapes(tmp_path, splits=("train",), cities=("aachen",), per_city=1)
    dataset = CityscapesDataset(root, split="train")
    dataset.image_files[0].write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=dataset.image_files[0].name):
        dataset[0]


def test_8bit_instance_ids_read_directly_stops_naming_it(tmp_path: Path):
    path = tmp_path / "x_gtFine_instanceIds.png"
    Image.fromarray((cityscapes_instance_ids(0) % 256).astype(np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"x_gtFine_instanceIds\.png is 8-bit"):
        read_instance_ids(path)


# ------------------------------------------------------------------------------------ mode=predict inputs, outputs


def _predict_folder(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        Image.new("RGB", (WIDTH, HEIGHT), (200, 30, 30)).save(folder / name)
    return folder


def _with(write: Callable[[Path], object], name: str) -> Callable[[Path], Path]:
    """A case maker: a folder with one good image and ``name`` written by ``write``."""

    def make(tmp_path: Path) -> Path:
        folder = _predict_folder(tmp_path, "good.png")
        write(folder / name)
        return folder

    return make


def _write_rgb(width: int, height: int) -> Callable[[Path], None]:
    return lambda path: Image.new("RGB", (width, height)).save(path)


PREDICT_CASES = [
    Case(
        "input_folder_with_a_named_pipe",
        _with(make_fifo, "pipe.png"),
        Stops(r"predict\.input=.*images: 1 entries are not regular files: \['pipe\.png \(a named pipe\)'\]"),
    ),
    Case(
        "input_a_named_pipe",
        lambda tmp: _fifo(tmp / "pipe.png"),
        Stops(r"predict\.input .*pipe\.png is a named pipe, not a regular file"),
    ),
    Case(
        "input_2000_by_20",
        _with(_write_rgb(2000, 20), "strip.png"),
        LeftOut(r"image .*strip\.png is 2000x20, an aspect ratio of 100\.0:1, above data\.image_limits"),
        kwargs={"limits": ImageLimits()},
    ),
    Case(
        "input_header_of_144_megapixels",
        _with(write_png_header(12000, 12000), "huge.png"),
        LeftOut(r"image .*huge\.png has 144\.0 MPix"),
        kwargs={"limits": ImageLimits()},
    ),
    Case(
        "input_a_decompression_bomb",
        _with(write_png_header(14000, 14000), "bomb.png"),
        LeftOut(r"image .*bomb\.png is refused by PIL as a decompression bomb"),
    ),
    Case(
        "input_not_an_image",
        _with(lambda path: path.write_bytes(b"not a png"), "text.png"),
        LeftOut(r"cannot read the header of image .*text\.png"),
    ),
    Case(  # refused from its header, not when its turn comes in the run
        "input_a_32_bit_tiff",
        _with(lambda path: Image.fromarray(np.zeros((8, 8), np.int32)).save(path), "deep.tif"),
        LeftOut(r"image .*deep\.tif is a 32-bit integer TIFF image \(PIL mode I\)"),
    ),
]


@pytest.mark.parametrize("case", PREDICT_CASES, ids=str)
def test_predict_input(case: Case, tmp_path: Path):
    from mrcnn.engine.predict import ImageFiles
    from mrcnn.errors import CommandError

    def check() -> None:
        if isinstance(case.outcome, Stops):
            with pytest.raises(case.outcome.error, match=case.outcome.match):
                ImageFiles(case.make(tmp_path), **case.kwargs)
            return
        folder = case.make(tmp_path)
        files = ImageFiles(folder, **case.kwargs)
        assert [f.name for f in files.files] == ["good.png"] and files.sizes == [(HEIGHT, WIDTH)]
        [(name, why)] = files.skipped
        assert re.search(case.outcome.match, why), why
        # Given alone, it stops the run: a mistake in the command, said without a traceback (run.py).
        with pytest.raises(CommandError, match=case.outcome.match) as error:
            ImageFiles(folder / name, **case.kwargs)
        assert str(error.value).startswith(f"predict.input={folder / name}: ")

    run_in_child(check, timeout=case.timeout)


def _predict_json(tmp_path: Path, *images: dict) -> Path:
    path = tmp_path / "images.json"
    path.write_text(json.dumps({"images": list(images), "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    return path


def test_predict_ids_from_a_json_that_names_a_file_twice_or_gives_another_size(tmp_path: Path):
    from mrcnn.engine.predict import ImageFiles

    folder = _predict_folder(tmp_path, "1.jpg")
    entry = {"file_name": "1.jpg", "height": HEIGHT, "width": WIDTH}
    # The same name in two folders of the json: which image the results belong to is not known.
    twice = _predict_json(tmp_path, {**entry, "id": 7, "file_name": "val/1.jpg"}, {**entry, "id": 9})
    with pytest.raises(ValueError, match=r"names 2 images '1\.jpg': 'val/1\.jpg' \(id 7\), '1\.jpg' \(id 9\)"):
        ImageFiles(folder, twice)
    # A size the file does not have (e.g. the unrotated size of an EXIF-rotated photo): its masks would never match.
    other_size = _predict_json(tmp_path, {**entry, "id": 7, "height": WIDTH, "width": HEIGHT})
    with pytest.raises(
        ValueError, match=rf"1\.jpg is {WIDTH}x{HEIGHT} \(WxH\) but predict\.coco_json=.*images\.json says"
    ):
        ImageFiles(folder, other_size)
    # Listed once with its own size (or twice with one id): its id.
    same = _predict_json(tmp_path, {**entry, "id": 7}, {**entry, "id": 7, "file_name": "again/1.jpg"})
    assert ImageFiles(folder, same).image_ids == [7]


def test_predict_says_which_entries_of_a_folder_it_leaves_out(tmp_path: Path, caplog):
    from mrcnn.engine.predict import ImageFiles

    folder = _predict_folder(tmp_path, "a.jpg")
    (folder / "notes.txt").write_text("")
    (folder / "photo.heic").write_bytes(b"")
    (folder / "sub").mkdir()
    with caplog.at_level(logging.INFO, logger="mrcnn.engine.predict"):
        assert [f.name for f in ImageFiles(folder).files] == ["a.jpg"]
    assert "1 image files; 3 other entries left out (notes.txt, photo.heic, sub/)" in caplog.text


def test_predict_inputs_whose_overlay_names_would_be_too_long_stop_before_any_work(tmp_path: Path):
    from mrcnn.engine.predict import check_overlay_names

    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = "a" * (limit - 8) + ".jpg"  # its overlay, <name>.png, just fits
    too_long = "b" * (limit - 7) + ".jpg"
    check_overlay_names([Path(longest)], tmp_path)
    with pytest.raises(
        ValueError, match=rf"overlay names of 1 inputs .* longer than the {limit} bytes .*\['b+\.jpg'\]"
    ):
        check_overlay_names([Path(longest), Path(too_long)], tmp_path)


def test_predict_output_that_is_a_file_stops_before_any_work(tmp_path: Path):
    from mrcnn.engine.predict import prepare_output

    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match=r"predict\.output=.*out is a file, not a folder"):
        prepare_output(tmp_path / "out")
    with pytest.raises(ValueError, match=r"predict\.output=.*out/sub: cannot write there"):
        prepare_output(tmp_path / "out" / "sub")


def test_colliding_names_keep_every_overlay(tmp_path: Path):
    """``a.jpg`` and ``a.png`` in one folder: two overlays, named after the whole file name."""
    from mrcnn.engine.predict import ImageFiles, PredictionWriter

    dataset = ImageFiles(_predict_folder(tmp_path, "a.jpg", "a.png", "b.png"))
    writer = PredictionWriter(tmp_path / "out", dataset.coco_images(), ["thing"], score_threshold=0.0)
    items = [dataset[i] for i in range(len(dataset))]
    box = torch.tensor([[2.0, 2.0, 20.0, 20.0]])
    detection = {"boxes": box, "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}
    detection["masks"] = torch.zeros(1, 1, HEIGHT, WIDTH)
    images, metas = zip(*items)
    writer.write_on_batch_end(None, None, [detection] * 3, None, (images, metas), 0, 0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jpg.png", "a.png.png", "b.png.png"]
    assert writer.num_overlays == 3


# ----------------------------------------------------------------------------- checkpoints for evaluate, predict


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a checkpoint at all")


def _truncated(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(8)}}, path)
    path.write_bytes(path.read_bytes()[:200])


class _NotATensor:
    pass


CHECKPOINT_CASES = [
    Case("garbage", _garbage, Stops(r"ckpt_path=.*model\.ckpt is not a PyTorch checkpoint, or it is damaged")),
    Case("truncated", _truncated, Stops(r"ckpt_path=.*model\.ckpt is not a PyTorch checkpoint, or it is damaged")),
    Case(
        "pickled_object",
        lambda path: torch.save({"model": _NotATensor()}, path),
        Stops(r"ckpt_path=.*model\.ckpt holds a Python object of type .*_NotATensor besides tensors"),
    ),
    Case("named_pipe", make_fifo, Stops(r"ckpt_path file .*model\.ckpt is a named pipe, not a regular file")),
    Case("missing", lambda path: None, Stops(r"ckpt_path file not found: .*model\.ckpt", FileNotFoundError)),
]


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=str)
def test_checkpoint(case: Case, tmp_path: Path):
    from mrcnn.engine.model_record import read_checkpoint

    def check() -> None:
        path = tmp_path / "model.ckpt"
        case.make(path)
        with pytest.raises(case.outcome.error, match=case.outcome.match) as error:
            read_checkpoint(path)
        # Neither the message nor the error it comes from advises loading the file unsafely.
        assert "weights_only=False" not in str(error.value) and "weights_only" not in str(error.value.__cause__)

    run_in_child(check, timeout=case.timeout)


def test_checkpoint_of_another_model_size_lists_the_differing_keys(tmp_path: Path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mrcnn.engine.checkpoints import RUN_RECORD_KEY, check_checkpoint_fits
    from mrcnn.errors import CommandError
    from tests.helpers.config import TINY_MODEL, compose_config

    saved_cfg = compose_config([*TINY_MODEL, "model.depth=34", "model.fpn_channels=8"])
    saved = instantiate(saved_cfg.module)
    path = tmp_path / "model.ckpt"
    record = {"config": OmegaConf.to_container(saved_cfg, resolve=True), "overrides": ["model.depth=34"]}
    torch.save({"state_dict": saved.state_dict(), RUN_RECORD_KEY: record}, path)
    cfg = compose_config(TINY_MODEL)
    with pytest.raises(CommandError) as error:
        check_checkpoint_fits(instantiate(cfg.module), str(path), cfg)
    message = str(error.value)
    assert f"ckpt_path={path} does not fit the model this run builds" in message
    assert "model.depth: 34 in the checkpoint, 18 in this run" in message
    assert "model.fpn_channels: 8 in the checkpoint, 16 in this run" in message
    assert "started with the overrides: model.depth=34" in message
    assert len(message.splitlines()) < 20  # not a line per tensor
    check_checkpoint_fits(saved, str(path), saved_cfg)  # its own model fits


# ------------------------------------------------------------------------------------------------ config values

CONFIG_CASES = [
    ("min_size_zero", "data.min_size", 0),
    ("min_size_empty", "data.min_size", []),
    ("min_size_negative", "data.min_size", [-800]),
    ("max_size_zero", "data.max_size", 0),
    ("anchor_sizes_empty", "model.anchor_sizes", []),
    ("rois_per_image_zero", "model.rois_per_image", 0),
    ("classes_empty", "data.classes", []),
    ("score_threshold_above_one", "predict.score_threshold", 1.5),
    ("predict_batch_size_zero", "predict.batch_size", 0),
    ("max_annotations_per_image_zero", "data.max_annotations_per_image", 0),
]


@pytest.fixture(scope="module")
def default_config():
    from tests.helpers.config import compose_config

    return compose_config()


@pytest.mark.parametrize("name,key,value", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_value(name: str, key: str, value, default_config):
    from omegaconf import OmegaConf

    from mrcnn.engine.config_checks import check_config

    cfg = default_config.copy()
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ValueError, match=rf"invalid config values:\n  {key}=") as error:
        check_config(cfg)
    assert "must be" in str(error.value)


# ------------------------------------------------------------------------------- evaluations with nothing to score


def _targets(iscrowd: list[int]) -> list[dict]:
    n = len(iscrowd)
    masks = torch.zeros(n, HEIGHT, WIDTH, dtype=torch.uint8)
    masks[:, 2:10, 2:10] = 1
    return [
        {
            "boxes": torch.tensor([[2.0, 2.0, 10.0, 10.0]] * n).reshape(n, 4),
            "labels": torch.ones(n, dtype=torch.int64),
            "masks": masks,
            "iscrowd": torch.tensor(iscrowd, dtype=torch.int64),
            "image_id": 1,
        }
    ]


NOTHING_TO_SCORE = [
    ("no_image", None, "no image was evaluated"),
    ("only_crowd_regions", [1, 1], "the ground truth of the 1 evaluated images holds no non-crowd object"),
    ("image_without_objects", [], "the ground truth of the 1 evaluated images holds no non-crowd object"),
]


@pytest.mark.parametrize("name,iscrowd,reason", NOTHING_TO_SCORE, ids=[c[0] for c in NOTHING_TO_SCORE])
def test_nothing_to_score_is_said(name, iscrowd, reason, tmp_path: Path, capsys):
    """The AP table of "-" says why, on the terminal and in metrics.json."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from mrcnn.engine.summary import write_final_metrics

    evaluator = CocoEvaluator(class_names=["thing"])
    if iscrowd is not None:
        targets = _targets(iscrowd)
        prediction = {k: targets[0][k] for k in ("boxes", "labels", "masks")}
        evaluator.update([{**prediction, "scores": torch.ones(len(iscrowd))}], targets)
    metrics = evaluator.compute()
    assert all(v == -1.0 for v in metrics.values())
    assert evaluator.nothing_to_score.startswith(reason)
    trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=0, is_global_zero=True)
    write_final_metrics(OmegaConf.create({"run_dir": str(tmp_path)}), trainer, metrics, evaluator.nothing_to_score)
    assert f"WARNING: nothing was scored: {reason}" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["nothing_to_score"].startswith(reason)
