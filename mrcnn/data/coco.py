"""Instance segmentation data in COCO json format (COCO 2017 itself or any user dataset).

The json is read and checked once, when the dataset is built: every annotation
that cannot be used (unknown image or category, a zero-area, out-of-image or
non-finite box, a polygon with fewer than 3 points, a NaN, infinite or far-away
coordinate, an RLE whose runs do not add up to its image (:mod:`mrcnn.data.rle`),
a malformed area or iscrowd) is skipped, counted by reason in
:attr:`CocoDataset.skipped` and reported in one log line naming example
annotation ids, never dropped silently: pycocotools would rasterise, decode or
evaluate it into exhausted memory, garbage masks or an endless ``COCOeval`` loop.
A malformed image entry (a size that is not a whole number, a file name that is
not a string) stops with the json's path and the image id. A polygon that
rasterises to no pixel shows only when its item is read: it is left out of the
target then and counted by :meth:`CocoDataset.report_read_skips`. Problems that
only show when an image is read (a corrupt or truncated file, a size different
from the json's after EXIF orientation, see :mod:`mrcnn.data.images`) raise with
the file's path. The whole corpus of bad input is ``tests/data/test_bad_input.py``.

Labels: the json's category ids (COCO's 1..90 with gaps) map to contiguous labels
1..K in category-id order (or in the order of ``classes``);
:attr:`CocoDataset.label_to_category_id` maps them back for evaluation.

Crowd regions (``iscrowd=1``) are left out of the targets by default, as the model
must not train on them. Evaluation uses :attr:`CocoDataset.coco_gt`, the json's
own ground truth, where pycocotools treats them as ignore regions.

Memory: after the build the dataset holds no per-image Python objects. Each json
image and its usable annotations are pickled into one byte buffer
(:class:`~mrcnn.data.records.PackedRecords`); ids and sizes are int arrays. Forked
DataLoader workers read the buffer without copying it, where a list of dicts is
copied into every worker as it reads it (reference counts are writes). Measured
with ``benchmarks/coco_scale.py`` on a COCO-train-sized json (118,287 images,
860k annotations, 502 MiB): see ``benchmarks/README.md``.

Processes: a process parses a json once, when it builds the dataset (a run builds
each dataset once per process; the class names that ``data=coco_format`` reads from
the training json come from its ``categories`` list alone). Under DDP, and under
SLURM with one task per GPU, every rank builds its own dataset: the ranks parse in
parallel, each in the time of one build, and each holds one buffer that its
DataLoader workers share. No cache file is written next to the json: there is none
to go stale, the data folder may be read-only, and ranks that start at different
times need no locking. The evaluation ground truth (:attr:`CocoDataset.coco_gt`) is
built on first use, by each process that runs ``CocoEvaluator.compute``, once.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import logging
import math
import mmap
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import pycocotools.coco
import pycocotools.mask as mask_utils
import torch

from mrcnn.data.images import (
    ImageLimits,
    check_regular_file,
    file_kind,
    read_image,
    read_image_size,
    size_mismatch_message,
)
from mrcnn.data.records import PackedRecords, gc_paused, release_freed_memory
from mrcnn.data.rle import compressed_rle_totals, rle_problem
from mrcnn.data.transforms import InstanceTransform, to_sample, transform_instances

__all__ = [
    "CocoDataset",
    "LazyCoco",
    "decode_masks",
    "load_coco_json",
    "read_category_names",
    "read_image",
    "read_rgb_image",
    "segmentation_to_rle",
]

log = logging.getLogger(__name__)

# How many example annotation ids each skip reason names in the log line.
_EXAMPLES_PER_REASON = 3
# The types a polygon coordinate may have, as json gives them (bool: isinstance(True, int) passed before).
_NUMBER_TYPES = frozenset({int, float, bool})
# The types an annotation's area may have.
_AREA_TYPES = frozenset({int, float})
# Bytes of the json decoded at a time when only its "categories" list is read.
_CATEGORIES_WINDOWS = (1 << 16, 1 << 20, 1 << 24)
_KEY_SEPARATOR = re.compile(rb"\s*:\s*")
# Ids must fit numpy's int64 (image ids are stored in int64 arrays, pycocotools indexes numpy arrays by them).
_MIN_INT64, _MAX_INT64 = -(2**63), 2**63 - 1
# pycocotools keeps annotation ids in float64 arrays (COCOeval's matches): exact up to 2**53.
_MAX_ANNOTATION_ID = 2**53
# A json bbox and its segmentation's extent disagree when a side differs by more than this many pixels,
# or this fraction of the box's longer side if that is more. COCO's boxes are their polygons' extents; a box
# taken from the rasterised mask can miss a thin polygon tip by a few pixels (3 in the test data).
BBOX_TOLERANCE_PIXELS, BBOX_TOLERANCE_FRACTION = 4.0, 0.1


def _short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about values of any size."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_coco_json(path: str | os.PathLike) -> dict:
    """Reads a COCO json file and checks its top-level structure.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, not valid JSON, or lacks ``images``,
            ``annotations`` or ``categories`` lists (naming the file).
    """
    path = Path(path)
    check_regular_file(path, "COCO annotation file")
    if path.stat().st_size == 0:
        raise ValueError(f"COCO annotation file {path} is empty")
    try:
        with open(path, encoding="utf-8") as f, gc_paused():
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO annotation file {path} is not valid JSON: {err}") from err
    except RecursionError as err:
        raise ValueError(f"COCO annotation file {path} nests its values too deeply for Python's json parser") from err
    if not isinstance(data, dict):
        raise ValueError(f"COCO annotation file {path} must hold a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"COCO annotation file {path} has no {key!r} list (keys: {sorted(data)})")
    if not data["categories"]:
        raise ValueError(f"COCO annotation file {path} declares no categories")
    return data


def read_category_names(path: str | os.PathLike) -> list[str]:
    """Category names of a COCO json in category-id order (label ``i + 1`` is ``names[i]``).

    Decodes only the json's ``"categories"`` list where it can (see
    :func:`_read_categories_only`), so reading the names before the dataset is built
    does not parse a training json twice; otherwise loads the whole file.
    """
    categories = _read_categories_only(path)
    if categories is None:
        categories = load_coco_json(path)["categories"]
    categories = sorted(_check_categories(categories, path), key=lambda c: c["id"])
    return [c["name"] for c in categories]


def _read_categories_only(path: str | os.PathLike) -> list | None:
    """The json's top-level ``"categories"`` list decoded alone, or ``None`` where that is not safe.

    In valid JSON a quote inside a string is escaped, so the text ``"categories"``
    occurring exactly once in a COCO json is the key of its top-level list (a nested
    key of that name, or a string with that value, would make a second occurrence).
    Its value is decoded from a window of the file that grows until the list is
    complete. Anything unexpected (two occurrences, not a non-empty list, invalid
    text) returns ``None`` and the caller reads the whole file, which reports errors
    properly; the dataset checks the whole file when it is built.
    """
    path = Path(path)
    # A named pipe or device is neither mapped nor read here: load_coco_json says what it is.
    if not path.is_file() or not stat.S_ISREG(path.stat().st_mode) or path.stat().st_size == 0:
        return None
    # Mapped, not read: the file's pages stay in the page cache instead of a copy in this process.
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        return _decode_categories(raw)


def _decode_categories(raw: mmap.mmap) -> list | None:
    """The value of the only ``"categories"`` key of a json's bytes, or ``None`` (see :func:`_read_categories_only`)."""
    key = b'"categories"'
    first = raw.find(key)
    if first < 0 or raw.find(key, first + 1) >= 0:
        return None
    colon = _KEY_SEPARATOR.match(raw, first + len(key))
    if colon is None:
        return None
    start = colon.end()
    for size in (*_CATEGORIES_WINDOWS, len(raw) - start):
        last = start + size >= len(raw)
        try:
            # Incremental decoding keeps a character cut by the window's end back instead of failing on it.
            text = codecs.getincrementaldecoder("utf-8")().decode(raw[start : start + size], final=last)
            value, _ = json.JSONDecoder().raw_decode(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            if last:
                return None
            continue
        return value if isinstance(value, list) and value else None
    return None


# The name read_image had here before it moved to mrcnn.data.images (EXIF orientation, 16-bit images).
read_rgb_image = read_image


def _json_id(value) -> int | None:
    """``value`` as an id, or ``None`` if it is none: an integer that numpy's int64 (and so pycocotools and torch)
    can hold, or a float with a whole value (tools that pass ids through pandas write ``100.0``; pycocotools reads
    it as the same key as ``100``) up to 2**53, which a float holds exactly. A bool, a string or ``1.5`` is no id.
    """
    if type(value) is int:
        return value if _MIN_INT64 <= value <= _MAX_INT64 else None
    if type(value) is float and value.is_integer() and abs(value) <= _MAX_ANNOTATION_ID:
        return int(value)
    return None


def _check_categories(categories: list, path) -> list[dict]:
    ids, names = set(), set()
    for category in categories:
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise ValueError(
                f"COCO annotation file {path}: every category needs an 'id' and a 'name', got {_short(category)}"
            )
        category_id = _json_id(category["id"])
        if category_id is None:
            raise ValueError(
                f"COCO annotation file {path}: category {_short(category['name'])} has id {_short(category['id'])} "
                f"({type(category['id']).__name__}), not an integer within int64"
            )
        category["id"] = category_id
        if not isinstance(category["name"], str) or not category["name"].strip():
            raise ValueError(
                f"COCO annotation file {path}: category id {category['id']} has name {_short(category['name'])}, "
                "not a non-empty string"
            )
        if category["id"] in ids:
            raise ValueError(f"COCO annotation file {path}: category id {category['id']} appears twice")
        if category["name"] in names:
            raise ValueError(f"COCO annotation file {path}: category name {category['name']!r} appears twice")
        ids.add(category["id"])
        names.add(category["name"])
    return categories


class CocoDataset(torch.utils.data.Dataset):
    """Images and instance annotations from a COCO-format json.

    Args:
        image_dir: folder the json's ``file_name`` entries are relative to
            (e.g. ``coco/train2017``).
        ann_file: the COCO json (e.g. ``coco/annotations/instances_train2017.json``).
        classes: category names to use, in label order (label ``i + 1`` is
            ``classes[i]``). ``None`` uses every category, in category-id order.
            Annotations of other categories are skipped (and counted).
        transforms: an :class:`~mrcnn.data.transforms.InstanceTransform` (training
            augmentation) or ``None``.
        include_crowd: keep crowd regions in the targets with ``iscrowd=1``. Off by
            default: the model has no notion of crowd (see
            :func:`~mrcnn.data.transforms.drop_crowd`).
        drop_images_without_annotations: leave out images with no usable non-crowd
            annotation (torchvision's and Detectron2's choice for training; they
            teach the model nothing but background). Counted in
            :attr:`skipped_images`.
        check_files: check at construction that every image file exists and is a
            regular file (one directory scan per folder), so a missing file or a named
            pipe stops the run at once instead of hours into training (or blocking it).
        check_sizes: also read every image's header at construction (about 36 us a file
            on a warm disk) and stop when its size (EXIF orientation applied) is not the
            json's, which otherwise stops the run when that image is first read. On in
            ``data=coco_format`` (a user's own json, where a resized image is a common
            mistake), off for COCO (118k files on every start).
        image_limits: the largest images accepted (:class:`~mrcnn.data.images.ImageLimits`,
            ``data.image_limits``), checked on the json's sizes when the dataset is
            built and on each file's header before it is decoded. ``None``: no limit
            but PIL's own.
        max_annotations_per_image: most instances in one item's target; an image
            with more keeps the largest (by area) and the rest are left out of its
            target, counted in :attr:`capped` and logged when the dataset is built.
            The evaluation ground truth keeps them all. ``None``: no cap.

    Attributes:
        class_names: names of labels 1..K.
        label_to_category_id: ``{label: json category id}``.
        category_id_to_label: the inverse map.
        image_ids: json image id of each item (a list made on access).
        image_sizes: ``(height, width)`` of each item, from the json (a list made on access).
        num_annotations: usable annotations (crowd included), over all images of the json.
        skipped: ``Counter`` of skipped annotations by reason.
        repaired: ``Counter`` of annotations that were kept after removing a
            broken part (a polygon with fewer than 3 points).
        skipped_images: ``Counter`` of left-out images by reason.
        capped: ``(annotations, images)`` left out of targets by ``max_annotations_per_image``.
        bbox_disagreements: annotations whose json bbox differs from their
            segmentation's extent beyond the tolerance (the json bbox is used for
            training and evaluation alike, as by torchvision's references and Detectron2).

    Storage (see the module docstring): one packed record per json image, ``(image
    entry, usable annotations in json order)``, and int64 arrays for the rest:
    ``_item_records [len]`` (the record of each item), ``_image_ids [len]``,
    ``_image_sizes [len, 2]`` and ``_gt_order [num_annotations]`` (the json position
    of each annotation in record order, which puts the ground truth back in json order).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        classes: Sequence[str] | None = None,
        transforms: InstanceTransform | None = None,
        include_crowd: bool = False,
        drop_images_without_annotations: bool = False,
        check_files: bool = True,
        check_sizes: bool = False,
        image_limits: ImageLimits | None = None,
        max_annotations_per_image: int | None = None,
    ):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.include_crowd = bool(include_crowd)
        self.image_limits = image_limits
        self.max_annotations_per_image = max_annotations_per_image
        self.capped = (0, 0)
        self.bbox_disagreements = 0
        self._xyxy_boxes = 0  # of those, the boxes that match their segmentation when read as [x1, y1, x2, y2]
        if self.image_dir.exists() and not self.image_dir.is_dir():
            raise NotADirectoryError(f"image folder {self.image_dir} (for {self.ann_file}) is a file: give the folder")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir} (for {self.ann_file})")
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()
        self.skipped_images: Counter[str] = Counter()
        self._examples: dict[str, list] = {}
        # The parsed json is millions of objects without reference cycles: collecting garbage while
        # they are made and checked would only cost time. They are all freed when the build returns.
        with gc_paused():
            data = load_coco_json(self.ann_file)
            self._categories = self._select_categories(_check_categories(data["categories"], self.ann_file), classes)
            self.class_names = [c["name"] for c in self._categories]
            self.label_to_category_id = {label: c["id"] for label, c in enumerate(self._categories, start=1)}
            self.category_id_to_label = {cid: label for label, cid in self.label_to_category_id.items()}
            self._all_category_ids = {c["id"] for c in data["categories"]}
            images = self._check_images(data["images"])
            annotations = self._clean_annotations(data["annotations"], images)
            self._check_box_format(len(annotations))
            per_image = self._group_by_image(images, annotations)
            kept = self._kept_images(per_image, annotations, drop_images_without_annotations)
            if not kept:
                raise ValueError(
                    f"COCO annotation file {self.ann_file} leaves no image to use: "
                    + (
                        f"none of its {len(images)} images has a usable non-crowd annotation"
                        if images
                        else "its 'images' list is empty"
                    )
                    + (f" ({self._describe_skips()})" if self.skipped else "")
                )
            self._check_image_limits([images[row] for row in kept])
            self._count_capped(per_image, annotations, kept)
            if check_files:
                self._check_files_exist([images[row]["file_name"] for row in kept])
            if check_sizes:
                self._check_sizes([images[row] for row in kept])
            self._store(images, annotations, per_image, kept)
            del data, images, annotations, per_image
        release_freed_memory()  # the parsed json's heap
        self._report()

    # ------------------------------------------------------------------ loading

    def _select_categories(self, categories: list[dict], classes: Sequence[str] | None) -> list[dict]:
        if classes is None:
            return sorted(categories, key=lambda c: c["id"])
        if isinstance(classes, str):
            raise ValueError(f"classes must be a list of names, got the string {classes!r}")
        if len(classes) == 0:
            raise ValueError(f"classes is empty: name at least one category of {self.ann_file} (or null for all)")
        by_name = {c["name"]: c for c in categories}
        unknown = [name for name in classes if name not in by_name]
        if unknown:
            raise ValueError(f"classes {unknown} are not categories of {self.ann_file}; it has {sorted(by_name)}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate names in classes {list(classes)}")
        return [by_name[name] for name in classes]

    def _check_images(self, images: list) -> list[dict]:
        seen = set()
        for image in images:
            missing = [
                k for k in ("id", "file_name", "height", "width") if not isinstance(image, dict) or k not in image
            ]
            if missing:
                raise ValueError(f"COCO annotation file {self.ann_file}: image entry {image!r} lacks {missing}")
            image_id = _json_id(image["id"])
            if image_id is None:
                raise ValueError(
                    f"COCO annotation file {self.ann_file}: image {_short(image['file_name'])} has id "
                    f"{_short(image['id'])}, not an integer within int64"
                )
            image["id"] = image_id
            if image["id"] in seen:
                raise ValueError(f"COCO annotation file {self.ann_file}: image id {image['id']} appears twice")
            if not isinstance(image["file_name"], str) or not image["file_name"]:
                raise ValueError(
                    f"COCO annotation file {self.ann_file}: image id {image['id']} has file_name "
                    f"{_short(image['file_name'])}, not a file name"
                )
            self._check_image_size(image)
            seen.add(image["id"])
        return images

    def _check_image_size(self, image: dict) -> None:
        """Raises unless the image's ``height`` and ``width`` are positive whole numbers (a string is not one)."""
        for key in ("height", "width"):
            value = image[key]
            whole = type(value) is int or (type(value) is float and value.is_integer())
            if not whole:
                raise ValueError(
                    f"COCO annotation file {self.ann_file}: image id {image['id']} ({image['file_name']}) has "
                    f"{key} {_short(value)} ({type(value).__name__}), not a whole number of pixels"
                )
        if not (image["height"] > 0 and image["width"] > 0):
            raise ValueError(
                f"COCO annotation file {self.ann_file}: image id {image['id']} ({image['file_name']}) has size "
                f"{image['width']}x{image['height']}"
            )

    def _check_image_limits(self, images: list[dict]) -> None:
        """Stops when an image's json size is above :attr:`image_limits`, naming the json, the image and the key."""
        if self.image_limits is None:
            return
        refused = []
        for image in images:
            problem = self.image_limits.problem(int(image["height"]), int(image["width"]))
            if problem:
                refused.append(f"image id {image['id']} ({image['file_name']}) {problem}")
        if refused:
            raise ValueError(
                f"COCO annotation file {self.ann_file}: {len(refused)} images are refused by their size, e.g.\n  "
                + "\n  ".join(refused[:3])
            )

    def _count_capped(self, per_image: list[list[int]], annotations: list[dict], kept: list[int]) -> None:
        """Counts the annotations that ``max_annotations_per_image`` leaves out of the items' targets."""
        cap = self.max_annotations_per_image
        if cap is None:
            return
        left_out, images, examples = 0, 0, []
        for row in kept:
            in_target = sum(self._in_targets(p, annotations[p], self.include_crowd) for p in per_image[row])
            if in_target > cap:
                left_out += in_target - cap
                images += 1
                if len(examples) < _EXAMPLES_PER_REASON:
                    examples.append(annotations[per_image[row][0]]["image_id"])
        self.capped = (left_out, images)
        self._capped_examples = examples

    def _skip(self, reason: str, annotation) -> None:
        self.skipped[reason] += 1
        examples = self._examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(annotation.get("id", "?") if isinstance(annotation, dict) else "?")

    def _clean_annotations(self, annotations: list, images: list[dict]) -> list[dict]:
        """The usable annotations, in json order; the others are counted in ``self.skipped``.

        Compressed RLE strings are decoded all at once after the other checks
        (:meth:`_drop_bad_compressed_rles`), and completed only then.
        """
        images = {image["id"]: image for image in images}
        kept = []
        compressed = []  # positions in kept of annotations whose segmentation is a compressed RLE string
        for annotation in annotations:
            if not isinstance(annotation, dict):
                self._skip("not a JSON object", annotation)
                continue
            image_id = annotation.get("image_id")
            if type(image_id) is not int:
                image_id = _json_id(image_id)  # a string, list or null names no image (and may not hash)
                if image_id is None:
                    self._skip("malformed image id", annotation)
                    continue
                annotation = dict(annotation, image_id=image_id)
            image = images.get(image_id)
            if image is None:
                self._skip("unknown image id", annotation)
                continue
            category_id = annotation.get("category_id")
            if type(category_id) is not int:
                category_id = _json_id(category_id)
                if category_id is None:
                    self._skip("malformed category id", annotation)
                    continue
                annotation = dict(annotation, category_id=category_id)
            if type(annotation.get("id")) is float and _json_id(annotation["id"]) is not None:  # 7.0: id 7
                annotation = dict(annotation, id=_json_id(annotation["id"]))
            if category_id not in self._all_category_ids:
                self._skip("unknown category id", annotation)
                continue
            if category_id not in self.category_id_to_label:
                self._skip("category not in classes", annotation)
                continue
            reason = _box_problem(annotation.get("bbox"), image["width"], image["height"]) or _field_problem(annotation)
            if reason is None:
                annotation, reason = self._clean_segmentation(annotation, image)
            if reason is not None:
                self._skip(reason, annotation)
                continue
            segmentation = annotation["segmentation"]
            if isinstance(segmentation, dict) and isinstance(segmentation["counts"], str):
                compressed.append(len(kept))
                kept.append(annotation)
            else:
                kept.append(self._complete(annotation, image))
        kept = self._drop_bad_compressed_rles(kept, compressed, images)
        self._collapsed = self._find_collapsed_boxes(kept, images)
        self._fix_annotation_ids(kept)
        return kept

    def _find_collapsed_boxes(self, kept: list[dict], images: dict) -> np.ndarray:
        """bool ``[len(kept)]``: the annotations whose box :meth:`__getitem__` would make empty; counted as skipped.

        A box of positive width in the json can still end with ``x2 == x1`` once it is made xyxy, clipped to the
        image and cast to float32, as ``__getitem__`` does: a width of 1e-7 px at x = 27 (float noise from a
        converter), or a box starting within a float32 step of the image's edge. Such a box crashed the augmentation
        in a loader worker without naming the file. It is left out of the targets; the evaluation ground truth keeps
        it, as pycocotools on the json does. One numpy pass over all boxes.
        """
        if not kept:
            return np.zeros(0, dtype=bool)
        boxes = np.array([a["bbox"] for a in kept], dtype=np.float64)
        sizes = np.array([(images[a["image_id"]]["width"], images[a["image_id"]]["height"]) for a in kept])
        boxes[:, 2:] += boxes[:, :2]
        boxes = np.clip(boxes, 0, np.tile(sizes, 2)).astype(np.float32)
        collapsed = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        for position in np.flatnonzero(collapsed).tolist():
            self._skip("box too thin (empty once clipped to the image in float32)", kept[position])
        return collapsed

    def _in_targets(self, position: int, annotation: dict, with_crowd: bool) -> bool:
        """Whether the annotation at ``position`` (json order) goes into its item's target (crowd: ``with_crowd``)."""
        return not self._collapsed[position] and (with_crowd or not annotation["iscrowd"])

    def _drop_bad_compressed_rles(self, kept: list[dict], compressed: list[int], images: dict) -> list[dict]:
        """``kept`` without the compressed RLEs whose runs do not add up to their image, the others completed.

        One numpy pass over all the strings (:func:`~mrcnn.data.rle.compressed_rle_totals`):
        decoding them one at a time took five times as long.
        """
        if not compressed:
            return kept
        totals = compressed_rle_totals([kept[p]["segmentation"]["counts"] for p in compressed])
        bad = set()
        valid = [p for p, total in zip(compressed, totals.tolist()) if total >= 0]
        # The masks' extents (x, y, w, h) in one C call over the strings that decode (no mask is decoded).
        extents = dict(zip(valid, mask_utils.toBbox([kept[p]["segmentation"] for p in valid]).tolist()))
        for position, total in zip(compressed, totals.tolist()):
            annotation = kept[position]
            image = images[annotation["image_id"]]
            if total != int(image["height"]) * int(image["width"]):
                reason = "malformed RLE segmentation" if total < 0 else "RLE runs do not add up to the image size"
                self._skip(reason, annotation)
                bad.add(position)
            else:
                kept[position] = self._complete(annotation, image, extents[position])
        return [annotation for position, annotation in enumerate(kept) if position not in bad]

    def _clean_segmentation(self, annotation: dict, image: dict) -> tuple[dict, str | None]:
        """(annotation, None) if its segmentation is usable (bad polygon parts removed), else (annotation, reason)."""
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, dict):
            # A compressed string's runs are decoded later, with all the others (_drop_bad_compressed_rles).
            height, width = int(image["height"]), int(image["width"])
            return annotation, rle_problem(segmentation, height, width, decode_strings=False)
        if not isinstance(segmentation, list) or not segmentation:
            return annotation, "no segmentation"
        if any(isinstance(part, dict) for part in segmentation):
            return self._merge_rle_list(annotation, image)
        reason = _polygon_problem(segmentation, max(image["height"], image["width"]))
        if reason is not None:
            return annotation, reason
        # pycocotools reads a 4-number polygon as a box: a polygon needs at least 3 points (6 numbers), and
        # x, y pairs (an odd count leaves a coordinate without its partner).
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            if any(len(p) % 2 for p in segmentation):
                return annotation, "polygon with an odd number of coordinates"
            return annotation, "polygon with fewer than 3 points"
        removed = {
            "polygon part with an odd number of coordinates removed"
            if len(part) % 2
            else "polygon part with fewer than 3 points removed"
            for part in segmentation
            if len(part) < 6 or len(part) % 2
        }
        self.repaired.update(removed)
        if len(polygons) < len(segmentation):
            annotation = dict(annotation, segmentation=polygons)
        return annotation, None

    def _merge_rle_list(self, annotation: dict, image: dict) -> tuple[dict, str | None]:
        """A segmentation given as a list of RLEs (which pycocotools reads: the union of their masks) as one
        compressed RLE, or the reason it is unusable; counted among the repairs."""
        segmentation = annotation["segmentation"]
        if not all(isinstance(part, dict) for part in segmentation):
            return annotation, "segmentation mixes polygons and RLEs"
        height, width = int(image["height"]), int(image["width"])
        for part in segmentation:
            reason = rle_problem(part, height, width)
            if reason is not None:
                return annotation, reason
        merged = mask_utils.merge([segmentation_to_rle(part, height, width) for part in segmentation])
        counts = merged["counts"].decode("ascii") if isinstance(merged["counts"], bytes) else merged["counts"]
        self.repaired["list of RLEs merged into one RLE"] += 1
        return dict(annotation, segmentation={"size": [height, width], "counts": counts}), None

    def _complete(self, annotation: dict, image: dict, extent: list[float] | None = None) -> dict:
        """The annotation with ``iscrowd`` and ``area`` as COCOeval needs them; counts a bbox far from its mask.

        ``iscrowd`` missing: 0. ``area`` missing, or outside ``(0, image pixels]`` (COCOeval's area ranges
        would count it in no range, or every object in "small"): the mask's pixel count, the repair counted.

        Args:
            extent: the segmentation's ``[x, y, w, h]`` extent when the caller has it (compressed RLEs).
        """
        height, width = int(image["height"]), int(image["width"])
        if extent is None:
            extent = _segmentation_extent(annotation["segmentation"], height, width)
        if _boxes_disagree(annotation["bbox"], extent):
            self.bbox_disagreements += 1
            examples = self._examples.setdefault(_BBOX_DISAGREES, [])
            if len(examples) < _EXAMPLES_PER_REASON:
                examples.append(annotation.get("id", "?"))
            x1, y1, x2, y2 = annotation["bbox"]
            if x2 > x1 and y2 > y1 and not _boxes_disagree([x1, y1, x2 - x1, y2 - y1], extent):
                self._xyxy_boxes += 1
        area = annotation.get("area")
        area_ok = area is not None and 0 < area <= height * width
        if "iscrowd" in annotation and area_ok:
            return annotation
        annotation = dict(annotation)
        annotation.setdefault("iscrowd", 0)
        if not area_ok:
            if area is not None:
                self.repaired["area outside (0, image pixels] replaced by the mask's area"] += 1
            rle = segmentation_to_rle(annotation["segmentation"], height, width)
            annotation["area"] = float(mask_utils.area(rle))
        return annotation

    def _check_box_format(self, usable: int) -> None:
        """Stops when most boxes are ``[x1, y1, x2, y2]``: they match their segmentation only when read that way.

        COCO's bbox is ``[x, y, width, height]``. Read as that, corner boxes (from a converter that wrote them, or a
        json written by hand) reach past their objects; training and the box AP would use them as they are, with no
        sign but the count of boxes that differ from their segmentation.
        """
        if self._xyxy_boxes and 2 * self._xyxy_boxes > usable:
            examples = ", ".join(str(e) for e in self._examples[_BBOX_DISAGREES])
            raise ValueError(
                f"COCO annotation file {self.ann_file}: {self._xyxy_boxes} of its {usable} usable annotations have a "
                f"bbox that matches its segmentation only when read as [x1, y1, x2, y2] (e.g. annotation id "
                f"{examples}); COCO's bbox is [x, y, width, height]: convert the file (width = x2 - x1, height = "
                "y2 - y1)"
            )

    def _fix_annotation_ids(self, annotations: list[dict]) -> None:
        # pycocotools reads annotation id 0 as "unmatched" and needs ids to be unique;
        # renumber (in the evaluator's ground truth only) if the json's ids are unusable.
        ids = [a.get("id") for a in annotations]
        if all(type(i) is int and 0 < i <= _MAX_ANNOTATION_ID for i in ids) and len(set(ids)) == len(ids):
            return
        log.warning(
            "%s: annotation ids are missing, duplicated, not positive integers or above 2**53 (pycocotools keeps "
            "them in float64); renumbering them 1..N",
            self.ann_file,
        )
        for i, annotation in enumerate(annotations):
            # The json's own id stays beside the new one: messages name the annotation as the json does.
            annotations[i] = dict(annotation, id=i + 1, json_id=annotation.get("id", "?"))

    def _group_by_image(self, images: list[dict], annotations: list[dict]) -> list[list[int]]:
        """Per json image (json order), the positions in ``annotations`` of its annotations (json order)."""
        row_of = {image["id"]: row for row, image in enumerate(images)}
        per_image: list[list[int]] = [[] for _ in images]
        for position, annotation in enumerate(annotations):
            per_image[row_of[annotation["image_id"]]].append(position)
        return per_image

    def _kept_images(
        self, per_image: list[list[int]], annotations: list[dict], drop_images_without_annotations: bool
    ) -> list[int]:
        """The json rows of the images served as items (all, or those with a usable non-crowd annotation)."""
        rows = range(len(per_image))
        if not drop_images_without_annotations:
            return list(rows)
        kept = [row for row in rows if any(self._in_targets(p, annotations[p], False) for p in per_image[row])]
        if len(kept) < len(per_image):
            self.skipped_images["no usable non-crowd annotation"] = len(per_image) - len(kept)
        return kept

    def _store(self, images: list[dict], annotations: list[dict], per_image: list[list[int]], kept: list[int]) -> None:
        """Packs one record per json image and the items' ids and sizes into arrays (see the class docstring).

        Every image stays in the records, also one left out of the items: the
        evaluation ground truth lists them all.
        """
        self._records = PackedRecords(
            (image, [annotations[p] for p in positions]) for image, positions in zip(images, per_image)
        )
        self._gt_order = np.fromiter(
            (p for positions in per_image for p in positions), dtype=np.int64, count=len(annotations)
        )
        self._item_records = np.asarray(kept, dtype=np.int64)
        self._image_ids = np.asarray([images[row]["id"] for row in kept], dtype=np.int64)
        sizes = [(int(images[row]["height"]), int(images[row]["width"])) for row in kept]
        self._image_sizes = np.asarray(sizes, dtype=np.int64).reshape(len(kept), 2)
        self.num_annotations = len(annotations)
        # What training learns from: the non-crowd ones (crowd regions, even in the targets, are kept out of it).
        self.num_trainable_annotations = sum(self._in_targets(p, a, False) for p, a in enumerate(annotations))
        # bool [num_annotations], by number (record order): annotations left out of the targets (_find_collapsed_boxes).
        self._collapsed = self._collapsed[self._gt_order]
        per_record = np.fromiter((len(positions) for positions in per_image), dtype=np.int64, count=len(per_image))
        # int64 [records + 1]: record r holds the annotations numbered _record_starts[r] up to _record_starts[r + 1].
        self._record_starts = np.concatenate([[0], np.cumsum(per_record)])
        # uint8 [num_annotations], by that number: 1 once an annotation's mask was found empty (see
        # report_read_skips). In shared memory, so that DataLoader workers' marks reach this process.
        self._empty_masks = torch.zeros(len(annotations), dtype=torch.uint8).share_memory_()
        self._reported_empty = np.zeros(len(annotations), dtype=bool)  # those already counted in skipped

    def _check_files_exist(self, file_names: list[str]) -> None:
        """Stops unless every image file exists and is a regular file (a named pipe would block its reader).

        One ``os.scandir`` per folder: its entries know their type without a ``stat`` per file.
        """
        listings: dict[Path, dict[str, bool]] = {}
        missing, irregular = [], []
        for file_name in file_names:
            path = self.image_dir / file_name
            folder = path.parent
            if folder not in listings:
                with contextlib.suppress(OSError), os.scandir(folder) as entries:
                    listings[folder] = {entry.name: entry.is_file() for entry in entries}
                listings.setdefault(folder, {})
            regular = listings[folder].get(path.name)
            if regular is None:
                missing.append(str(path))
            elif not regular and not os.path.exists(path):  # a link to nothing (its target moved or was deleted)
                missing.append(f"{path} (a symbolic link to {os.readlink(path)}, which does not exist)")
            elif not regular:
                irregular.append(path)
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(file_names)} image files listed in {self.ann_file} are missing, "
                f"e.g. {missing[:3]}"
            )
        if irregular:
            examples = [f"{path} ({file_kind(os.stat(path).st_mode)})" for path in irregular[:3]]
            raise ValueError(
                f"{len(irregular)} of {len(file_names)} image files listed in {self.ann_file} are not regular files, "
                f"e.g. {examples}"
            )

    def _check_sizes(self, entries: list[dict]) -> None:
        """Stops when an image file's size (from its header, EXIF orientation applied) is not its json entry's."""
        wrong = []
        for entry in entries:
            path = self.image_dir / entry["file_name"]
            expected = (int(entry["height"]), int(entry["width"]))
            found = read_image_size(path, self.image_limits)
            if found != expected:
                wrong.append((path, found, expected))
        if wrong:
            path, found, expected = wrong[0]
            raise ValueError(
                f"{len(wrong)} of {len(entries)} images in {self.ann_file} are not the size it gives them; the first: "
                + size_mismatch_message(path, found, expected, self.ann_file)
            )

    def _report(self) -> None:
        self.skip_report = self._describe_skips()
        if self.skip_report:
            log.warning("%s: %s", self.ann_file, self.skip_report)
        log.info(
            "%s: %d images, %d annotations, %d classes",
            self.ann_file,
            len(self),
            self.num_annotations,
            self.num_classes,
        )

    def _describe_skips(self) -> str:
        """The skip summary: counts by reason, with example annotation ids; ``""`` when nothing was skipped."""

        def describe(counter: Counter, examples: dict | None = None) -> str:
            parts = []
            for reason, count in counter.most_common():
                part = f"{count} {reason}"
                if examples and examples.get(reason):
                    part += f" (e.g. annotation id {', '.join(str(e) for e in examples[reason])})"
                parts.append(part)
            return ", ".join(parts)

        messages = []
        if self.skipped:
            messages.append(
                f"skipped {sum(self.skipped.values())} annotations: {describe(self.skipped, self._examples)}"
            )
        if self.repaired:
            messages.append(f"repaired {sum(self.repaired.values())} annotations: {describe(self.repaired)}")
        if self.bbox_disagreements:
            examples = ", ".join(str(e) for e in self._examples[_BBOX_DISAGREES])
            messages.append(
                f"{self.bbox_disagreements} annotations have a bbox that differs from their segmentation's extent by "
                f"more than max({BBOX_TOLERANCE_PIXELS:g} px, {BBOX_TOLERANCE_FRACTION:.0%} of its size) (e.g. "
                f"annotation id {examples}); the json bbox is used for training and evaluation alike"
            )
        left_out, images = self.capped
        if left_out:
            examples = ", ".join(str(e) for e in self._capped_examples)
            messages.append(
                f"left {left_out} annotations of {images} images out of the targets: above "
                f"max_annotations_per_image={self.max_annotations_per_image} (data.max_annotations_per_image) the "
                f"largest are kept (e.g. image id {examples}); the evaluation ground truth keeps them all"
            )
        if self.skipped_images:
            messages.append(f"left out {sum(self.skipped_images.values())} images: {describe(self.skipped_images)}")
        return "; ".join(messages)

    def report_read_skips(self) -> str:
        """Counts and logs the annotations found unusable while reading items, since the last call.

        A polygon can rasterise to no pixel at all (collinear points, or a sliver
        between pixel centres) while its bbox is fine. That shows only when its mask is
        decoded, in :meth:`__getitem__`, usually in a DataLoader worker: rasterising
        every polygon when the json is loaded would about double the build at COCO's
        size (25 us per polygon here, 20 s for 860k). ``__getitem__`` leaves such an
        annotation out of the target and marks it in a flag array in shared memory;
        this adds the newly marked ones to :attr:`skipped` (reason ``"empty mask"``,
        with example ids) and :attr:`skip_report`, and logs one line naming the json.
        Each annotation counts once, however many epochs read it.
        :class:`~mrcnn.data.datamodule.InstanceDataModule` calls it at the end of every
        pass over a loader and at teardown.

        The evaluation ground truth (:attr:`coco_gt`) keeps such an annotation, as
        pycocotools on the json file does.

        Returns:
            The line logged, or ``""`` when no new annotation was found.
        """
        new = np.flatnonzero(self._empty_masks.numpy().astype(bool) & ~self._reported_empty)
        if new.size == 0:
            return ""
        self._reported_empty[new] = True
        reason = "empty mask"
        self.skipped[reason] += new.size
        examples = self._examples.setdefault(reason, [])
        for number in new[: _EXAMPLES_PER_REASON - len(examples)].tolist():
            annotation = self._annotation(number)
            examples.append(annotation.get("json_id", annotation.get("id", "?")))
        self.skip_report = self._describe_skips()
        examples = ", ".join(str(e) for e in self._examples[reason])
        message = (
            f"{self.ann_file}: {new.size} more annotations have an empty mask (their segmentation covers no pixel) "
            f"and were left out of the targets (e.g. annotation id {examples}); now {self.skip_report}"
        )
        log.warning("%s", message)
        return message

    def _annotation(self, number: int) -> dict:
        """The annotation numbered ``number`` in record order (see :meth:`_store`)."""
        row = int(np.searchsorted(self._record_starts, number, side="right")) - 1
        return self._records[row][1][number - int(self._record_starts[row])]

    # ---------------------------------------------------------------- accessors

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K (labels run 1..K)."""
        return len(self.class_names)

    @property
    def image_ids(self) -> list[int]:
        """The json image id of each item."""
        return self._image_ids.tolist()

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of each item, from the json."""
        return [(height, width) for height, width in self._image_sizes.tolist()]

    @cached_property
    def coco_gt(self) -> pycocotools.coco.COCO:
        """The ground truth for evaluation: the json's images, usable annotations (crowd included) and categories.

        A pycocotools ``COCO`` whose dataset and index are built from the packed
        records on first use (by ``CocoEvaluator.compute``), once per process: a
        process that only trains never builds it, and the DataLoader workers forked
        before the first evaluation do not inherit it. For a clean json whose
        categories are all used, evaluating against it gives exactly what
        pycocotools gives on the json file itself.
        """
        return LazyCoco(self._ground_truth)

    def _ground_truth(self) -> dict:
        """The ground truth's COCO dataset dict, annotations in json order, all objects fresh.

        Fresh objects matter: COCOeval writes into the annotation dicts it evaluates
        (``ignore``, polygons replaced by RLE).
        """
        images, grouped = [], []
        for image, image_annotations in self._records:
            images.append(image)
            grouped.extend(image_annotations)
        in_json_order: list = [None] * len(grouped)
        for annotation, position in zip(grouped, self._gt_order.tolist()):
            in_json_order[position] = annotation
        return {"images": images, "annotations": in_json_order, "categories": [dict(c) for c in self._categories]}

    def __len__(self) -> int:
        return len(self._item_records)

    def record(self, index: int) -> tuple[dict, list[dict]]:
        """Item ``index``'s json image entry and usable annotations (json order, crowd included), as fresh objects."""
        return self._records[int(self._item_records[index])]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        """Returns ``(image float32 [3, H, W], target)`` following the data contract.

        An annotation whose mask is empty is left out of the target and marked for
        :meth:`report_read_skips`.
        """
        row = int(self._item_records[index])
        image_info, annotations = self._records[row]
        path = self.image_dir / image_info["file_name"]
        image = read_image(path, self.image_limits)
        height, width = int(image_info["height"]), int(image_info["width"])
        if image.shape[:2] != (height, width):
            raise ValueError(size_mismatch_message(path, image.shape[:2], (height, width), self.ann_file))
        numbers = np.arange(self._record_starts[row], self._record_starts[row + 1])
        # What goes into the target, as _in_targets counts it: not a collapsed box, not a crowd region unless asked.
        keep = ~self._collapsed[numbers]
        if not self.include_crowd:
            keep &= np.array([not a.get("iscrowd", 0) for a in annotations], dtype=bool)
        if not keep.all():
            annotations = [a for a, kept in zip(annotations, keep) if kept]
            numbers = numbers[keep]
        cap = self.max_annotations_per_image
        if cap is not None and len(annotations) > cap:
            # The largest objects, in json order: dense masks cost H x W bytes each however small the object.
            largest = np.sort(np.argsort([-a["area"] for a in annotations], kind="stable")[:cap])
            annotations = [annotations[i] for i in largest]
            numbers = numbers[largest]
        masks = decode_masks([a["segmentation"] for a in annotations], height, width)
        empty = ~masks.any(axis=(1, 2))
        if empty.any():
            # Idempotent writes of 1, so workers need no lock; counted by report_read_skips in the main process.
            self._empty_masks[torch.from_numpy(numbers[empty])] = 1
            annotations = [a for a, is_empty in zip(annotations, empty) if not is_empty]
            masks = masks[~empty]
        fields = {
            "labels": np.array([self.category_id_to_label[a["category_id"]] for a in annotations], dtype=np.int64),
            "iscrowd": np.array([int(bool(a.get("iscrowd", 0))) for a in annotations], dtype=np.int64),
        }
        # The json's boxes, xyxy and clipped to the image: the boxes the evaluation scores against too.
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        image, masks, boxes, fields = transform_instances(self.transforms, image, masks, fields, boxes, index=index)
        return to_sample(
            image, masks, fields["labels"], image_id=image_info["id"], boxes=boxes, iscrowd=fields["iscrowd"]
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ann_file}, {len(self)} images, {self.num_classes} classes)"


