"""RoI feature extraction: the RoIPool / RoIWarp / RoIAlign switch of the paper's Table 2c.

Every pooler here shares the same two steps:

1. Level assignment. With one feature map (C4 / C5) every RoI reads that map. With an
   FPN pyramid each RoI reads level ``floor(k0 + log2(sqrt(wh) / 224))`` (FPN paper, eq. 1),
   clamped to the available levels. The stride of each level is inferred from the
   feature-map size relative to the (padded) batch image size, exactly as torchvision's
   ``MultiScaleRoIAlign`` does, so ``RoIAlignPooler(aligned=False, sampling_ratio=2)``
   reproduces torchvision's Mask R-CNN pooler bit for bit.
2. The per-level operator, which is what the variants differ in.

A pooler option is configured once (``configs/model/pooler/*.yaml``, a partial without ``output_size``)
and the RoI heads build it twice, at the box and at the mask resolution, so the two cannot drift apart.

All kernels come from ``torchvision.ops``; on the CPU, RoIAlign's backward pass is our own
(``mrcnn.modeling.roi_align``), which gives torchvision's gradients several times faster.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torchvision.ops import roi_pool

from mrcnn.modeling.roi_align import BACKWARDS, needs_deterministic_path, roi_align


def boxes_to_rois(boxes: list[Tensor]) -> Tensor:
    """Concatenate per-image boxes into the ``[R, 5]`` (batch_index, x1, y1, x2, y2) format."""
    rois = torch.cat(boxes, dim=0)
    if len({len(b) for b in boxes}) == 1:  # a fixed count per image (the batched paths): one index for all
        index = torch.arange(len(boxes), dtype=rois.dtype, device=rois.device)
        batch_index = index[:, None].expand(len(boxes), len(boxes[0])).reshape(-1, 1)
    else:
        batch_index = torch.cat(
            [torch.full((len(b), 1), i, dtype=rois.dtype, device=rois.device) for i, b in enumerate(boxes)], dim=0
        )
    return torch.cat([batch_index, rois], dim=1)


def infer_scale(feature_size: int, image_size: int) -> float:
    """Stride-reciprocal of a feature map (e.g. 1/4, 1/8), from its height and the largest image's unpadded height.

    The batch is padded to a multiple of the largest stride, so the map spans ``stride`` pixels a row and the image
    less than a row fewer: ``image_size / feature_size`` lies in ``(stride / 2, stride]`` for any image taller than
    half that multiple, and the stride is the power of two it rounds up to. (torchvision rounds ``log2`` to the
    nearest, which is the same at the usual sizes and wrong at some small ones: a stride-32 map of a 40-pixel-high
    batch, 2 rows, gave 1/16.)
    """
    return 2.0 ** -math.ceil(math.log2(image_size / feature_size) - 1e-9)


def assign_levels(
    boxes: list[Tensor], k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4
) -> Tensor:
    """FPN level of each box (eq. 1 of the FPN paper), as an index into ``k_min..k_max``.

    Args:
        boxes: per-image boxes ``[R_i, 4]`` xyxy in (resized) image pixels.

    Returns:
        int64 ``[R]`` with values in ``0 .. k_max - k_min``.
    """
    all_boxes = torch.cat(boxes, dim=0)
    widths = all_boxes[:, 2] - all_boxes[:, 0]
    heights = all_boxes[:, 3] - all_boxes[:, 1]
    scale = torch.sqrt(widths * heights)
    # The small epsilon keeps boxes exactly on a level boundary on the upper level, as torchvision does.
    level = torch.floor(canonical_level + torch.log2(scale / canonical_scale) + torch.tensor(1e-6, dtype=scale.dtype))
    level = torch.clamp(level, min=k_min, max=k_max)
    return (level.to(torch.int64) - k_min).to(torch.int64)


class RoIPooler(nn.Module):
    """Base class: picks the feature level of each RoI and calls :meth:`pool_level` per level.

    Args:
        featmap_names: names of the backbone outputs to pool from, finest first
            (e.g. ``["0", "1", "2", "3"]`` for FPN P2-P5, ``["0"]`` for C4).
        output_size: side of the pooled square (7 for box heads, 14 for mask heads).
        canonical_scale: box side that maps to ``canonical_level`` (224 in the FPN paper).
        canonical_level: k0 in the FPN paper (4).
    """

    def __init__(
        self, featmap_names: list[str], output_size: int, canonical_scale: int = 224, canonical_level: int = 4
    ):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = int(output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def pool_level(self, feature: Tensor, rois: Tensor, spatial_scale: float) -> Tensor:
        """Pool ``rois [R, 5]`` from one feature map ``[B, C, H, W]`` into ``[R, C, S, S]``."""
        raise NotImplementedError

    def forward(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
        valid: Tensor | None = None,
        num_valid: int | None = None,
    ) -> Tensor:
        """
        Args:
            features: backbone outputs, each ``[B, C, H_l, W_l]``.
            boxes: per-image RoIs ``[R_i, 4]`` xyxy in resized-image pixels.
            image_shapes: per-image ``(H, W)`` after resizing, before padding.
            valid: ``None`` (pool every RoI), or bool ``[sum R_i]``: pool only these RoIs, e.g. the positives among
                ``RoIHeads(batched_sampling=True)``'s fixed slots. Their number is read on the host together with
                the level sizes, in the one read a pyramid needs anyway (a single map: one read of the count).
            num_valid: how many rows ``valid`` sets, where the caller knows it already: a single map then reads
                nothing (a pyramid still reads its level sizes).

        Returns:
            ``[sum R_i, C, S, S]`` pooled features, in the order of ``boxes``; with ``valid``, ``[V, C, S, S]``
            for its ``V`` set rows, in the same order.
        """
        maps = [features[name] for name in self.featmap_names]
        max_h = max(s[0] for s in image_shapes)
        scales = [infer_scale(m.shape[-2], max_h) for m in maps]
        rois = boxes_to_rois(boxes)
        if len(maps) == 1:
            if valid is not None:
                # The set rows, in order (a stable sort puts them first), after one read of their count.
                count = int(valid.sum()) if num_valid is None else num_valid
                rois = rois[torch.argsort(~valid, stable=True)[:count]]
            return self.pool_level(maps[0], rois, scales[0])

        k_min = int(-math.log2(scales[0]))
        k_max = int(-math.log2(scales[-1]))
        levels = assign_levels(boxes, k_min, k_max, self.canonical_scale, self.canonical_level)
        if valid is not None:
            levels = torch.where(valid, levels, len(maps))  # one more group, never pooled
        # RoIs grouped by level (a stable sort keeps their order within a level, so each level pools, and its
        # backward accumulates, exactly as with one selection per level), then one host read of the group sizes
        # where a selection per level would make a GPU wait once per level.
        order = torch.argsort(levels, stable=True)
        groups = torch.arange(len(maps) + (valid is not None), device=levels.device)
        sizes = (levels[None, :] == groups[:, None]).sum(dim=1).tolist()
        pooled = [
            self.pool_level(feature, group, scale)
            for feature, group, scale in zip(maps, rois[order].split(sizes), scales)
        ]
        count = sum(sizes[: len(maps)])
        out = rois.new_zeros((count, maps[0].shape[1], self.output_size, self.output_size), dtype=maps[0].dtype)
        index = order[:count]
        if valid is not None:
            index = (torch.cumsum(valid, dim=0) - 1)[index]  # a pooled RoI's row: its place among the valid ones
        out[index] = torch.cat([p.to(out.dtype) for p in pooled])
        return out


def bilinear_bins(
    feature: Tensor,
    rois: Tensor,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    mode: str,
    backward: str,
) -> Tensor:
    """RoIAlign's bilinear samples, reduced per bin by their average (``mode="avg"``: RoIAlign itself) or their max.

    For the max, a grid of ``S*r x S*r`` sub-bins with one sample at each centre places samples exactly where
    RoIAlign with sampling ratio ``r`` places them; max-pooling ``r x r`` groups gives the per-bin max.

    Shapes:
        ``feature [B, C, H, W]``, ``rois [R, 5]`` -> ``[R, C, S, S]``.
    """
    if mode == "avg":
        return roi_align(feature, rois, output_size, spatial_scale, sampling_ratio, aligned, backward)
    r = sampling_ratio
    samples = roi_align(feature, rois, output_size * r, spatial_scale, 1, aligned, backward)
    return F.max_pool2d(samples, kernel_size=r, stride=r)


def _check_reduction(name: str, mode: str, sampling_ratio: int, backward: str) -> None:
    if mode not in ("avg", "max"):
        raise ValueError(f"{name} mode must be 'avg' or 'max', got {mode!r}")
    if mode == "max" and sampling_ratio <= 0:
        raise ValueError(f"{name}(mode='max') needs a fixed sampling_ratio > 0")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")


class RoIAlignPooler(RoIPooler):
    """RoIAlign (Mask R-CNN paper, Sec. 3): no quantization, bilinear samples averaged or maxed per bin.

    Args:
        sampling_ratio: bilinear samples per bin side; ``<= 0`` lets the kernel pick
            ``ceil(roi_size / output_size)`` per RoI (only valid for ``mode="avg"``).
        aligned: shift boxes by -0.5 pixel so pixel centres line up (Detectron2's fix).
            torchvision's Mask R-CNN uses ``False``; keep it for parity with its weights.
        mode: ``"avg"`` (the paper's default) or ``"max"`` over the samples of a bin
            (Table 2c compares both).
        backward: CPU backward of the RoIAlign kernel (``mrcnn.modeling.roi_align.choose_backward``):
            ``"auto"``, or ``"torchvision"`` / ``"sparse"`` / ``"separable"`` to force one (benchmarks).
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int,
        sampling_ratio: int = 2,
        aligned: bool = False,
        mode: str = "avg",
        canonical_scale: int = 224,
        canonical_level: int = 4,
        backward: str = "auto",
    ):
        super().__init__(featmap_names, output_size, canonical_scale, canonical_level)
        _check_reduction(type(self).__name__, mode, sampling_ratio, backward)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.mode = mode
        self.backward = backward

    def pool_level(self, feature: Tensor, rois: Tensor, spatial_scale: float) -> Tensor:
        return bilinear_bins(
            feature, rois, self.output_size, spatial_scale, self.sampling_ratio, self.aligned, self.mode, self.backward
        )


class RoIPoolPooler(RoIPooler):
    """RoIPool (Fast R-CNN): box and bins quantized to the feature grid, max over each bin.

    torchvision's kernel rounds each RoI corner to the nearest feature cell (:func:`round_like_roi_pool`) and
    takes the cells from the first to the last corner, both included.
    """

    # The reduction over each bin, for reports (RoIPool has only max).
    mode = "max"

    def pool_level(self, feature: Tensor, rois: Tensor, spatial_scale: float) -> Tensor:
        # torchvision's kernel needs one dtype for the features and the boxes. Under autocast they differ (bf16
        # features, float32 boxes), and torchvision's autocast wrapper of roi_pool exists only for CUDA (on the CPU
        # the kernel refuses the pair) and returns the argmax as a float tensor (which the deterministic backward
        # cannot index with). So pool outside autocast, in float32 where the dtypes differ, as that wrapper does;
        # the max of bf16 values is exact in float32, and the result goes back to the features' dtype.
        dtype = feature.dtype
        if rois.dtype != dtype:
            feature, rois = feature.float(), rois.float()
        with torch.autocast(feature.device.type, enabled=False):
            if feature.requires_grad and torch.is_grad_enabled() and needs_deterministic_path(feature):
                pooled = _DeterministicRoIPool.apply(feature, rois, self.output_size, float(spatial_scale))
            else:
                pooled = roi_pool(feature, rois, self.output_size, spatial_scale)
        return pooled.to(dtype)


class _DeterministicRoIPool(torch.autograd.Function):
    """torchvision's RoIPool with a backward that is deterministic on a GPU (``trainer.deterministic=true``).

    torchvision's CUDA backward adds each bin's gradient into its max cell with atomic adds (and raises under
    deterministic algorithms). The forward's argmax says which cell each output came from, so the gradient is one
    ``index_add_``, which torch runs deterministically in that mode.
    """

    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale):
        output, argmax = torch.ops.torchvision.roi_pool(features, rois, spatial_scale, output_size, output_size)
        ctx.save_for_backward(rois, argmax)
        ctx.shape = tuple(features.shape)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rois, argmax = ctx.saved_tensors
        n, c, h, w = ctx.shape
        # Flat index of each output's max cell in [N, C, H, W]; empty bins (argmax -1) add zero to cell 0.
        batch = rois[:, 0].long()[:, None, None, None]
        channel = torch.arange(c, device=argmax.device)[None, :, None, None]
        index = (batch * c + channel) * (h * w) + argmax.clamp(min=0)
        values = grad_output * (argmax >= 0)
        grad = grad_output.new_zeros(n * c * h * w).index_add_(0, index.reshape(-1), values.reshape(-1))
        return grad.view(n, c, h, w), None, None, None


