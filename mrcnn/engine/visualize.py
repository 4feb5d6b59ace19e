"""Drawing predictions: instance overlays (prediction PNGs, W&B) and semantic label maps (W&B masks).

Shared by ``mrcnn.engine.predict`` (overlay files) and ``mrcnn.engine.callbacks.PredictionOverlays`` (W&B images), so a
picture on W&B and a picture on disk are drawn by the same code.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

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


def save_png(image: Tensor, path: str | Path) -> None:
    """Writes a uint8 ``[3, H, W]`` host image as a PNG file (with PIL: torchvision 0.29 deprecates its encoders)."""
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, format="PNG")


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


# Pictures smaller than this (longer side, pixels) are enlarged by a whole factor before drawing, so that
# captions stay legible beside small objects.
MIN_DRAWING_SIZE = 512
CAPTION_FONT_SIZE = 13


def drawing_scale(height: int, width: int, min_size: int = MIN_DRAWING_SIZE) -> int:
    """The whole factor that brings an image's longer side to at least ``min_size`` (1 for large images)."""
    return max(1, math.ceil(min_size / max(height, width, 1)))


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_captions(
    boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]
) -> list[tuple[float, float, float, float]]:
    """Where each caption goes: beside its own box, not over any box's object, not over another caption.

    Captions are placed in order (draw the most confident first). Each tries spots just outside its box
    (above, below, right, left, flush with either corner) and takes one inside the image that covers no
    caption placed before, preferring one that covers no other box either; only when every such spot is
    taken does it try the same spots moved further out. Failing all, it goes on the top of its own box.

    Args:
        boxes: ``[N, 4]`` xyxy pixels.
        sizes: per caption ``(width, height)`` in pixels.
        image_size: ``(height, width)``.

    Returns:
        ``N`` rectangles ``(x1, y1, x2, y2)``.
    """
    height, width = image_size
    placed: list[tuple[float, float, float, float]] = []
    all_boxes = [tuple(float(v) for v in box) for box in boxes]
    for box, (w, h) in zip(all_boxes, sizes):
        x1, y1, x2, y2 = box
        fallback_x = min(max(x1, 0.0), max(width - w, 0.0))
        chosen = (fallback_x, max(y1, 0.0), fallback_x + w, max(y1, 0.0) + h)
        for step in range(4):  # further out each round, to get past captions already placed
            out_y, out_x = step * (h + 1), step * (w + 1)
            spots = [
                (x1, y1 - h - 1 - out_y),
                (x2 - w, y1 - h - 1 - out_y),  # above
                (x1, y2 + 1 + out_y),
                (x2 - w, y2 + 1 + out_y),  # below
                (x2 + 1 + out_x, y1),
                (x1 - w - 1 - out_x, y1),  # right, left
            ]
            rects = []
            for x, y in spots:
                x = min(max(x, 0.0), max(width - w, 0.0))
                rect = (x, y, x + w, y + h)
                if 0 <= y and y + h <= height and not _overlaps(rect, box):
                    rects.append(rect)
            free = [r for r in rects if not any(_overlaps(r, c) for c in placed)]
            clear = [r for r in free if not any(_overlaps(r, b) for b in all_boxes)]
            if free:
                chosen = (clear or free)[0]
                break
        placed.append(chosen)
    return placed