class LazyCoco(pycocotools.coco.COCO):
    """A pycocotools ``COCO`` whose dataset and index are built on first use.

    Code that takes a ``COCO`` (``CocoEvaluator``, ``COCOeval``, ``loadRes``) uses it
    unchanged: reading ``dataset`` or one of the index dicts (``anns``, ``imgs``,
    ``cats``, ``imgToAnns``, ``catToImgs``) builds both, once.

    Args:
        build_dataset: returns the COCO dataset dict (``images``, ``annotations``, ``categories``).
    """

    _BUILT_ON_FIRST_USE = ("dataset", "anns", "imgs", "cats", "imgToAnns", "catToImgs")

    def __init__(self, build_dataset: Callable[[], dict]):
        # Not COCO.__init__, which would build the index now: the attributes appear on first use.
        self._build_dataset = build_dataset

    def __getattr__(self, name: str):
        # Python calls this only for attributes not set: before the build, those of _BUILT_ON_FIRST_USE.
        if name not in LazyCoco._BUILT_ON_FIRST_USE or "_build_dataset" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self.dataset = self._build_dataset()
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            self.createIndex()
        return getattr(self, name)


def segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """One COCO segmentation (polygon list, compressed or uncompressed RLE) as one compressed RLE."""
    if isinstance(segmentation, list):  # polygons: one RLE per part, merged into one mask
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE (COCO's crowd regions)
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def decode_masks(segmentations: list, height: int, width: int) -> np.ndarray:
    """COCO segmentations to uint8 masks ``[N, H, W]``.

    Every segmentation becomes one RLE and all are decoded in a single pycocotools
    call (C code, one pass per mask): no mask is decoded twice.
    """
    if not segmentations:
        return np.zeros((0, height, width), dtype=np.uint8)
    rles = [segmentation_to_rle(s, height, width) for s in segmentations]
    # decode gives Fortran-ordered [H, W, N]; one copy makes it C-ordered [N, H, W].
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))