def round_like_roi_pool(x: Tensor) -> Tensor:
    """Round to the nearest integer, halves away from zero: C's ``round()``, which torchvision's RoIPool kernel
    applies to the scaled RoI corners. (``torch.round`` rounds halves to even, so a corner at exactly half a
    cell, e.g. x = 40 at stride 16, would land on a different cell: 2 instead of RoIPool's 3.)

    Exact for every float: ``x - trunc(x)`` is computed without rounding error, where ``floor(|x| + 0.5)``
    would round 0.49999997 up.
    """
    whole = torch.trunc(x)
    half = (x - whole).abs() == 0.5
    return torch.where(half, whole + torch.sign(x), torch.round(x))


class RoIWarpPooler(RoIPooler):
    """RoIWarp (MNC, as compared in the paper's Table 2c): the RoI is quantized to the feature grid exactly as
    RoIPool quantizes it, then bilinearly sampled like RoIAlign, with the average or the max per bin.

    RoIPool reads the feature cells from ``round(x1 * s)`` to ``round(x2 * s)``, both included
    (:func:`round_like_roi_pool`). RoIWarp samples the segment between those two cells' positions, so both
    read the same cells and differ only in how they sample them: the max over whole cells per bin, or
    bilinear samples. The segment is passed to RoIAlign as ``aligned=True`` boxes shifted by half a cell,
    which RoIAlign does not widen to one cell as it does ``aligned=False`` boxes: an RoI quantized to a
    single cell reads only that cell, as in RoIPool.

    Args:
        sampling_ratio: bilinear samples per bin side, ``> 0`` (RoIAlign's adaptive choice gives an RoI
            quantized to one cell no samples at all).
        mode: ``"avg"`` or ``"max"`` over each bin's samples (Table 2c has both RoIWarp rows).
        backward: CPU backward of the bilinear sampling, as for :class:`RoIAlignPooler`.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int,
        sampling_ratio: int = 2,
        mode: str = "avg",
        canonical_scale: int = 224,
        canonical_level: int = 4,
        backward: str = "auto",
    ):
        super().__init__(featmap_names, output_size, canonical_scale, canonical_level)
        _check_reduction(type(self).__name__, mode, sampling_ratio, backward)
        if sampling_ratio <= 0:
            raise ValueError("RoIWarpPooler needs a fixed sampling_ratio > 0")
        self.sampling_ratio = sampling_ratio
        self.mode = mode
        self.backward = backward

    def pool_level(self, feature: Tensor, rois: Tensor, spatial_scale: float) -> Tensor:
        # Corners on RoIPool's cells, then +0.5 cell for aligned=True (which subtracts it again), in image pixels.
        quantized = rois.clone()
        quantized[:, 1:] = (round_like_roi_pool(rois[:, 1:] * spatial_scale) + 0.5) / spatial_scale
        return bilinear_bins(
            feature, quantized, self.output_size, spatial_scale, self.sampling_ratio, True, self.mode, self.backward
        )
