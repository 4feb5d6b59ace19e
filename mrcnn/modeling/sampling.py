"""Matching and balanced sampling for all images at once, without waiting on the host (issue 22).

torchvision's ``Matcher`` and ``BalancedPositiveNegativeSampler`` work one image at a time, with boolean indexing
and ``nonzero`` (a host sync each). These do the same for a batch padded to a common number of ground-truth boxes:
the matching is the same arithmetic (same labels, bit for bit); the sampler draws a uniform random subset of the same
size as torchvision's, by the top ``k`` of uniform random keys instead of ``randperm``: the same distribution, other
draws.
"""

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1  # torchvision's Matcher.BELOW_LOW_THRESHOLD
BETWEEN_THRESHOLDS = -2  # torchvision's Matcher.BETWEEN_THRESHOLDS


def pad_boxes(boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per image ``[G_i, 4]`` boxes as one ``[B, G, 4]`` tensor (``G = max G_i``, at least 1) and its bool ``[B, G]``
    validity. The lengths are shapes, known on the host: no sync."""
    size = max([1] + [len(b) for b in boxes])
    padded = boxes[0].new_zeros((len(boxes), size, 4))
    valid = torch.zeros((len(boxes), size), dtype=torch.bool, device=padded.device)
    for i, b in enumerate(boxes):
        padded[i, : len(b)] = b
        valid[i, : len(b)] = True
    return padded, valid


def upcast(boxes: Tensor) -> Tensor:
    """float16 / bfloat16 boxes as float32 (torchvision's ``_upcast``); float32, float64 and integer boxes as they
    are."""
    return boxes.float() if boxes.is_floating_point() and boxes.element_size() < 4 else boxes


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``torchvision.ops.box_iou`` per image, with the same arithmetic: ``[B, N, 4]`` x ``[B, M, 4]`` -> ``[B, N, M]``.

    The intersection's width and height are computed one at a time, so the largest temporaries are ``[B, N, M]``
    (torchvision's corners are ``[N, M, 2]`` pairs): at COCO's settings the RPN's table is every anchor of every
    image against the batch's most ground-truth boxes (8 x 30 x 242,000 floats: 0.23 GB a tensor). Half-precision
    boxes are upcast to float32 first, as torchvision's are: in float16 an area above 65504 px^2 is infinite and its
    IoU NaN, which :func:`match` would take for a match (``NaN < low`` is false).
    """
    boxes1, boxes2 = upcast(boxes1), upcast(boxes2)
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    a, b = boxes1[:, :, None, :], boxes2[:, None, :, :]
    width = (torch.min(a[..., 2], b[..., 2]) - torch.max(a[..., 0], b[..., 0])).clamp_(min=0)
    height = (torch.min(a[..., 3], b[..., 3]) - torch.max(a[..., 1], b[..., 1])).clamp_(min=0)
    inter = width.mul_(height)
    del height
    union = (area1[:, :, None] + area2[:, None, :]).sub_(inter)
    return inter.div_(union)


def match(
    iou: Tensor, gt_valid: Tensor, high: float, low: float, allow_low_quality_matches: bool = False
) -> tuple[Tensor, Tensor]:
    """torchvision's ``Matcher`` for a batch: the ground truth each prediction matches, or why none.

    Args:
        iou: ``[B, G, P]`` IoU of each (padded) ground-truth box with each prediction.
        gt_valid: bool ``[B, G]``, ``False`` for padding ground truth (never matched).
        high, low: IoU thresholds: ``>= high`` matches, ``< low`` is background, between is ignored.
        allow_low_quality_matches: also match each ground truth's best predictions (ties included), as torchvision.

    Returns:
        matched: int64 ``[B, P]`` index into the ground truth, or ``BELOW_LOW_THRESHOLD`` / ``BETWEEN_THRESHOLDS``
        (an image without ground truth: all ``BELOW_LOW_THRESHOLD``); best: int64 ``[B, P]`` the best ground truth's
        index whatever the IoU (0 without ground truth), for gathering targets.
    """
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)  # below any threshold, and never a maximum of a real box
    values, best = iou.max(dim=1)
    matched = torch.where(values < low, BELOW_LOW_THRESHOLD, torch.where(values < high, BETWEEN_THRESHOLDS, best))
    if allow_low_quality_matches:
        # Predictions whose IoU with some real ground truth equals that ground truth's best IoU (torchvision's
        # set_low_quality_matches_, which keeps the prediction's own best match, ``best``).
        best_per_gt = iou.max(dim=2, keepdim=True).values
        low_quality = ((iou == best_per_gt) & gt_valid[:, :, None]).any(dim=1)
        matched = torch.where(low_quality, best, matched)
    return matched, best


def sample(labels: Tensor, batch_size_per_image: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` for a batch, without ``nonzero`` or ``randperm``.

    Per image, ``min(#positives, int(batch_size_per_image * positive_fraction))`` positives and
    ``min(#negatives, batch_size_per_image - that)`` negatives, each a uniform random subset: the top of uniform
    random keys (a uniform random permutation's first elements, as torchvision's ``randperm`` takes them).

    Args:
        labels: ``[B, P]``: ``>= 1`` positive, ``0`` negative, ``-1`` ignored.

    Returns:
        positive, negative: bool ``[B, P]`` masks of the sampled predictions.
    """
    positive, negative = labels >= 1, labels == 0
    max_positives = int(batch_size_per_image * positive_fraction)
    num_pos = positive.sum(dim=1, keepdim=True).clamp(max=max_positives)
    num_neg = negative.sum(dim=1, keepdim=True).clamp(max=batch_size_per_image - num_pos)
    keys = torch.rand(labels.shape, device=labels.device)
    return _top_random(positive, keys, num_pos, max_positives), _top_random(
        negative, keys, num_neg, batch_size_per_image
    )


def _top_random(candidates: Tensor, keys: Tensor, count: Tensor, most: int) -> Tensor:
    """The ``count`` (``[B, 1]``, at most ``most``) candidates with the largest keys, per row, as a bool mask."""
    k = min(most, candidates.shape[1])
    chosen = torch.zeros_like(candidates)
    if k == 0:
        return chosen
    # Non-candidates get -1 < every key: the top ``count`` are candidates since ``count <= #candidates``.
    _, top = keys.masked_fill(~candidates, -1.0).topk(k, dim=1)
    take = torch.arange(k, device=keys.device)[None, :] < count
    return chosen.scatter_(1, top, take)
