"""Augmentation pipelines that keep instance masks, boxes and labels in step.

Every dataset in :mod:`mrcnn.data` produces a uint8 image ``[H, W, 3]``, uint8
instance masks ``[N, H, W]`` and per-instance fields (int64 labels ``[N]``, and
``iscrowd`` where the data has crowd regions) first, runs an optional
:class:`InstanceTransform` on them, and only then converts the result into the
project's tensor contract with :func:`to_sample`.

The ready-made pipelines below are the options of the ``data/augmentation`` config
group (``configs/data/augmentation/*.yaml``); any albumentations list works through
``InstanceTransform(transforms=[...])``.

Boxes: data without boxes of its own (Cityscapes, shapes) gets them from the
transformed masks. Data with annotated boxes (COCO json ``bbox``) keeps those as
the one box source for training and evaluation alike, as torchvision's references
and Detectron2 train on the json boxes that pycocotools scores against: they go
through the same albumentations transforms (``pascal_voc`` format, clipped), each
tagged with its instance's index, so that the instances kept are those whose mask
and box both survive. Albumentations' own filtering drops boxes and label fields
but not masks, which is how ``len(masks) != len(boxes)`` bugs arise; the index
field selects the masks and fields that go with the boxes it kept.

A transform that can cut an object (a crop, a rotation) leaves its json box
spanning the part that was cut away: clipped to the image, the box of a tall
object cropped to its top quarter is still four times too tall. After such a
pipeline each given box is cut to its transformed mask's box, widened by a pixel
(Detectron2 recomputes every box from the masks when it crops, mmdetection's
``RandomCrop(recompute_bbox=True)`` likewise): an object left whole keeps its json
box (the pixels a polygon covers span its box to within a pixel; after an upscaling
resize the mask's nearest-neighbour resampling may fall short of it by a little more,
about 1.5 px at COCO's scale jitter to 1024), a cut one gets the box of what is left of it. Flips, resizes, padding and colour changes map
boxes exactly and keep the json boxes as they are.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
import torch

__all__ = [
    "InstanceTransform",
    "drop_crowd",
    "identity_transforms",
    "masks_to_boxes",
    "photometric_transforms",
    "random_crop_transforms",
    "scale_jitter_transforms",
    "to_sample",
    "train_transforms",
    "transform_instances",
]


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes around binary masks.

    ``x1`` is the first column containing the mask and ``x2`` is one past the last
    one (likewise for y), so a single-pixel mask at (row 3, col 5) gets the box
    ``[5, 3, 6, 4]`` with positive width and height.

    Args:
        masks: ``[N, H, W]`` array; nonzero means foreground. Every mask must be
            non-empty (an empty mask has no extent; its box is undefined).

    Returns:
        ``[N, 4]`` float32 array of ``(x1, y1, x2, y2)`` in pixels.
    """
    n, h, w = masks.shape
    if n == 0:
        return np.zeros((0, 4), dtype=np.float32)
    rows = masks.any(axis=2)  # [N, H]: which rows each mask touches
    cols = masks.any(axis=1)  # [N, W]
    # argmax returns the first True; on the reversed array it finds the last one.
    y1 = rows.argmax(axis=1)
    y2 = h - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = w - cols[:, ::-1].argmax(axis=1)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)


# Transforms that map every box exactly (through its corners) and never cut an object away: a given box stays the
# box of its instance. Any other (a crop, a rotation, an affine or elastic warp, a composite) may cut one.
BOX_EXACT_TRANSFORMS = (
    A.HorizontalFlip,
    A.VerticalFlip,
    A.Resize,
    A.LongestMaxSize,
    A.SmallestMaxSize,
    A.RandomScale,
    A.PadIfNeeded,
)


