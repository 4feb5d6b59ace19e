"""Box heads (2-fc MLP for FPN, res5 for C4), the box predictor, and the Fast R-CNN loss and inference."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import boxes as box_ops

from mrcnn.modeling.backbone import resnet_body, stage_channels
from mrcnn.modeling.nms import grouped_nms


class MLPBoxHead(nn.Module):
    """Two hidden fc layers on flattened pooled features (the FPN box head).

    Args:
        in_channels: channels of the pooled features.
        resolution: side of the pooled features (7).
        representation_size: width of both fc layers (1024).

    Shapes:
        ``[R, in_channels, resolution, resolution]`` -> ``[R, representation_size]``.
    """

    def __init__(self, in_channels: int, resolution: int = 7, representation_size: int = 1024):
        super().__init__()
        # Names follow torchvision's TwoMLPHead so its checkpoints load without renaming.
        self.fc6 = nn.Linear(in_channels * resolution**2, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.out_channels = representation_size

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class Res5BoxHead(nn.Module):
    """The C4 head: ResNet stage 5 (stride 2) on 14x14 pooled res4 features.

    Returns the 7x7 feature map rather than a pooled vector, so the C4 mask branch can run its
    deconvolution on the same res5 features (the paper's Fig. 4, left); the predictor averages it.

    Args:
        depth: ResNet depth, matching the backbone.
        norm: normalization, matching the backbone.
        weights_path: optional local torchvision ResNet state dict (its ``layer4`` is used).
        width: ResNet stem channels, matching the backbone (see ``resnet_body``).

    Shapes:
        ``[R, C4, 14, 14]`` -> ``[R, C5, 7, 7]``.
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", weights_path: str | None = None, width: int = 64):
        super().__init__()
        self.res5 = resnet_body(depth, norm, weights_path, width, part="C4 box head, which keeps its layer4").layer4
        self.out_channels = stage_channels(depth, 5, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.res5(x)


class BoxPredictor(nn.Module):
    """Classification scores over ``num_classes + 1`` (background is 0) and class-specific box deltas.

    Args:
        in_channels: feature size from the box head (a 4-D map is averaged over space first).
        num_classes: foreground classes K.

    Shapes:
        ``[R, in_channels]`` or ``[R, in_channels, h, w]`` -> scores ``[R, K+1]``, deltas ``[R, 4(K+1)]``.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, (num_classes + 1) * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 4:
            x = x.mean(dim=(2, 3))
        return self.cls_score(x), self.bbox_pred(x)


def fast_rcnn_loss(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    sampled: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fast R-CNN classification and box-regression losses over sampled RoIs.

    Args:
        class_logits: ``[R, K+1]``.
        box_regression: ``[R, 4(K+1)]`` class-specific deltas.
        labels: int64 ``[R]``, 0 for background.
        regression_targets: ``[R, 4]`` encoded deltas to the matched ground truth.
        sampled: ``None`` (every row is a sampled RoI), or bool ``[R]``: the rows that count, for the fixed-size RoI
            layout of ``RoIHeads(batched_sampling=True)``. The others get no weight (their targets may be anything,
            even non-finite), and R becomes the number of sampled rows; no host read either way but ``None``'s.

    Returns:
        (cross-entropy over all RoIs, smooth-L1 (beta 1/9) on the true class's deltas of
        positive RoIs, summed and divided by R).
    """
    if sampled is not None:
        return _fast_rcnn_loss_masked(class_logits, box_regression, labels, regression_targets, sampled)
    classification_loss = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(len(box_regression), -1, 4)[positive, labels[positive]]
    box_loss = F.smooth_l1_loss(deltas, regression_targets[positive], beta=1 / 9, reduction="sum")
    return classification_loss, box_loss / max(labels.numel(), 1)


def _fast_rcnn_loss_masked(
    class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor, sampled: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`fast_rcnn_loss` over the ``sampled`` rows only, as masked sums: the same values to float rounding."""
    count = sampled.sum().clamp(min=1)
    classification_loss = torch.where(sampled, F.cross_entropy(class_logits, labels, reduction="none"), 0.0).sum()
    deltas = box_regression.reshape(len(box_regression), -1, 4)
    deltas = deltas.gather(1, labels.clamp(min=0)[:, None, None].expand(-1, 1, 4))[:, 0]
    # where, not a product: a row that does not count may have non-finite targets, and inf * 0 is nan.
    positive = sampled & (labels > 0)
    targets = torch.where(positive[:, None], regression_targets, 0.0)
    box_loss = F.smooth_l1_loss(deltas, targets, beta=1 / 9, reduction="none").sum(dim=1)
    return classification_loss / count, torch.where(positive, box_loss, 0.0).sum() / count


def fast_rcnn_inference(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: list[Tensor],
    image_shapes: list[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Turn per-RoI class scores and deltas into final detections.

    Every (RoI, foreground class) pair is a candidate with its own decoded box; candidates below
    ``score_thresh`` or with tiny boxes are dropped, class-wise NMS runs, and the top
    ``detections_per_img`` by score are kept.

    Returns:
        per image: boxes ``[D, 4]``, scores ``[D]``, labels int64 ``[D]`` (1..K).
    """
    num_classes = class_logits.shape[-1]
    boxes_per_image = [len(p) for p in proposals]
    pred_boxes = box_coder.decode(box_regression, proposals).split(boxes_per_image)
    pred_scores = F.softmax(class_logits, -1)
    pred_scores = pred_scores.split(boxes_per_image)

    all_boxes, all_scores, all_labels = [], [], []
    for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
        # Drop the background column, then flatten candidates to one row per (RoI, class).
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        keep = torch.where(scores > score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        all_boxes.append(boxes[keep])
        all_scores.append(scores[keep])
        all_labels.append(labels[keep])
    return all_boxes, all_scores, all_labels


def fast_rcnn_inference_batched(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: Tensor,
    proposal_valid: Tensor,
    image_shapes: list[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """:func:`fast_rcnn_inference` for images with the same number of proposals (``RPN(batched_proposals=True)``),
    all at once, with one host read: how many detections each image has.

    The same candidates (every (RoI, foreground class) pair above ``score_thresh`` with a box of at least 0.01 px a
    side), the same class-wise NMS (:func:`mrcnn.modeling.nms.grouped_nms`, one group per (image, class), each in
    decreasing score order) and the same top ``detections_per_img`` by score: torchvision's detections up to the
    order of equal scores.

    Args:
        class_logits: ``[B * P, K]``; box_regression: ``[B * P, K * 4]``; proposals: ``[B, P, 4]``;
        proposal_valid: bool ``[B, P]`` (padding proposals are never detected).

    Returns:
        per image: boxes ``[D, 4]``, scores ``[D]``, labels int64 ``[D]`` (1..K-1), in decreasing score order.
    """
    num_images, num_proposals = proposals.shape[:2]
    num_classes = class_logits.shape[-1]
    boxes = box_coder.decode(box_regression, list(proposals.unbind())).view(num_images, num_proposals, -1, 4)
    boxes = torch.stack([box_ops.clip_boxes_to_image(b, shape) for b, shape in zip(boxes, image_shapes)])
    scores = F.softmax(class_logits, -1).view(num_images, num_proposals, num_classes)
    # NaN scores (a diverged head) too: sorted first, they would push candidates past each group's scan length below.
    scores = scores.masked_fill(~proposal_valid[..., None] | scores.isnan(), float("-inf"))
    # One group per (image, foreground class): [B, K-1, P], each in decreasing score order.
    scores, order = scores[..., 1:].transpose(1, 2).sort(dim=2, descending=True, stable=True)
    boxes = boxes[:, :, 1:].transpose(1, 2).gather(2, order[..., None].expand(-1, -1, -1, 4))
    above = scores > score_thresh
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    valid = above & (widths >= 1e-2) & (heights >= 1e-2)  # torchvision's remove_small_boxes(min_size=1e-2)
    segments = [(c * num_proposals, (c + 1) * num_proposals) for c in range(num_classes - 1)]
    flat_boxes = boxes.reshape(num_images, -1, 4)
    keep = grouped_nms(flat_boxes, valid.reshape(num_images, -1), segments, nms_thresh, above.sum(dim=2))
    scores = scores.reshape(num_images, -1).masked_fill(~keep, float("-inf"))
    top_scores, top = scores.topk(min(detections_per_img, scores.shape[1]), dim=1)
    counts = (top_scores > float("-inf")).sum(dim=1).tolist()  # the one host read
    top_boxes = flat_boxes.gather(1, top[..., None].expand(-1, -1, 4))
    top_labels = top // num_proposals + 1
    return (
        [b[:n] for b, n in zip(top_boxes, counts)],
        [s[:n] for s, n in zip(top_scores, counts)],
        [c[:n] for c, n in zip(top_labels, counts)],
    )
