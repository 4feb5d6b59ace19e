"""Instance segmentation data in COCO json format (COCO 2017 itself or any user dataset).

The json is read and checked once, when the dataset is built: every annotation
that cannot be used (unknown image or category, a zero-area or out-of-image box,
a polygon with fewer than 3 points, a malformed segmentation) is skipped, counted
by reason in :attr:`CocoDataset.skipped` and reported in one log line, never
dropped silently. Problems that only show when an image is read (a corrupt or
truncated file, a size different from the json's) raise with the file's path.

Labels: the json's category ids (COCO's 1..90 with gaps) map to contiguous labels
1..K in category-id order (or in the order of ``classes``);
:attr:`CocoDataset.label_to_category_id` maps them back for evaluation.

Crowd regions (``iscrowd=1``) are left out of the targets by default, as the model
must not train on them. Evaluation uses :attr:`CocoDataset.coco_gt`, the json's
own ground truth, where pycocotools treats them as ignore regions.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import pycocotools.coco
import pycocotools.mask as mask_utils
import torch
from PIL import Image

from mrcnn.data.transforms import InstanceTransform, to_sample, transform_instances

__all__ = ["CocoDataset", "decode_masks", "load_coco_json", "read_category_names", "read_rgb_image", "segmentation_to_rle"]

log = logging.getLogger(__name__)

# How many example annotation ids each skip reason names in the log line.
_EXAMPLES_PER_REASON = 3


def load_coco_json(path: str | os.PathLike) -> dict:
    """Reads a COCO json file and checks its top-level structure.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, not valid JSON, or lacks ``images``,
            ``annotations`` or ``categories`` lists (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"COCO annotation file {path} is empty")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO annotation file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"COCO annotation file {path} must hold a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"COCO annotation file {path} has no {key!r} list (keys: {sorted(data)})")
    if not data["categories"]:
        raise ValueError(f"COCO annotation file {path} declares no categories")
    return data


def read_category_names(path: str | os.PathLike) -> list[str]:
    """Category names of a COCO json in category-id order (label ``i + 1`` is ``names[i]``)."""
    data = load_coco_json(path)
    categories = sorted(_check_categories(data["categories"], path), key=lambda c: c["id"])
    return [c["name"] for c in categories]