class InstanceTransform:
    """Runs albumentations transforms on an image and its instance masks.

    Boxes given with the masks (COCO-format json boxes) are transformed with them; without given boxes they are
    recomputed from the transformed masks. Instances whose mask became empty (cropped away, rotated out of the
    frame), or whose given box did, are dropped with their labels, so masks, boxes and labels always line up.

    Random draws are repeatable (albumentations 2.x keeps its own random state, which
    ``seed_everything`` does not reach):

    - an item of the training stream (its index a :class:`~mrcnn.data.samplers.SampleIndex`)
      is augmented from ``(seed, epoch, index, repeat)`` alone, so a run gives the same batches with
      or without loader workers and when resumed part-way through an epoch;
    - any other call draws from a random state seeded once per process: from ``seed``, or
      without one from torch's seed of the process (``torch.initial_seed()``: the run's seed in
      the main process, the worker's own seed in a loader worker, which differs per worker and
      epoch).

    Args:
        transforms: albumentations transforms applied in order, e.g.
            ``[A.HorizontalFlip(p=0.5)]``. ``None`` or an empty list leaves the
            sample unchanged (given boxes are kept; without them, boxes are computed from the masks).
        seed: seed of the random state in the main process; ``None``: torch's seed.
        cut_boxes_to_masks: cut each given box to its transformed mask's box widened by one pixel (see the
            module docstring). ``None``: when a transform may cut an object, i.e. any but flips, resizes,
            padding and pixel-value changes (:data:`BOX_EXACT_TRANSFORMS`, ``A.ImageOnlyTransform``).
    """

    def __init__(
        self,
        transforms: Sequence[A.BasicTransform] | None = None,
        seed: int | None = None,
        cut_boxes_to_masks: bool | None = None,
    ):
        # Boxes, when given, follow the transforms as xyxy pixels (pascal_voc), clipped to the image; the
        # instance index field says which survived. No albumentations filtering beyond an empty box.
        # (Without transforms there is nothing to follow, and albumentations warns about an unused processor.)
        transforms = list(transforms or [])
        bbox_params = A.BboxParams(format="pascal_voc", label_fields=["instance"], clip=True) if transforms else None
        self.compose = A.Compose(transforms, bbox_params=bbox_params)
        if cut_boxes_to_masks is None:
            cut_boxes_to_masks = not all(
                isinstance(t, (A.ImageOnlyTransform, *BOX_EXACT_TRANSFORMS)) for t in transforms
            )
        self.cut_boxes_to_masks = cut_boxes_to_masks
        self.seed = seed
        # Process and worker for which the random state was last seeded (calls without a SampleIndex).
        self._seeded_for: tuple[int, int] | None = None

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, labels: np.ndarray, index: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Transforms one sample.

        Args:
            image: uint8 ``[H, W, 3]``.
            masks: uint8 ``[N, H, W]`` with values 0/1; N may be 0.
            labels: int64 ``[N]``.
            index: the item's dataset index (a ``SampleIndex`` seeds this item's draw).

        Returns:
            ``(image, masks, boxes, labels)``: uint8 ``[H', W', 3]``, uint8
            ``[M, H', W']``, float32 ``[M, 4]`` xyxy and int64 ``[M]``, where the
            M <= N surviving instances keep their original order.
        """
        fields = {"labels": np.asarray(labels, dtype=np.int64)}
        image, masks, boxes, fields = self.apply(image, masks, fields, index=index)
        return image, masks, boxes, fields["labels"]

    def apply(
        self,
        image: np.ndarray,
        masks: np.ndarray,
        fields: Mapping[str, np.ndarray],
        boxes: np.ndarray | None = None,
        index: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Transforms one sample and keeps any per-instance fields in step with the masks.

        Args:
            image: uint8 ``[H, W, 3]``.
            masks: uint8 ``[N, H, W]`` with values 0/1; N may be 0.
            fields: per-instance arrays of length N, e.g. ``{"labels": int64 [N],
                "iscrowd": int64 [N]}``.
            boxes: float ``[N, 4]`` xyxy pixel boxes of the data's own, with positive
                width and height inside the image; ``None``: boxes come from the masks.
            index: the item's dataset index; a :class:`~mrcnn.data.samplers.SampleIndex` draws this
                item's augmentation from its ``(seed, epoch, index)``.

        Returns:
            ``(image, masks, boxes, fields)``: uint8 ``[H', W', 3]``, uint8
            ``[M, H', W']``, float32 ``[M, 4]`` xyxy, and each field indexed down to
            the M <= N instances whose mask is still non-empty (and, with ``boxes``,
            whose box is; original order kept).
        """
        for name, values in fields.items():
            if len(values) != len(masks):
                raise ValueError(f"per-instance field {name!r} has {len(values)} entries for {len(masks)} masks")
        if boxes is not None and len(boxes) != len(masks):
            raise ValueError(f"{len(boxes)} boxes for {len(masks)} masks")
        self._seed_draw(index)
        given = np.zeros((0, 4), dtype=np.float32) if boxes is None else np.asarray(boxes, dtype=np.float32)
        instance = np.arange(len(given))
        if len(masks) == 0:
            # albumentations cannot stack an empty [0, H, W] array: transform the image alone.
            out = self.compose(image=image, bboxes=given, instance=instance)
            image = out["image"]
            masks = np.zeros((0, *image.shape[:2]), dtype=np.uint8)
        else:
            out = self.compose(image=image, masks=masks, bboxes=given, instance=instance)
            image = out["image"]
            # Interpolating transforms may produce values other than 0/1: binarise.
            masks = (np.asarray(out["masks"]) > 0).astype(np.uint8)

        # Instances cropped away (or shrunk below one pixel) go, with every field of theirs.
        keep = masks.any(axis=(1, 2))
        if boxes is not None:
            box_of = np.full((len(masks), 4), np.nan, dtype=np.float32)
            box_of[np.asarray(out["instance"], dtype=np.int64)] = np.asarray(out["bboxes"], dtype=np.float32)
            if self.cut_boxes_to_masks and keep.any():
                # A cut object's box spans what was cut away: limit it to its mask's box, widened by the pixel a
                # whole object's rasterized mask may fall short of its box by (see the module docstring).
                visible = masks_to_boxes(masks[keep]) + np.array([-1, -1, 1, 1], dtype=np.float32)
                box_of[keep, :2] = np.maximum(box_of[keep, :2], visible[:, :2])
                box_of[keep, 2:] = np.minimum(box_of[keep, 2:], visible[:, 2:])
            width = box_of[:, 2] - box_of[:, 0]
            height = box_of[:, 3] - box_of[:, 1]
            keep &= (width > 0) & (height > 0)  # NaN (dropped by albumentations) compares False
        masks = masks[keep]
        fields = {name: np.asarray(values)[keep] for name, values in fields.items()}
        out_boxes = masks_to_boxes(masks) if boxes is None else box_of[keep]
        return image, masks, out_boxes, fields

    def _seed_draw(self, index: int | None) -> None:
        """Seeds the random state for this item's draw (see the class docstring)."""
        epoch = getattr(index, "epoch", None)
        if epoch is not None:
            # A first use keeps the key it had before repeats were numbered: recorded runs draw as they did.
            repeat = getattr(index, "repeat", 0)
            key = [index.seed, epoch, int(index), *([repeat] if repeat else [])]
            self._set_seed(np.random.SeedSequence(key).generate_state(1)[0])
            self._seeded_for = None  # a later call without a SampleIndex seeds its process's state again
            return
        # DataLoader workers start as copies of the main process, so each would inherit the same random
        # state: seed once per process and worker, from the worker's own torch seed in a worker.
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), -1 if info is None else info.id)
        if self._seeded_for != key:
            if info is not None:
                seed = info.seed
            else:
                seed = torch.initial_seed() if self.seed is None else self.seed
            self._set_seed(seed % 2**32)
            self._seeded_for = key

    def _set_seed(self, seed: int) -> None:
        # One generator pair shared by all the transforms (set_random_state), not one per transform
        # (Compose.set_random_seed): transforms seeded alike would draw alike, e.g. a flip at p=0.5 and a
        # colour jitter at p=0.8 from the same first number, so every flipped image would also be jittered.
        self.compose.set_random_state(np.random.default_rng(int(seed)), random.Random(int(seed)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.compose.transforms!r})"


