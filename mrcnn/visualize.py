"""Drawing predictions: instance overlays (prediction PNGs, W&B) and semantic label maps (W&B masks).

Shared by ``mrcnn.predict`` (overlay files) and ``mrcnn.callbacks.PredictionOverlays`` (W&B images), so a
picture on W&B and a picture on disk are drawn by the same code.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

# Hue step between consecutive instance colours: the golden ratio spreads any number of hues evenly.
_GOLDEN_RATIO = 0.618033988749895


def instance_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct saturated RGB colours, the same ones for the same ``n``."""
    colors = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.1 + i * _GOLDEN_RATIO) % 1.0, 0.85, 1.0)
        colors.append((int(255 * r), int(255 * g), int(255 * b)))
    return colors


def class_name(label: int, class_names: Sequence[str] | None) -> str:
    """The name of contiguous label ``label`` (1..K), or the number when no name is known."""
    if class_names is not None and 1 <= label <= len(class_names):
        return str(class_names[label - 1])
    return str(label)


def to_uint8(image: Tensor) -> Tensor:
    """A float ``[3, H, W]`` image in 0..1 (or uint8) as uint8 on the CPU."""
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def binary_masks(masks: Tensor, threshold: float = 0.5) -> Tensor:
    """Masks ``[N, 1, H, W]`` probabilities or ``[N, H, W]`` (float, uint8, bool) -> bool ``[N, H, W]`` on the CPU."""
    masks = masks.detach().cpu()
    if masks.dim() == 4:
        masks = masks[:, 0]
    if masks.is_floating_point():
        return masks.float() > threshold
    return masks != 0


def select(prediction: dict[str, Tensor], score_threshold: float) -> dict[str, Tensor]:
    """The detections of one image whose score is at least ``score_threshold``."""
    keep = prediction["scores"].detach().cpu() >= score_threshold
    return {k: v.detach().cpu()[keep] for k, v in prediction.items() if k in ("boxes", "labels", "scores", "masks")}


def draw_instances(
    image: Tensor,
    instances: dict[str, Tensor],
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    alpha: float = 0.5,
    box_width: int = 1,
) -> Tensor:
    """Draws instance masks (one colour per instance), boxes and ``"<class> <score>"`` captions on an image.

    Args:
        image: float ``[3, H, W]`` in 0..1 (or uint8).
        instances: ``boxes [N, 4]`` xyxy pixels, ``labels [N]`` (1..K), optional ``scores [N]`` (ground
            truth has none) and optional ``masks`` (``[N, 1, H, W]`` probabilities or ``[N, H, W]``).
        class_names: names of labels 1..K.
        score_threshold: instances scoring below it are not drawn.
        mask_threshold: mask probabilities above it are foreground.

    Returns:
        uint8 ``[3, H, W]``.
    """
    canvas = to_uint8(image)
    scores = instances.get("scores")
    if scores is not None:
        instances = select(instances, score_threshold)
        scores = instances["scores"]
    boxes = instances["boxes"].detach().cpu().float().reshape(-1, 4)
    labels = instances["labels"].detach().cpu().tolist()
    if not labels:
        return canvas
    colors = instance_colors(len(labels))
    if "masks" in instances:
        canvas = draw_segmentation_masks(canvas, binary_masks(instances["masks"], mask_threshold), alpha=alpha, colors=colors)
    captions = [class_name(label, class_names) for label in labels]
    if scores is not None:
        captions = [f"{caption} {score:.2f}" for caption, score in zip(captions, scores.tolist())]
    # Captions in black on the instance colour: readable on any background.
    return draw_bounding_boxes(
        canvas, boxes, labels=captions, colors=colors, width=box_width, fill_labels=True, label_colors="black"
    )


def semantic_label_map(instances: dict[str, Tensor], image_size: tuple[int, int], mask_threshold: float = 0.5) -> np.ndarray:
    """Merges instance masks into one ``[H, W]`` int map of class labels (0 = background).

    W&B draws masks as semantic label maps, not instances. Where instances overlap, the one with the
    higher score (ground truth: the later one) is on top.
    """
    label_map = np.zeros(image_size, dtype=np.int64)
    if "masks" not in instances or len(instances["labels"]) == 0:
        return label_map
    masks = binary_masks(instances["masks"], mask_threshold).numpy()
    labels = instances["labels"].detach().cpu().numpy()
    scores = instances.get("scores")
    # Ascending score: the most confident instance is painted last.
    order = np.argsort(scores.detach().cpu().numpy(), kind="stable") if scores is not None else np.arange(len(labels))
    for i in order:
        label_map[masks[i]] = labels[i]
    return label_map


def wandb_boxes(instances: dict[str, Tensor], class_names: Sequence[str] | None) -> dict:
    """W&B ``box_data`` for one image: pixel coordinates, class ids and ``"<class> <score>"`` captions."""
    boxes = instances["boxes"].detach().cpu().tolist()
    labels = instances["labels"].detach().cpu().tolist()
    scores = instances["scores"].detach().cpu().tolist() if "scores" in instances else [None] * len(labels)
    box_data = []
    for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores):
        entry = {
            # Without "domain": "pixel" W&B reads the coordinates as fractions of the image size.
            "position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2},
            "domain": "pixel",
            "class_id": int(label),
            "box_caption": class_name(label, class_names) + ("" if score is None else f" {score:.2f}"),
        }
        if score is not None:
            entry["scores"] = {"score": float(score)}
        box_data.append(entry)
    return {"box_data": box_data, "class_labels": wandb_class_labels(class_names, labels)}


def wandb_class_labels(class_names: Sequence[str] | None, labels: Sequence[int] = ()) -> dict[int, str]:
    """``{0: "background", 1: name_1, ...}``, covering every label that occurs."""
    names = {0: "background"}
    for label in range(1, len(class_names or ()) + 1):
        names[label] = class_name(label, class_names)
    for label in labels:
        names.setdefault(int(label), class_name(int(label), class_names))
    return names
