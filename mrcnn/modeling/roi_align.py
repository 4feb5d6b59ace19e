"""RoIAlign with a fast CPU backward pass.

torchvision's CPU ``roi_align`` backward walks every RoI, channel, bin and sample in one thread
with scalar adds; on this project's CPU benchmark it was the largest single cost of a training
step (53% of a ResNet-C5 step, 17-27% of C4 and FPN steps). The forward pass is fine.

RoIAlign is linear in the feature map: every output is a fixed weighted sum of feature pixels,
with the weights set by the boxes alone. So its gradient is one sparse matrix product,
``grad_features[n*H*W, C] = A^T @ grad_output[R*P*P, C]``, which runs multi-threaded and
vectorised over channels. The weights here follow torchvision's CPU kernel sample for sample
(sample positions, the ``[-1, size]`` validity window, edge clamping, the ``max(size, 1)`` of
unaligned boxes, and the division by the sample count), so gradients equal torchvision's up to
float rounding (tested in ``tests/test_poolers.py``).

The forward pass is torchvision's own kernel, so outputs are bit-identical. CUDA tensors, an
adaptive sampling ratio (``<= 0``, where the grid differs per RoI), feature maps narrower than
``MIN_CHANNELS`` (where the fixed cost of building the matrix was not always repaid) and inputs that need no
gradient go to torchvision unchanged.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torchvision.ops import roi_align as tv_roi_align


def _axis_weights(
    start: Tensor, length: Tensor, size: int, bins: int, samples: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps of RoIAlign's samples along one axis (y or x), as in torchvision's kernel.

    Args:
        start: ``[R]`` RoI start on the feature grid.
        length: ``[R]`` RoI length on the feature grid.
        size: feature map length along this axis (H or W).
        bins: pooled output length along this axis.
        samples: samples per bin along this axis.

    Returns:
        ``(low, high, w_low, w_high)``, each ``[R, bins, samples]``: the two neighbouring pixel
        indices of every sample and their weights (zero for samples outside ``[-1, size]``).
    """
    bin_size = (length / bins)[:, None, None]
    steps = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    offsets = torch.arange(samples, dtype=start.dtype, device=start.device)[None, None, :] + 0.5
    # Same association as the kernel: start + bin * size + (i + 0.5) * size / samples.
    pos = start[:, None, None] + steps * bin_size + offsets * bin_size / samples
    valid = (pos >= -1.0) & (pos <= size)
    # Skipped samples (also inf / NaN boxes) go to position 0 with weight 0: indices stay in range.
    pos = torch.where(valid, pos, torch.zeros_like(pos)).clamp(min=0.0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    # At the edge the kernel snaps the sample onto the last pixel: all weight on `low`.
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    w_low = (1.0 - frac) * valid
    w_high = frac * valid
    return low, high, w_low, w_high


def roi_align_weights(
    rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int, aligned: bool, shape: tuple[int, ...]
) -> Tensor:
    """RoIAlign's transpose as a sparse matrix: ``output[R*P*P, C] = A @ features[N*H*W, C]``; this returns ``A^T``.

    Args:
        rois: ``[R, 5]`` (batch index, x1, y1, x2, y2) in image pixels.
        output_size: P, the pooled side.
        spatial_scale: feature pixels per image pixel.
        sampling_ratio: samples per bin side (> 0).
        aligned: half-pixel offset (Detectron2's correction).
        shape: ``(N, C, H, W)`` of the feature map.

    Returns:
        Sparse CSR ``A^T`` of shape ``[N*H*W, R*P*P]`` (duplicate taps summed), the map from
        output gradients to feature gradients.
    """
    n, _, height, width = shape
    if rois.dtype not in (torch.float32, torch.float64):
        rois = rois.float()  # bf16 / fp16 box coordinates would misplace samples by whole pixels
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * spatial_scale - offset
    y0 = rois[:, 2] * spatial_scale - offset
    w = rois[:, 3] * spatial_scale - offset - x0
    h = rois[:, 4] * spatial_scale - offset - y0
    if not aligned:
        # Legacy behaviour: force malformed boxes to at least 1x1.
        w = w.clamp(min=1.0)
        h = h.clamp(min=1.0)
    p, s = output_size, sampling_ratio
    ylo, yhi, wylo, wyhi = _axis_weights(y0, h, height, p, s)  # [R, P, s]
    xlo, xhi, wxlo, wxhi = _axis_weights(x0, w, width, p, s)
    ys = torch.stack([ylo, yhi], -1)  # [R, P, s, 2]
    wy = torch.stack([wylo, wyhi], -1)
    xs = torch.stack([xlo, xhi], -1)
    wx = torch.stack([wxlo, wxhi], -1)
    num_rois = rois.shape[0]
    # Broadcast to [R, Py, Px, sy, sx, 2, 2]: every sample of every bin with its four taps.
    ys = ys[:, :, None, :, None, :, None]
    wy = wy[:, :, None, :, None, :, None]
    xs = xs[:, None, :, None, :, None, :]
    wx = wx[:, None, :, None, :, None, :]
    batch = rois[:, 0].long()[:, None, None, None, None, None, None]
    cols = (batch * height + ys) * width + xs
    values = (wy * wx) / (s * s)
    rows = torch.arange(num_rois * p * p, device=rois.device).view(num_rois, p, p, 1, 1, 1, 1)
    shape7 = (num_rois, p, p, s, s, 2, 2)
    rows, cols, values = rows.expand(shape7), cols.expand(shape7), values.expand(shape7)
    # Taps of invalid samples keep their zero weight: filtering them out costs more than it saves.
    indices = torch.stack([cols.reshape(-1), rows.reshape(-1)])
    matrix = torch.sparse_coo_tensor(
        indices, values.reshape(-1), (n * height * width, num_rois * p * p), check_invariants=False
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.coalesce().to_sparse_csr()


class _RoIAlignFunction(torch.autograd.Function):
    """torchvision's forward; the backward as one sparse product (see the module docstring)."""

    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (output_size, spatial_scale, sampling_ratio, aligned, tuple(features.shape), features.dtype)
        return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    @once_differentiable  # as torchvision's: no double backward
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        output_size, spatial_scale, sampling_ratio, aligned, shape, dtype = ctx.args
        n, c, h, w = shape
        # Accumulate in float32 (float64 for float64): the sparse kernel has no bf16 / fp16 version, and
        # sums over many samples are more accurate there anyway.
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        matrix_t = roi_align_weights(rois, output_size, spatial_scale, sampling_ratio, aligned, shape).to(compute)
        # [R, C, P, P] -> [R*P*P, C]: one row per pooled cell, channels contiguous.
        grad = grad_output.permute(0, 2, 3, 1).reshape(-1, c).to(compute)
        grad_features = (matrix_t @ grad).view(n, h, w, c).permute(0, 3, 1, 2)
        return grad_features.to(dtype).contiguous(), None, None, None, None, None


# Building the sparse matrix is a fixed cost per call; the product pays it back with the channel count.
# From 128 channels it won in every measurement (3.4-4x for C4/C5 shapes). At 64 it won on two idle cores
# (2.1x) but lost single-threaded on a loaded machine; whole training steps with 64-channel maps (model=small's
# FPN, the narrow C4 of the backbone ablations) were still 12-21% faster with it on two idle cores, so 64 is
# the line; narrower maps keep torchvision's kernel (benchmarks/roi_align_backward.py, benchmarks/README.md).
MIN_CHANNELS = 64


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align`` (square output, ``rois [R, 5]``) with a fast CPU backward.

    Args:
        features: ``[N, C, H, W]`` feature map.
        rois: ``[R, 5]`` (batch index, x1, y1, x2, y2) in image pixels (a list of boxes goes to torchvision).
        output_size: side P of the pooled square (a ``(h, w)`` tuple goes to torchvision).
        spatial_scale: feature pixels per image pixel.
        sampling_ratio: bilinear samples per bin side; ``<= 0``: adaptive (torchvision's backward).
        aligned: half-pixel offset.

    Returns:
        ``[R, C, P, P]`` pooled features.
    """
    fast = (
        isinstance(rois, Tensor)
        and isinstance(output_size, int)
        and features.device.type == "cpu"
        and sampling_ratio > 0
        and features.shape[1] >= MIN_CHANNELS
        and features.requires_grad
        and torch.is_grad_enabled()
        and rois.numel() > 0
    )
    if not fast:
        return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _RoIAlignFunction.apply(features, rois, output_size, float(spatial_scale), int(sampling_ratio), aligned)