def train_transforms(hflip_prob: float = 0.5) -> InstanceTransform:
    """The default training augmentation: a random horizontal flip (as in the paper).

    Args:
        hflip_prob: probability of flipping each image.
    """
    return InstanceTransform([A.HorizontalFlip(p=hflip_prob)])


def identity_transforms() -> InstanceTransform:
    """No augmentation (validation and test): given boxes (a COCO json's) are kept, others computed from the masks."""
    return InstanceTransform([])


def photometric_transforms(
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.02,
    p: float = 0.8,
    hflip_prob: float = 0.5,
) -> InstanceTransform:
    """Horizontal flip plus colour jitter (masks and boxes are untouched by the jitter).

    Args:
        brightness, contrast, saturation: factors drawn from ``[1 - x, 1 + x]``.
        hue: hue shift drawn from ``[-hue, hue]`` (fraction of the colour circle).
        p: probability of jittering an image.
        hflip_prob: probability of flipping an image.
    """
    return InstanceTransform(
        [
            A.HorizontalFlip(p=hflip_prob),
            A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=p),
        ]
    )


def random_crop_transforms(border_fraction: float = 0.15, p: float = 0.5, hflip_prob: float = 0.5) -> InstanceTransform:
    """Horizontal flip plus a random crop that removes up to ``border_fraction`` of each side.

    The crop is relative to the image, so it suits datasets of mixed image sizes;
    instances cut away entirely are dropped, the others keep their visible part.

    Args:
        border_fraction: largest fraction of the width (height) cut from the left and
            from the right (top, bottom) border, each drawn independently.
        p: probability of cropping an image.
        hflip_prob: probability of flipping an image.
    """
    f = float(border_fraction)
    return InstanceTransform(
        [
            A.HorizontalFlip(p=hflip_prob),
            A.RandomCropFromBorders(crop_left=f, crop_right=f, crop_top=f, crop_bottom=f, p=p),
        ]
    )


