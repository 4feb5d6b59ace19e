"""Cityscapes fine instance annotations (``gtFine_instanceIds.png``) for the 8 instance classes.

Layout (the official download)::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png

An instanceIds file is a 16-bit PNG: a pixel of an individually annotated object
holds ``labelId * 1000 + k`` (k numbers the instances of that class in the image,
not contiguously); a pixel of a group of objects of an instance class ("crowd",
e.g. a crowd of people) holds the plain ``labelId`` (< 1000); other pixels hold
the labelId of their stuff class. Label ids follow cityscapesScripts'
``helpers/labels.py``: person 24, rider 25, car 26, truck 27, bus 28, caravan 29,
trailer 30, train 31, motorcycle 32, bicycle 33. Caravan and trailer have
instances but are ignored in the official evaluation; like Detectron2 we leave
them out (their pixels count as background), which leaves the 8 evaluated classes.

Memory: the file pairs are packed into one byte buffer and the sizes into an int
array (:class:`~mrcnn.data.records.PackedRecords`, as for COCO), so DataLoader
workers read them without copying them; ``image_files``, ``instance_files``,
``image_sizes`` and ``image_ids`` are lists made on access.

Bad input: the files must be regular files (a named pipe would block the reader);
instanceIds files must be 16-bit PNGs (an 8-bit copy lost the instance ids, a 32-bit
TIFF renamed ``.png`` holds values beyond the 16-bit label table); a value whose
labelId is not in Cityscapes' label table (ids 0..33) is left out of the target
and counted (:meth:`CityscapesDataset.report_read_skips`), and the official
evaluation reads it as unlabeled (void) instead of failing on it. An image with
more instances than ``max_annotations_per_image`` keeps the largest, counted the
same way.

Metrics: validation reports both, labelled, on the same detections: COCO-style
mask AP (pycocotools, IoU 0.5:0.95, crowd regions as ignore regions) over these 8
classes, and the official Cityscapes instance AP (``evalInstanceLevelSemanticLabeling``,
which among other differences ignores regions under 100 pixels), computed by
cityscapesscripts itself from the ``instance_files`` (:mod:`mrcnn.cityscapes_eval`).
Numbers from the two do not compare.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mrcnn.data.images import ImageLimits, check_regular_file, read_image, size_mismatch_message
from mrcnn.data.records import PackedRecords
from mrcnn.data.transforms import InstanceTransform, to_sample, transform_instances

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_LABEL_IDS", "CityscapesDataset", "read_instance_ids"]

log = logging.getLogger(__name__)

# The 8 evaluated instance classes and their Cityscapes labelIds (cityscapesScripts' label table).
CITYSCAPES_LABEL_IDS: dict[str, int] = {
    "person": 24,
    "rider": 25,
    "car": 26,
    "truck": 27,
    "bus": 28,
    "train": 31,
    "motorcycle": 32,
    "bicycle": 33,
}
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(CITYSCAPES_LABEL_IDS)

_IMAGE_SUFFIX = "_leftImg8bit.png"
_INSTANCE_SUFFIX = "_gtFine_instanceIds.png"
# PIL modes of a 16-bit single-channel PNG (PIL opens some as mode I, which holds 32-bit values in other formats).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")
# The largest labelId of Cityscapes' label table (cityscapesScripts' helpers/labels.py: ids 0..33, and -1
# for the license plate, which never appears in instanceIds files).
MAX_LABEL_ID = 33


def read_instance_ids(path: str | os.PathLike) -> np.ndarray:
    """Reads a ``*_gtFine_instanceIds.png`` as int32 ``[H, W]``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded, or is not 16-bit (an 8-bit copy has
            lost every instance id >= 256, i.e. all of them), naming the file.
    """
    check_regular_file(path, "instanceIds file")
    try:
        with Image.open(path) as image:
            _check_instance_ids_format(path, image)
            return np.array(image, dtype=np.int32)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"instanceIds file not found: {path}") from err
    except Image.DecompressionBombError as err:
        raise ValueError(f"instanceIds file {path} is refused by PIL as a decompression bomb: {err}") from err
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot read instanceIds file {path}: {err}") from err


def _check_instance_ids_format(path, image: Image.Image) -> None:
    """Raises unless an opened instanceIds file is a 16-bit PNG, saying what it is instead."""
    if image.mode not in _WIDE_MODES:
        raise ValueError(
            f"instanceIds file {path} is {_describe_mode(image.mode)}; Cityscapes instanceIds are "
            "16-bit PNGs (values labelId*1000+k). The file was probably converted; use the original "
            "from gtFine_trainvaltest.zip or regenerate it with cityscapesScripts' json2instanceImg."
        )
    if image.format != "PNG":
        raise ValueError(
            f"instanceIds file {path} is a {image.format} image in mode {image.mode} (up to 32-bit values), not a "
            "16-bit PNG: Cityscapes instanceIds are 16-bit PNGs (values labelId*1000+k below 65536)"
        )


def _describe_mode(mode: str) -> str:
    return {"L": "8-bit (mode L)", "P": "8-bit palette (mode P)", "1": "1-bit", "RGB": "8-bit RGB"}.get(
        mode, f"mode {mode}"
    )


class CityscapesDataset(torch.utils.data.Dataset):
    """Cityscapes images with instance masks of the 8 instance classes.

    Args:
        root: the Cityscapes folder holding ``leftImg8bit/`` and ``gtFine/``.
        split: ``"train"``, ``"val"`` or ``"test"`` (a folder name under both).
        classes: class names to use, in label order (label ``i + 1`` is
            ``classes[i]``); any subset of :data:`CITYSCAPES_CLASSES`.
        transforms: an :class:`~mrcnn.data.transforms.InstanceTransform` or ``None``.
        include_crowd: keep group regions (pixels valued ``labelId < 1000`` of an
            instance class) in the targets, one per class and image, with
            ``iscrowd=1``. Use it for evaluation, where they are ignore regions;
            the model must not train on them (see
            :func:`~mrcnn.data.transforms.drop_crowd`).
        image_limits: the largest images accepted (``data.image_limits``), checked
            on the PNG headers when the dataset is built.
        max_annotations_per_image: most instances in one target; an image with more
            keeps the largest (by pixels), the rest counted when read. ``None``: no cap.

    Attributes:
        class_names, label_to_category_id (label -> Cityscapes labelId),
        image_ids (1..N in sorted file order), image_files, instance_files,
        image_sizes ``(height, width)``, skipped_images (``Counter`` by reason).

    Image and instanceIds files are paired and checked at construction: a missing
    folder, an 8-bit instanceIds file or a size mismatch stops with an error naming
    the file; an image without instanceIds file is skipped and counted.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        classes: Sequence[str] = CITYSCAPES_CLASSES,
        transforms: InstanceTransform | None = None,
        include_crowd: bool = False,
        image_limits: ImageLimits | None = None,
        max_annotations_per_image: int | None = None,
    ):
        if isinstance(classes, str):
            raise ValueError(f"classes must be a list of names, got the string {classes!r}")
        unknown = [c for c in classes if c not in CITYSCAPES_LABEL_IDS]
        if unknown or not classes:
            raise ValueError(f"unknown Cityscapes classes {unknown or classes}; valid: {list(CITYSCAPES_CLASSES)}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate names in classes {list(classes)}")
        self.root = Path(root)
        self.split = split
        self.class_names = list(classes)
        self.label_to_category_id = {i: CITYSCAPES_LABEL_IDS[name] for i, name in enumerate(self.class_names, 1)}
        # labelId -> label lookup table over all 16-bit labelIds (index: labelId, 0 = not used).
        self._label_of = np.zeros(1 << 16, dtype=np.int64)
        for label, label_id in self.label_to_category_id.items():
            self._label_of[label_id] = label
        self.transforms = transforms
        self.include_crowd = bool(include_crowd)
        self.image_limits = image_limits
        self.max_annotations_per_image = max_annotations_per_image

        image_root = self.root / "leftImg8bit" / split
        gt_root = self.root / "gtFine" / split
        for folder in (image_root, gt_root):
            if not folder.is_dir():
                raise FileNotFoundError(f"Cityscapes folder not found: {folder} (expected under data root {self.root})")
        image_files, instance_files, sizes = [], [], []
        self.skipped_images: Counter[str] = Counter()
        missing_examples = []
        for image_file in sorted(image_root.glob(f"*/*{_IMAGE_SUFFIX}")):
            stem = image_file.name[: -len(_IMAGE_SUFFIX)]
            instance_file = gt_root / image_file.parent.name / f"{stem}{_INSTANCE_SUFFIX}"
            if not os.path.lexists(instance_file):
                self.skipped_images["no gtFine instanceIds file"] += 1
                missing_examples.append(str(instance_file))
                continue
            # Before any open: a named pipe would block the header read forever.
            check_regular_file(image_file, "Cityscapes image")
            check_regular_file(instance_file, "instanceIds file")
            sizes.append(self._check_pair(image_file, instance_file))
            image_files.append(image_file)
            instance_files.append(instance_file)
        if not image_files:
            raise FileNotFoundError(self._why_no_images(image_root))
        # Ground truth whose image is missing (an incomplete leftImg8bit download or extraction) would shrink the
        # split without a word: the official evaluation stops on it; here it is counted and reported.
        paired = set(instance_files)
        for instance_file in sorted(gt_root.glob(f"*/*{_INSTANCE_SUFFIX}")):
            if instance_file not in paired:
                self.skipped_images["no leftImg8bit image file (its gtFine instanceIds file is there)"] += 1
                missing_examples.append(str(instance_file))
        # Paths relative to the root, as str: (leftImg8bit path, gtFine path) per item.
        self._files = PackedRecords(
            (str(image.relative_to(self.root)), str(ids.relative_to(self.root)))
            for image, ids in zip(image_files, instance_files)
        )
        self._image_sizes = np.asarray(sizes, dtype=np.int64).reshape(len(sizes), 2)  # [N, 2] (height, width)
        self.skip_report = ""
        if self.skipped_images:
            self.skip_report = (
                f"left out {sum(self.skipped_images.values())} images: "
                + ", ".join(f"{n} {reason}" for reason, n in self.skipped_images.items())
                + f" (e.g. {missing_examples[:3]})"
            )
            log.warning("Cityscapes %s: %s", split, self.skip_report)
        log.info("Cityscapes %s: %d images, %d classes", split, len(self), self.num_classes)

        # uint8/int32 [len]: per item, label-table misses and capped instances found when read (in shared
        # memory, so DataLoader workers' counts reach this process; see report_read_skips).
        self._unknown_ids = torch.zeros(len(self), dtype=torch.int32).share_memory_()
        self._capped = torch.zeros(len(self), dtype=torch.int32).share_memory_()
        self._reported = (0, 0)

    @staticmethod
    def _why_no_images(image_root: Path) -> str:
        """Why no image was found under ``image_root``, saying so when the ``<city>/`` level is missing."""
        flat = sorted(image_root.glob(f"*{_IMAGE_SUFFIX}"))
        if flat:
            return (
                f"no '*{_IMAGE_SUFFIX}' images in city folders under {image_root}, but {len(flat)} directly in it "
                f"(e.g. {flat[0].name}): Cityscapes keeps each city's images in its own folder, "
                f"leftImg8bit/<split>/<city>/ (and gtFine/<split>/<city>/); move them into one"
            )
        return f"no '*{_IMAGE_SUFFIX}' images with instanceIds files found under {image_root}/<city>/"

    def _check_pair(self, image_file: Path, instance_file: Path) -> tuple[int, int]:
        """``(height, width)`` after checking, from the PNG headers only, that the pair fits and is not too large."""
        try:
            with Image.open(image_file) as image:
                image_size = image.size
            with Image.open(instance_file) as ids:
                ids_size = ids.size
                _check_instance_ids_format(instance_file, ids)
        except Image.DecompressionBombError as err:
            raise ValueError(
                f"{image_file} or {instance_file} is refused by PIL as a decompression bomb: {err}"
            ) from err
        except (OSError, SyntaxError) as err:
            raise ValueError(f"cannot read the header of {image_file} or {instance_file}: {err}") from err
        if self.image_limits is not None:
            self.image_limits.check(image_file, image_size[1], image_size[0])
        if image_size != ids_size:
            raise ValueError(
                f"{instance_file} is {ids_size[0]}x{ids_size[1]} but its image {image_file} is "
                f"{image_size[0]}x{image_size[1]}"
            )
        return image_size[1], image_size[0]

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K (labels run 1..K)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._files)

    def files(self, index: int) -> tuple[Path, Path]:
        """``(image file, instanceIds file)`` of item ``index``."""
        image_file, instance_file = self._files[index]
        return self.root / image_file, self.root / instance_file

    @property
    def image_files(self) -> list[Path]:
        """The ``*_leftImg8bit.png`` file of each item."""
        return [self.files(i)[0] for i in range(len(self))]

    @property
    def instance_files(self) -> list[Path]:
        """The ``*_gtFine_instanceIds.png`` file of each item."""
        return [self.files(i)[1] for i in range(len(self))]

    @property
    def image_ids(self) -> list[int]:
        """Image id of each item: 1..N in sorted file order."""
        return list(range(1, len(self) + 1))

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of each item, from the PNG headers."""
        return [(height, width) for height, width in self._image_sizes.tolist()]

    def instances(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Masks and per-instance fields of item ``index`` before any transform.

        Returns:
            masks: uint8 ``[N, H, W]``, instances first (in increasing id order), then
                crowd regions if ``include_crowd``.
            fields: ``labels`` int64 ``[N]`` (1..K) and ``iscrowd`` int64 ``[N]``.
        """
        ids = read_instance_ids(self.files(index)[1])
        values, pixels = np.unique(ids, return_counts=True)
        if values[-1] >= 1 << 16:
            raise ValueError(f"instanceIds file {self.files(index)[1]} holds {values[-1]}, beyond 16 bits")
        # labelId*1000+k for instances; a bare labelId (< 1000) for a group region.
        is_instance = values >= 1000
        label_ids = np.where(is_instance, values // 1000, values)
        unknown = int((label_ids > MAX_LABEL_ID).sum())
        if unknown:
            self._unknown_ids[index] = unknown  # counted once per item, however often it is read
        labels = self._label_of[label_ids]
        keep = (labels > 0) & (is_instance | self.include_crowd)
        cap = self.max_annotations_per_image
        if cap is not None and int((keep & is_instance).sum()) > cap:
            # The largest instances (crowd regions stay): one [H, W] mask each, however small the object.
            instance_rows = np.flatnonzero(keep & is_instance)
            smallest = instance_rows[np.argsort(-pixels[instance_rows], kind="stable")[cap:]]
            keep[smallest] = False
            self._capped[index] = len(smallest)
        # Instances first, then crowd regions: stable sort on the crowd flag.
        order = np.argsort(~is_instance[keep], kind="stable")
        values, labels, crowd = values[keep][order], labels[keep][order], (~is_instance[keep])[order]
        masks = (ids[None] == values[:, None, None]).astype(np.uint8)
        return masks, {"labels": labels.astype(np.int64), "iscrowd": crowd.astype(np.int64)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        """Returns ``(image float32 [3, H, W], target)`` following the data contract."""
        image_file, instance_file = self.files(index)
        image = read_image(image_file, self.image_limits)
        masks, fields = self.instances(index)  # [N, H, W], also for N = 0
        if image.shape[:2] != masks.shape[1:]:
            raise ValueError(size_mismatch_message(image_file, image.shape[:2], masks.shape[1:], instance_file))
        image, masks, boxes, fields = transform_instances(self.transforms, image, masks, fields, index=index)
        image_id = range(1, len(self) + 1)[index]  # 1..N, also for a negative index
        return to_sample(image, masks, fields["labels"], image_id=image_id, boxes=boxes, iscrowd=fields["iscrowd"])

    def report_read_skips(self) -> str:
        """Logs the instances found unusable while reading items, since the last report; returns the line.

        Values whose labelId is outside Cityscapes' label table, and instances above
        ``max_annotations_per_image``, are left out of the targets when an item is read
        (in DataLoader workers); each item counts once. Called by the datamodule after
        every pass, like :meth:`mrcnn.data.coco.CocoDataset.report_read_skips`.
        """
        unknown, capped = int(self._unknown_ids.sum()), int(self._capped.sum())
        if (unknown, capped) == self._reported:
            return ""
        self._reported = (unknown, capped)
        parts = []
        if unknown:
            items = np.flatnonzero(self._unknown_ids.numpy()).tolist()
            parts.append(
                f"{unknown} instance or region values of {len(items)} images have a labelId outside Cityscapes' "
                f"label table (0..{MAX_LABEL_ID}) and were left out of the targets (the official evaluation reads "
                f"them as void), e.g. {[str(self.files(i)[1]) for i in items[:3]]}"
            )
        if capped:
            items = np.flatnonzero(self._capped.numpy()).tolist()
            parts.append(
                f"{capped} instances of {len(items)} images were left out of the targets above "
                f"max_annotations_per_image={self.max_annotations_per_image} (data.max_annotations_per_image; the "
                f"largest are kept), e.g. {[str(self.files(i)[1]) for i in items[:3]]}"
            )
        message = f"Cityscapes {self.split}: " + "; ".join(parts)
        log.warning("%s", message)
        return message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root}, split={self.split!r}, {len(self)} images)"
