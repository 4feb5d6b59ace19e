"""The dataset contract: what a dataset must provide to train and evaluate here, and what it may provide.

A dataset is any ``torch.utils.data.Dataset``; nothing needs to subclass anything. It **must** have:

- ``class_names``: the foreground class names; label ``i + 1`` is ``class_names[i]`` (labels run 1..K,
  0 is the background).
- ``__len__`` and ``__getitem__(index) -> (image, target)``, where ``image`` is float ``[3, H, W]`` in 0..1 and
  ``target`` holds the tensors of :data:`TARGET_FIELDS` and ``image_id``, an int unique in the dataset
  (:func:`check_sample` checks one item).

It **may** have, each found with ``isinstance`` against the protocols below (an attribute set to ``None`` counts as
not provided):

- ``label_to_category_id`` (:class:`HasCategoryIds`): ``{label: category id}`` of its own annotation files
  (COCO json ids, Cityscapes labelIds); predictions and checkpoints then carry those ids.
- ``coco_gt`` (:class:`HasCocoGroundTruth`): a pycocotools ``COCO`` ground truth to score against (crowd regions
  as ignore regions, the json's areas), which makes the numbers pycocotools' numbers on that json.
- ``image_sizes`` (:class:`HasImageSizes`): ``(height, width)`` of every item without decoding it, for
  ``aspect_ratio_grouping``.
- ``report_read_skips()`` (:class:`ReportsReadSkips`): logs what it left out while reading items (e.g. in loader
  workers); the datamodule calls it after every pass.
- ``num_trainable_annotations`` (:class:`CountsTrainableAnnotations`): how many non-crowd annotations its items'
  targets hold in all, known without reading them; training stops before its first step when it is 0.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "TARGET_FIELDS",
    "CountsTrainableAnnotations",
    "HasCategoryIds",
    "HasCocoGroundTruth",
    "HasImageSizes",
    "InstanceDataset",
    "ReportsReadSkips",
    "check_sample",
]

# The tensors a target holds: field -> (dtype, shape, meaning). N is the number of instances (0 is legal), H x W the
# image's. A target also holds "image_id", a Python int unique in the dataset.
TARGET_FIELDS: dict[str, tuple[torch.dtype, str, str]] = {
    "boxes": (torch.float32, "[N, 4]", "x1, y1, x2, y2 in pixels, x2 > x1 and y2 > y1"),
    "labels": (torch.int64, "[N]", "1..K, label i + 1 is class_names[i]"),
    "masks": (torch.uint8, "[N, H, W]", "0/1 instance masks"),
    "iscrowd": (torch.int64, "[N]", "1 for crowd regions (kept out of training, ignore regions in evaluation)"),
    "area": (torch.float32, "[N]", "mask area in pixels (COCO's area for COCO json data)"),
}


@runtime_checkable
class InstanceDataset(Protocol):
    """What every dataset must provide (see the module docstring)."""

    class_names: Sequence[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]: ...


@runtime_checkable
class HasCategoryIds(Protocol):
    """A dataset whose labels stand for category ids of its own annotation files."""

    label_to_category_id: Mapping[int, int]


@runtime_checkable
class HasCocoGroundTruth(Protocol):
    """A dataset with a pycocotools ground truth (``pycocotools.coco.COCO``) to evaluate against."""

    coco_gt: Any


@runtime_checkable
class HasImageSizes(Protocol):
    """A dataset that knows every item's ``(height, width)`` without decoding it."""

    image_sizes: Sequence[tuple[int, int]]


@runtime_checkable
class ReportsReadSkips(Protocol):
    """A dataset that counts what it leaves out while reading items and logs it when asked."""

    def report_read_skips(self) -> str: ...


@runtime_checkable
class CountsTrainableAnnotations(Protocol):
    """A dataset that knows how many non-crowd annotations (what training learns from) its items hold, unread."""

    num_trainable_annotations: int


def check_sample(sample: tuple[Tensor, dict[str, Tensor]], num_classes: int) -> None:
    """Checks one dataset item against the contract (:data:`TARGET_FIELDS`).

    Args:
        sample: ``dataset[i]``.
        num_classes: K, the number of foreground classes (``len(dataset.class_names)``).

    Raises:
        ValueError: naming the first field that breaks the contract and how.
    """
    image, target = sample
    if not (isinstance(image, Tensor) and image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3):
        raise ValueError(f"image must be float32 [3, H, W], got {getattr(image, 'dtype', type(image))} {_shape(image)}")
    if image.numel() and not (0 <= float(image.min()) and float(image.max()) <= 1):
        raise ValueError(f"image values must lie in 0..1, got {float(image.min())}..{float(image.max())}")
    height, width = image.shape[-2:]
    labels = target.get("labels")
    if isinstance(labels, Tensor) and labels.ndim != 1:  # N is read from it
        raise ValueError(f"target 'labels' must be [N], one per instance, got shape {tuple(labels.shape)}")
    n = len(labels) if isinstance(labels, Tensor) else 0
    shapes = {"[N, 4]": (n, 4), "[N]": (n,), "[N, H, W]": (n, height, width)}
    for field, (dtype, shape, meaning) in TARGET_FIELDS.items():
        value = target.get(field)
        if not isinstance(value, Tensor):
            raise ValueError(f"target has no tensor '{field}' ({dtype} {shape}: {meaning})")
        if value.dtype != dtype or tuple(value.shape) != shapes[shape]:
            raise ValueError(
                f"target '{field}' must be {dtype} {shape} = {shapes[shape]} ({meaning}), got {value.dtype} "
                f"{tuple(value.shape)}"
            )
    image_id = target.get("image_id")
    if not isinstance(image_id, int) or isinstance(image_id, bool):
        raise ValueError(f"target 'image_id' must be an int, got {type(image_id).__name__}")
    boxes = target["boxes"]
    if n and not bool(((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()):
        raise ValueError(f"target 'boxes' must have x2 > x1 and y2 > y1, got {boxes.tolist()}")
    if n and not (1 <= int(labels.min()) and int(labels.max()) <= num_classes):
        raise ValueError(f"target 'labels' must lie in 1..{num_classes}, got {labels.tolist()}")
    for field in ("masks", "iscrowd"):
        if n and int(target[field].max()) > 1:
            raise ValueError(f"target '{field}' must hold 0 or 1, got values up to {int(target[field].max())}")


def _shape(value: Any) -> tuple:
    return tuple(getattr(value, "shape", ()))