def scale_jitter_transforms(
    size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0, hflip_prob: float = 0.5
) -> InstanceTransform:
    """Large-scale jitter: fit into ``size``, rescale by a random factor, crop or pad to ``size x size``.

    The model's own transform (``GeneralizedRCNNTransform``) resizes every image to its
    ``min_size`` afterwards, which would undo a plain random resize; the fixed-size
    crop is what makes the jitter survive it (objects keep the random scale relative
    to the ``size x size`` canvas). Use it with ``data.min_size = data.max_size =
    size`` to feed the canvas at its own resolution. For the paper's multi-scale
    training (random shorter side), give ``data.min_size`` a list instead.

    Args:
        size: side of the square output canvas in pixels.
        min_scale, max_scale: range of the random scale factor applied after fitting
            the image's longer side to ``size``.
        hflip_prob: probability of flipping an image.
    """
    return InstanceTransform(
        [
            A.HorizontalFlip(p=hflip_prob),
            # Masks by the nearest pixel centre (cv2's INTER_NEAREST, albumentations' default, takes the pixel at
            # the scaled corner: each resize moves masks half a pixel right and down of the bilinear image).
            A.LongestMaxSize(max_size=int(size), mask_interpolation=cv2.INTER_NEAREST_EXACT, p=1.0),
            A.RandomScale(
                scale_limit=(min_scale - 1.0, max_scale - 1.0), mask_interpolation=cv2.INTER_NEAREST_EXACT, p=1.0
            ),
            # Pads with zeros (image and masks) at the bottom/right when the image is smaller.
            A.RandomCrop(height=int(size), width=int(size), pad_if_needed=True, pad_position="top_left", p=1.0),
        ]
    )