_BBOX_DISAGREES = "bbox disagrees with its segmentation"


def _segmentation_extent(segmentation: list | dict, height: int, width: int) -> list[float]:
    """``[x, y, w, h]`` of a checked segmentation: a polygon's coordinate extent, an RLE's mask extent."""
    if isinstance(segmentation, list):
        xs = [min(part[0::2]) for part in segmentation] + [max(part[0::2]) for part in segmentation]
        ys = [min(part[1::2]) for part in segmentation] + [max(part[1::2]) for part in segmentation]
        return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return mask_utils.toBbox(segmentation_to_rle(segmentation, height, width)).tolist()


def _boxes_disagree(bbox: list, extent: list) -> bool:
    """Whether two xywh boxes differ on a side by more than the tolerance (see ``BBOX_TOLERANCE_PIXELS``)."""
    tolerance = max(BBOX_TOLERANCE_PIXELS, BBOX_TOLERANCE_FRACTION * max(bbox[2], bbox[3], extent[2], extent[3]))
    x, y, w, h = bbox
    ex, ey, ew, eh = extent
    return max(abs(x - ex), abs(y - ey), abs(x + w - ex - ew), abs(y + h - ey - eh)) > tolerance


def _box_problem(bbox, width: int, height: int) -> str | None:
    """Why an xywh box is unusable, or ``None`` if it is fine."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return "missing or malformed bbox"
    try:
        finite = math.isfinite(sum(bbox))  # NaN compares false with everything: it would pass the checks below
    except OverflowError:  # an integer beyond a float's range (json reads a 309-digit literal exactly)
        finite = False
    if not finite:
        return "non-finite bbox"
    x, y, w, h = bbox
    if not (w > 0 and h > 0):
        return "zero-area box"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "box outside the image"
    return None


def _polygon_problem(segmentation: list, side: int) -> str | None:
    """Why a polygon segmentation (a list of parts) cannot be rasterised safely, or ``None``.

    pycocotools' rasteriser allocates in proportion to the polygon's perimeter: a
    NaN or infinite coordinate (cast to a huge int in C) or one millions of pixels
    away exhausts memory. Two C-level calls per part, as this runs for every
    annotation: ``set(map(type, part))`` (per-number ``isinstance`` calls were a third
    of the build) and ``math.hypot(*part)``, the part's Euclidean norm, which is NaN
    or infinite if any coordinate is and bounds every coordinate's magnitude.

    Args:
        segmentation: the annotation's ``segmentation`` list.
        side: the image's longer side in pixels.

    Returns:
        ``"malformed polygon"`` (a part is not a list of numbers), ``"non-finite
        polygon coordinate"``, or ``"polygon far outside the image"`` (some coordinate
        is more than two image sides from the origin, and the norm bounds all of them
        by ``2 * side * sqrt(len(part))``), else ``None``.
    """
    for part in segmentation:
        if not isinstance(part, list) or not set(map(type, part)) <= _NUMBER_TYPES:
            return "malformed polygon"
        try:
            norm = math.hypot(*part)
        except OverflowError:  # an integer beyond a float's range
            norm = math.inf
        if not math.isfinite(norm):
            return "non-finite polygon coordinate"
        # Coordinates all within two sides of the origin have a norm of at most 2 * side * sqrt(len(part)).
        if norm * norm > 4 * side * side * len(part):
            return "polygon far outside the image"
    return None


def _field_problem(annotation: dict) -> str | None:
    """Why an annotation's ``area`` or ``iscrowd`` is unusable (``COCOeval`` compares and casts them), or ``None``.

    Either may be missing (:meth:`CocoDataset._complete` fills it in).
    """
    area = annotation.get("area", 0)
    # NaN compares unequal to itself. An area out of range (0, negative, infinite, above the image) is a
    # number that _complete replaces by the mask's.
    if type(area) not in _AREA_TYPES or area != area:
        return "malformed or NaN area"
    if annotation.get("iscrowd", 0) not in (0, 1):
        # A string "0" would be truthy: read as crowd here, as 0 by COCOeval.
        return "malformed iscrowd"
    return None