def draw_instances(
    image: Tensor,
    instances: dict[str, Tensor],
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    alpha: float = 0.5,
    box_width: int = 1,
    min_size: int = MIN_DRAWING_SIZE,
) -> Tensor:
    """Draws instance masks (one colour per instance), boxes and ``"<class> <score>"`` captions on an image.

    An image whose longer side is below ``min_size`` is enlarged by a whole factor first (each pixel
    becomes a block, so nothing is blurred), so captions are legible; captions sit beside their box
    (:func:`place_captions`), not over the object or each other.

    Args:
        image: float ``[3, H, W]`` in 0..1 (or uint8).
        instances: ``boxes [N, 4]`` xyxy pixels, ``labels [N]`` (1..K), optional ``scores [N]`` (ground
            truth has none) and optional ``masks`` (``[N, 1, H, W]`` probabilities or ``[N, H, W]``).
        class_names: names of labels 1..K.
        score_threshold: instances scoring below it are not drawn.
        mask_threshold: mask probabilities above it are foreground.
        min_size: enlarge smaller images to at least this longer side; 0 keeps the size.

    Returns:
        uint8 ``[3, s*H, s*W]``, ``s`` = :func:`drawing_scale`.
    """
    canvas = to_uint8(image)
    scale = drawing_scale(*canvas.shape[-2:], min_size) if min_size else 1
    if scale > 1:
        canvas = canvas.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    scores = instances.get("scores")
    if scores is not None:
        instances = select(instances, score_threshold)
        scores = instances["scores"]
    boxes = instances["boxes"].detach().cpu().float().reshape(-1, 4) * scale
    labels = instances["labels"].detach().cpu().tolist()
    if not labels:
        return canvas
    colors = instance_colors(len(labels))
    if "masks" in instances:
        masks = binary_masks(instances["masks"], mask_threshold)
        if scale > 1:
            masks = masks.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        canvas = blend_masks(canvas, masks, colors, alpha, scores)
    canvas = draw_bounding_boxes(canvas, boxes, colors=colors, width=box_width)
    captions = [class_name(label, class_names) for label in labels]
    if scores is not None:
        captions = [f"{caption} {score:.2f}" for caption, score in zip(captions, scores.tolist())]
    return _draw_captions(canvas, boxes, captions, colors, scores)


def blend_masks(
    canvas: Tensor, masks: Tensor, colors: list[tuple[int, int, int]], alpha: float, scores: Tensor | None = None
) -> Tensor:
    """``canvas`` with each mask's pixels blended with its colour; where masks overlap, the most confident one's
    colour (the first one's without ``scores``). torchvision's ``draw_segmentation_masks`` leaves a pixel under two
    masks without colour, blended towards black.

    Args:
        canvas: uint8 ``[3, H, W]``.
        masks: bool ``[N, H, W]``.
        colors: ``N`` RGB colours.
        alpha: the colour's share of a masked pixel.
        scores: ``[N]`` confidences, or ``None`` (ground truth).
    """
    if len(masks) == 0:
        return canvas
    order = torch.arange(len(masks)) if scores is None else scores.argsort(descending=True, stable=True)
    palette = torch.tensor(colors, dtype=torch.float32)[order]  # [N, 3], most confident first
    masks = masks[order]
    covered = masks.any(dim=0)
    first = masks.float().argmax(dim=0)  # the first mask over each pixel (0 where none: masked out below)
    layer = palette[first].permute(2, 0, 1)  # [3, H, W]
    blended = canvas.float() * (1 - alpha) + layer * alpha
    return torch.where(covered, blended.round().clamp(0, 255).to(torch.uint8), canvas)


def _draw_captions(canvas: Tensor, boxes: Tensor, captions: list[str], colors: list, scores: Tensor | None) -> Tensor:
    """Captions in black on the instance colour (readable on any background), most confident placed first."""
    font = ImageFont.load_default(size=CAPTION_FONT_SIZE)
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(picture)
    order = scores.argsort(descending=True, stable=True).tolist() if scores is not None else range(len(captions))
    order = list(order)
    sizes = []
    for i in order:
        left, top, right, bottom = draw.textbbox((0, 0), captions[i], font=font)
        sizes.append((right - left + 4, bottom - top + 4))  # 2 px of padding around the text
    rects = place_captions(boxes[order].tolist(), sizes, (picture.height, picture.width))
    for i, (x1, y1, x2, y2) in zip(order, rects):
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colors[i])
        left, top, _, _ = draw.textbbox((0, 0), captions[i], font=font)
        draw.text((x1 + 2 - left, y1 + 2 - top), captions[i], fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def semantic_label_map(
    instances: dict[str, Tensor], image_size: tuple[int, int], mask_threshold: float = 0.5
) -> np.ndarray:
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