def transform_instances(
    transforms: InstanceTransform | None,
    image: np.ndarray,
    masks: np.ndarray,
    fields: Mapping[str, np.ndarray],
    boxes: np.ndarray | None = None,
    index: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Runs ``transforms.apply`` (or nothing when ``transforms`` is ``None``); see :meth:`InstanceTransform.apply`.

    ``index`` is the item's dataset index, passed on so that a training item's draw follows from it.

    Without transforms, instances with an empty mask are still dropped (with their
    fields), so every returned box has positive width and height.

    Args:
        boxes: float ``[N, 4]`` xyxy boxes of the data's own (kept as the box source); ``None``: from the masks.
    """
    if transforms is None:
        keep = masks.any(axis=(1, 2)) if len(masks) else np.zeros(0, dtype=bool)
        masks = masks[keep]
        out_boxes = masks_to_boxes(masks) if boxes is None else np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[keep]
        return image, masks, out_boxes, {k: np.asarray(v)[keep] for k, v in fields.items()}
    if not hasattr(transforms, "apply"):
        raise TypeError(
            f"transforms must be an InstanceTransform (something with an apply(image, masks, fields) method), "
            f"got {type(transforms).__name__}"
        )
    # Keywords only for what is given: an apply() of a user's own may take neither.
    extra = {"boxes": boxes, "index": index}
    return transforms.apply(image, masks, fields, **{k: v for k, v in extra.items() if v is not None})


# Target entries with one row per instance (everything else, like image_id, is per image).
PER_INSTANCE_KEYS = ("boxes", "labels", "masks", "iscrowd", "area")


def drop_crowd(target: dict) -> dict:
    """The target without its crowd regions (``iscrowd == 1``): what the model may train on.

    Evaluation targets may keep crowd regions as ignore regions for the evaluator;
    the model has no notion of crowd and would learn (or score losses on) them as
    ordinary objects.

    Args:
        target: a target dict of the data contract.

    Returns:
        The same dict when it has no crowd region, else a shallow copy with the
        per-instance entries indexed down to the non-crowd instances.
    """
    iscrowd = target.get("iscrowd")
    if iscrowd is None or not bool(iscrowd.any()):
        return target
    keep = iscrowd == 0
    return {k: (v[keep] if k in PER_INSTANCE_KEYS else v) for k, v in target.items()}


def to_sample(
    image: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    image_id: int,
    boxes: np.ndarray | None = None,
    iscrowd: np.ndarray | None = None,
) -> tuple[torch.Tensor, dict]:
    """Converts numpy instances to the project's ``(image, target)`` contract.

    Args:
        image: uint8 ``[H, W, 3]``.
        masks: ``[N, H, W]`` 0/1 masks, all non-empty.
        labels: ``[N]`` contiguous class labels in 1..K.
        image_id: unique id of the image within its dataset (starts at 1).
        boxes: ``[N, 4]`` xyxy boxes; computed tightly from the masks if ``None``.
        iscrowd: ``[N]`` crowd flags; all zeros if ``None``.

    Returns:
        ``image``: float32 ``[3, H, W]`` in 0..1, and ``target`` with ``boxes``
        float32 ``[N, 4]``, ``labels`` int64 ``[N]``, ``masks`` uint8 ``[N, H, W]``,
        ``iscrowd`` int64 ``[N]``, ``area`` float32 ``[N]`` (mask pixel count) and
        ``image_id`` (int).
    """
    masks = np.ascontiguousarray(masks, dtype=np.uint8)
    n = len(masks)
    if boxes is None:
        boxes = masks_to_boxes(masks)
    if iscrowd is None:
        iscrowd = np.zeros(n, dtype=np.int64)
    image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    target = {
        "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(n, 4),
        "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(n),
        "masks": torch.from_numpy(masks),
        "iscrowd": torch.as_tensor(iscrowd, dtype=torch.int64).reshape(n),
        "area": torch.from_numpy(masks.sum(axis=(1, 2), dtype=np.int64).astype(np.float32)),
        "image_id": int(image_id),
    }
    return image_t, target
