"""Does the configured model fit the data: its number of classes, and its anchors for the objects' sizes.

Both checks run when a run is built (``mrcnn.engine.build.build``), before any step. A wrong number of classes
otherwise fails deep inside a loss (``IndexError: Target 2 is out of bounds``) or at the sanity check; anchors
far from the objects' sizes train a model that finds nothing, without any error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from torch import nn

from mrcnn.errors import CommandError

log = logging.getLogger(__name__)

# A box is out of the anchors' reach when it is larger than twice the largest anchor or smaller than half the
# smallest (the RPN's positives need IoU 0.7 with an anchor), and the warning fires when most boxes are.
REACH = 2.0
MOST = 0.5


def check_num_classes(num_classes: int, class_names: Sequence[str]) -> None:
    """Stops when ``model.num_classes`` disagrees with the data's classes.

    Raises:
        CommandError: naming both numbers and the data's classes.
    """
    if int(num_classes) != len(class_names):
        names = list(class_names) if len(class_names) <= 20 else [*class_names[:20], "..."]
        raise CommandError(
            f"model.num_classes={num_classes}, but the data has {len(class_names)} classes {names}. "
            "Leave model.num_classes unset: it follows the data (data.classes picks a subset of the data's classes)."
        )


def anchor_range(model: nn.Module) -> tuple[float, float]:
    """(smallest, largest) anchor size in pixels of a ``MaskRCNN``'s RPN."""
    sizes = [s for level in model.rpn.anchor_generator.sizes for s in level]
    return float(min(sizes)), float(max(sizes))


def resize_scale(model: nn.Module, height: int, width: int) -> float:
    """The factor the model's transform resizes a ``height`` x ``width`` image by at test time (its last min_size)."""
    transform = model.transform
    return min(float(transform.min_size[-1]) / min(height, width), float(transform.max_size) / max(height, width))


def sample_indices(dataset, max_images: int) -> np.ndarray:
    """Up to ``max_images`` evenly spaced item indices of ``dataset``."""
    return np.unique(np.linspace(0, len(dataset) - 1, min(max_images, len(dataset))).round().astype(int))


def sampled_box_sides(model: nn.Module, dataset, max_images: int = 32) -> np.ndarray:
    """Sides (square root of the area) of the non-crowd ground-truth boxes of up to ``max_images`` images of
    ``dataset`` (evenly spaced), after the model's resizing, in pixels."""
    if len(dataset) == 0:
        return np.zeros(0)
    indices = sample_indices(dataset, max_images)
    sides = []
    for index in indices:
        image, target = dataset[int(index)]
        if not isinstance(target, dict) or "boxes" not in target:
            return np.zeros(0)  # not a detection dataset (e.g. a test stand-in): nothing to check
        boxes = target["boxes"].double().reshape(-1, 4)
        if "iscrowd" in target:
            boxes = boxes[target["iscrowd"] == 0]
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
        sides.append(area.sqrt().numpy() * resize_scale(model, *image.shape[-2:]))
    return np.concatenate(sides) if sides else np.zeros(0)


def box_size_warning(model: nn.Module, dataset, max_images: int = 32) -> str | None:
    """A warning when most sampled boxes are out of the anchors' reach after resizing; ``None`` when they fit."""
    sides = sampled_box_sides(model, dataset, max_images)
    sides = sides[sides > 0]  # a box with no area fits no anchor, and would size the advice by 0 px
    if len(sides) == 0:
        return None
    smallest, largest = anchor_range(model)
    out = (sides > REACH * largest) | (sides < smallest / REACH)
    if out.mean() <= MOST:
        return None
    median = float(np.median(sides))
    transform = model.transform
    min_size, max_size = int(transform.min_size[-1]), int(transform.max_size)
    # Scaling the images so the median box lands in the middle of the anchors (geometric mean) fits most.
    factor = math.sqrt(smallest * largest) / median
    return (
        f"{100 * out.mean():.0f}% of {len(sides)} ground-truth boxes (in {len(sample_indices(dataset, max_images))} of "
        f"the {len(dataset)} validation images) "
        f"are out of the anchors' reach after resizing to min_size={min_size}, max_size={max_size}: larger than "
        f"{REACH * largest:.0f} px or smaller than {smallest / REACH:.0f} px (anchors {smallest:.0f}-{largest:.0f} px); "
        f"median box side {median:.0f} px. Resize to fit, e.g. data.min_size={round(min_size * factor)} "
        f"data.max_size={round(max_size * factor)}, or change model.anchor_sizes."
    )


def warn_if_boxes_outside_anchors(model: nn.Module, dataset, max_images: int = 32) -> str | None:
    """Logs :func:`box_size_warning` once (call it on one process); returns it."""
    message = box_size_warning(model, dataset, max_images)
    if message:
        log.warning(message)
    return message