def read_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file to uint8 ``[H, W, 3]`` RGB.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded (corrupt, truncated, not an image), naming it.
    """
    try:
        with Image.open(path) as image:
            # convert() forces the full decode, so truncation shows here, not later.
            return np.array(image.convert("RGB"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {path}") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three on broken files
        raise ValueError(f"cannot read image {path}: {err}") from err


def _check_categories(categories: list, path) -> list[dict]:
    ids, names = set(), set()
    for category in categories:
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise ValueError(f"COCO annotation file {path}: every category needs an 'id' and a 'name', got {category!r}")
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
        check_files: check at construction that every image file exists (one
            directory listing per folder), so a missing file stops the run at once
            instead of hours into training.

    Attributes:
        class_names: names of labels 1..K.
        label_to_category_id: ``{label: json category id}``.
        category_id_to_label: the inverse map.
        image_ids: json image id of each item.
        image_sizes: ``(height, width)`` of each item, from the json.
        skipped: ``Counter`` of skipped annotations by reason.
        repaired: ``Counter`` of annotations that were kept after removing a
            broken part (a polygon with fewer than 3 points).
        skipped_images: ``Counter`` of left-out images by reason.
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
    ):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.include_crowd = bool(include_crowd)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir} (for {self.ann_file})")
        data = load_coco_json(self.ann_file)

        self._categories = self._select_categories(_check_categories(data["categories"], self.ann_file), classes)
        self.class_names = [c["name"] for c in self._categories]
        self.label_to_category_id = {label: c["id"] for label, c in enumerate(self._categories, start=1)}
        self.category_id_to_label = {cid: label for label, cid in self.label_to_category_id.items()}
        self._all_category_ids = {c["id"] for c in data["categories"]}

        self._images = self._check_images(data["images"])
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()
        self.skipped_images: Counter[str] = Counter()
        self._examples: dict[str, list] = {}
        annotations = self._clean_annotations(data["annotations"])

        # Per image, its usable annotations in json order.
        by_image: dict[int, list[dict]] = {image["id"]: [] for image in self._images}
        for annotation in annotations:
            by_image[annotation["image_id"]].append(annotation)
        images = self._images
        if drop_images_without_annotations:
            images = [im for im in images if any(not a.get("iscrowd", 0) for a in by_image[im["id"]])]
            if len(images) < len(self._images):
                self.skipped_images["no usable non-crowd annotation"] = len(self._images) - len(images)
        self._items = [(image, by_image[image["id"]]) for image in images]
        self.image_ids = [image["id"] for image, _ in self._items]
        self.image_sizes = [(int(image["height"]), int(image["width"])) for image, _ in self._items]
        # What the evaluator's ground truth is built from (all images: evaluation keeps empty ones).
        self._gt_dataset = {
            "images": self._images,
            "annotations": annotations,
            "categories": self._categories,
        }
        if check_files:
            self._check_files_exist()
        self._report()

    # ------------------------------------------------------------------ loading

    def _select_categories(self, categories: list[dict], classes: Sequence[str] | None) -> list[dict]:
        if classes is None:
            return sorted(categories, key=lambda c: c["id"])
        if isinstance(classes, str):
            raise ValueError(f"classes must be a list of names, got the string {classes!r}")
        by_name = {c["name"]: c for c in categories}
        unknown = [name for name in classes if name not in by_name]
        if unknown:
            raise ValueError(
                f"classes {unknown} are not categories of {self.ann_file}; it has {sorted(by_name)}"
            )
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate names in classes {list(classes)}")
        return [by_name[name] for name in classes]

    def _check_images(self, images: list) -> list[dict]:
        seen = set()
        for image in images:
            missing = [k for k in ("id", "file_name", "height", "width") if not isinstance(image, dict) or k not in image]
            if missing:
                raise ValueError(f"COCO annotation file {self.ann_file}: image entry {image!r} lacks {missing}")
            if image["id"] in seen:
                raise ValueError(f"COCO annotation file {self.ann_file}: image id {image['id']} appears twice")
            if not (image["height"] > 0 and image["width"] > 0):
                raise ValueError(
                    f"COCO annotation file {self.ann_file}: image {image['file_name']} has size "
                    f"{image['width']}x{image['height']}"
                )
            seen.add(image["id"])
        return images

    def _skip(self, reason: str, annotation) -> None:
        self.skipped[reason] += 1
        examples = self._examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(annotation.get("id", "?") if isinstance(annotation, dict) else "?")

    def _clean_annotations(self, annotations: list) -> list[dict]:
        """The usable annotations; the others are counted in ``self.skipped``."""
        images = {image["id"]: image for image in self._images}
        kept = []
        for annotation in annotations:
            if not isinstance(annotation, dict):
                self._skip("not a JSON object", annotation)
                continue
            image = images.get(annotation.get("image_id"))
            if image is None:
                self._skip("unknown image id", annotation)
                continue
            category_id = annotation.get("category_id")
            if category_id not in self._all_category_ids:
                self._skip("unknown category id", annotation)
                continue
            if category_id not in self.category_id_to_label:
                self._skip("category not in classes", annotation)
                continue
            reason = _box_problem(annotation.get("bbox"), image["width"], image["height"])
            if reason is None:
                annotation, reason = self._clean_segmentation(annotation, image)
            if reason is not None:
                self._skip(reason, annotation)
                continue
            kept.append(self._complete(annotation, image))
        self._fix_annotation_ids(kept)
        return kept

    def _clean_segmentation(self, annotation: dict, image: dict) -> tuple[dict, str | None]:
        """(annotation, None) if its segmentation is usable (bad polygon parts removed), else (annotation, reason)."""
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, dict):
            if "counts" not in segmentation or "size" not in segmentation:
                return annotation, "malformed RLE segmentation"
            if [int(s) for s in segmentation["size"]] != [int(image["height"]), int(image["width"])]:
                return annotation, "RLE size differs from the image size"
            return annotation, None
        if not isinstance(segmentation, list) or not segmentation:
            return annotation, "no segmentation"
        if not all(isinstance(p, list) and all(isinstance(x, (int, float)) for x in p) for p in segmentation):
            return annotation, "malformed polygon"
        # pycocotools reads a 4-number polygon as a box: a polygon needs at least 3 points (6 numbers).
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return annotation, "polygon with fewer than 3 points"
        if len(polygons) < len(segmentation):
            self.repaired["polygon part with fewer than 3 points removed"] += 1
            annotation = dict(annotation, segmentation=polygons)
        return annotation, None

    def _complete(self, annotation: dict, image: dict) -> dict:
        """Fills in ``iscrowd`` (0) and ``area`` (mask area) when the json leaves them out; COCOeval needs both."""
        if "iscrowd" in annotation and "area" in annotation:
            return annotation
        annotation = dict(annotation)
        annotation.setdefault("iscrowd", 0)
        if "area" not in annotation:
            rle = segmentation_to_rle(annotation["segmentation"], int(image["height"]), int(image["width"]))
            annotation["area"] = float(mask_utils.area(rle))
        return annotation

    def _fix_annotation_ids(self, annotations: list[dict]) -> None:
        # pycocotools reads annotation id 0 as "unmatched" and needs ids to be unique;
        # renumber (in the evaluator's ground truth only) if the json's ids are unusable.
        ids = [a.get("id") for a in annotations]
        if all(isinstance(i, int) and i > 0 for i in ids) and len(set(ids)) == len(ids):
            return
        log.warning("%s: annotation ids are missing, duplicated or not positive; renumbering them 1..N", self.ann_file)
        for i, annotation in enumerate(annotations):
            annotations[i] = dict(annotation, id=i + 1)

    def _check_files_exist(self) -> None:
        listings: dict[Path, set[str]] = {}
        missing = []
        for image, _ in self._items:
            path = self.image_dir / image["file_name"]
            folder = path.parent
            if folder not in listings:
                listings[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
            if path.name not in listings[folder]:
                missing.append(str(path))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self._items)} image files listed in {self.ann_file} are missing, "
                f"e.g. {missing[:3]}"
            )

    def _report(self) -> None:
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
            messages.append(f"skipped {sum(self.skipped.values())} annotations: {describe(self.skipped, self._examples)}")
        if self.repaired:
            messages.append(f"repaired {sum(self.repaired.values())} annotations: {describe(self.repaired)}")
        if self.skipped_images:
            messages.append(f"left out {sum(self.skipped_images.values())} images: {describe(self.skipped_images)}")
        self.skip_report = "; ".join(messages)
        if messages:
            log.warning("%s: %s", self.ann_file, self.skip_report)
        log.info(
            "%s: %d images, %d annotations, %d classes",
            self.ann_file, len(self), len(self._gt_dataset["annotations"]), self.num_classes,
        )

    # ---------------------------------------------------------------- accessors

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K (labels run 1..K)."""
        return len(self.class_names)

    @cached_property
    def coco_gt(self) -> pycocotools.coco.COCO:
        """The ground truth for evaluation: the json's images, usable annotations (crowd included) and categories.

        Built on first use (indexing a large json takes seconds). For a clean json
        whose categories are all used, evaluating against it gives exactly what
        pycocotools gives on the json file itself.
        """
        coco = pycocotools.coco.COCO()
        # Shallow copies: COCOeval writes into the annotation dicts it evaluates
        # (``ignore``, polygons replaced by RLE), and these are the dataset's own.
        coco.dataset = dict(self._gt_dataset, annotations=[dict(a) for a in self._gt_dataset["annotations"]])
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
            coco.createIndex()
        return coco

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        """Returns ``(image float32 [3, H, W], target)`` following the data contract."""
        image_info, annotations = self._items[index]
        path = self.image_dir / image_info["file_name"]
        image = read_rgb_image(path)
        height, width = int(image_info["height"]), int(image_info["width"])
        if image.shape[:2] != (height, width):
            raise ValueError(
                f"image {path} is {image.shape[1]}x{image.shape[0]} (WxH) but {self.ann_file} says {width}x{height}"
            )
        if not self.include_crowd:
            annotations = [a for a in annotations if not a.get("iscrowd", 0)]
        masks = decode_masks([a["segmentation"] for a in annotations], height, width)
        fields = {
            "labels": np.array([self.category_id_to_label[a["category_id"]] for a in annotations], dtype=np.int64),
            "iscrowd": np.array([int(bool(a.get("iscrowd", 0))) for a in annotations], dtype=np.int64),
        }
        image, masks, boxes, fields = transform_instances(self.transforms, image, masks, fields)
        return to_sample(image, masks, fields["labels"], image_id=image_info["id"], boxes=boxes, iscrowd=fields["iscrowd"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ann_file}, {len(self)} images, {self.num_classes} classes)"


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


def _box_problem(bbox, width: int, height: int) -> str | None:
    """Why an xywh box is unusable, or ``None`` if it is fine."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return "missing or malformed bbox"
    x, y, w, h = bbox
    if not (w > 0 and h > 0):
        return "zero-area box"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "box outside the image"
    return None
