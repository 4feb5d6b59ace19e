"""RoIAlign with a fast CPU backward pass.

torchvision's CPU ``roi_align`` backward walks every RoI, channel, bin and sample in one thread
with scalar adds; on this project's CPU benchmark it was the largest single cost of a training
step (53% of a ResNet-C5 step, 17-27% of C4 and FPN steps). The forward pass is fine.

RoIAlign is linear in the feature map: every output is a fixed weighted sum of feature pixels,
with the weights set by the boxes alone. So its gradient is a fixed linear map of the output
gradient, computed here in one of two ways, whichever does less work for the map's size:

- ``sparse_backward``: one sparse product, ``grad_features[n*H*W, C] = A^T @ grad_output[R*P*P, C]``;
  its cost follows the number of samples, so it suits large maps (FPN's fine levels).
- ``separable_backward``: a sample's weight is a y weight times an x weight, so ``A`` factors into
  per-RoI ``[P, H]`` and ``[P, W]`` matrices and the gradient is a few dense products per image; its
  cost follows the map's side, so it suits small maps (C4, C5), where building the sparse matrix
  costs more than the product.

Both run multi-threaded and vectorised over channels. The weights follow torchvision's CPU kernel
sample for sample (sample positions, the ``[-1, size]`` validity window, edge clamping, the
``max(size, 1)`` of unaligned boxes, and the division by the sample count), so gradients equal
torchvision's up to float rounding (tested in ``tests/modeling/test_poolers.py``).

The forward pass is torchvision's own kernel, so outputs are bit-identical. Which backward runs is
decided once per call, at the forward, by :func:`choose_backward` from the map's and the output's sizes and
an explicit ``backward`` argument (``"auto"``, or one forced by a benchmark or a test). CUDA tensors and
inputs that need no gradient go to torchvision unchanged, but for one case: on a GPU under
``torch.use_deterministic_algorithms(True)`` (``trainer.deterministic=true``) the backward is the separable one,
which is deterministic there, where torchvision's (atomic adds) is not (:func:`deterministic_backward`).
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


def _roi_geometry(rois: Tensor, spatial_scale: float, aligned: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x0, y0, w, h)``, each ``[R]``: the RoIs on the feature grid, as torchvision's kernel computes them."""
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
    return x0, y0, w, h


def _axis_matrix(start: Tensor, length: Tensor, size: int, bins: int, samples: int) -> Tensor:
    """RoIAlign along one axis as a dense matrix: ``[R, bins, size]``, the weight of each feature row
    (or column) in each output bin, summed over the bin's samples and divided by their number.

    RoIAlign's weights factor into a y part and an x part (a sample's bilinear weight is ``wy * wx``, and
    it is skipped when y or x is out of range), so ``output[r, c] = Ay[r] @ features[n_r, c] @ Ax[r]^T``.
    """
    low, high, w_low, w_high = _axis_weights(start, length, size, bins, samples)
    matrix = start.new_zeros(start.shape[0], bins, size)
    matrix.scatter_add_(2, low, w_low)
    matrix.scatter_add_(2, high, w_high)
    return matrix / samples


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
    x0, y0, w, h = _roi_geometry(rois, spatial_scale, aligned)
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


# The separable backward's largest intermediate, the x-contracted gradient (``[RoIs, C, P, W]``), is made a chunk of
# RoIs of at most this many bytes at a time: all at once it would be 4.8 GB for 2,000 RoIs on FPN's P2 at 800 x 1344
# with 256 channels (on a GPU under trainer.deterministic=true, where this backward runs at every level).
SEPARABLE_CHUNK_BYTES = 256 * 2**20


def separable_backward(
    grad_output: Tensor,
    rois: Tensor,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    shape: tuple[int, ...],
    chunk_bytes: int = SEPARABLE_CHUNK_BYTES,
) -> Tensor:
    """RoIAlign's feature gradient from its separable weights: two dense matrix products per image.

    ``grad_features[n, c] = sum over the RoIs r of image n of Ay[r]^T @ grad_output[r, c] @ Ax[r]``
    (``_axis_matrix``). Its work grows with the map's side, so it suits small maps (C4, C5).

    Args:
        grad_output: ``[R, C, P, P]`` gradient of the pooled features, float32 or float64.
        rois, spatial_scale, sampling_ratio, aligned: as in ``roi_align``.
        shape: ``(N, C, H, W)`` of the feature map.
        chunk_bytes: the most bytes of the x-contracted gradient (``C * P * W`` values a RoI) made at once; an
            image with more RoIs takes several products, summed in a fixed order.

    Returns:
        ``[N, C, H, W]`` gradient of the feature map in ``grad_output``'s dtype (a permuted view, not
        contiguous).
    """
    n, c, height, width = shape
    num_rois, _, p, _ = grad_output.shape
    batch = rois[:, 0].long()
    # The RoIs in image order (a stable sort: the same order every run) and each image's count, read once: its RoIs
    # are then one slice, where a mask per image would read the device once per image.
    order = torch.argsort(batch, stable=True)
    counts = torch.zeros(n, dtype=torch.int64, device=batch.device).scatter_add_(0, batch, torch.ones_like(batch))
    counts = counts.tolist()  # (bincount would read the device twice: its output's size, then this)
    x0, y0, w, h = _roi_geometry(rois[order], spatial_scale, aligned)
    ay = _axis_matrix(y0, h, height, p, sampling_ratio).to(grad_output.dtype)  # [R, P, H]
    ax = _axis_matrix(x0, w, width, p, sampling_ratio).to(grad_output.dtype)  # [R, P, W]
    grad_output = grad_output[order].reshape(num_rois, c * p, p)
    per_roi = c * p * width * grad_output.element_size()
    step = max(1, chunk_bytes // max(per_roi, 1))
    grad = grad_output.new_zeros(n, height, c * width)
    first = 0
    # A loop over the images and, for images with many RoIs, over chunks of them; never over RoIs or pixels.
    for image, count in enumerate(counts):
        for begin in range(first, first + count, step):
            end = min(begin + step, first + count)
            k = end - begin
            # Contract the x bins first, one product per RoI: [k, C*Py, Px] @ [k, Px, W] -> [k, C*Py, W].
            partial = torch.bmm(grad_output[begin:end], ax[begin:end])
            # Rows (r, py), columns (c, x), for the image's product over (r, py): [H, k*P] @ [k*P, C*W].
            partial = partial.view(k, c, p, width).permute(0, 2, 1, 3).reshape(k * p, c * width)
            grad[image] += ay[begin:end].reshape(k * p, height).T @ partial
        first += count
    return grad.view(n, height, c, width).permute(0, 2, 1, 3)


def sparse_backward(
    grad_output: Tensor, rois: Tensor, spatial_scale: float, sampling_ratio: int, aligned: bool, shape: tuple[int, ...]
) -> Tensor:
    """RoIAlign's feature gradient as one sparse product, ``A^T @ grad_output`` (``roi_align_weights``).

    Its work grows with the number of samples, not the map's size, so it suits large maps (FPN levels).
    Arguments and result as ``separable_backward``.
    """
    n, c, h, w = shape
    output_size = grad_output.shape[-1]
    matrix_t = roi_align_weights(rois, output_size, spatial_scale, sampling_ratio, aligned, shape).to(grad_output.dtype)
    # [R, C, P, P] -> [R*P*P, C]: one row per pooled cell, channels contiguous.
    grad = grad_output.permute(0, 2, 3, 1).reshape(-1, c)
    return (matrix_t @ grad).view(n, h, w, c).permute(0, 3, 1, 2)


# Building the sparse matrix is a fixed cost per call; the product pays it back with the channel count.
# Narrower maps keep torchvision's kernel. How this line was drawn: benchmarks/README.md.
MIN_CHANNELS = 64
# The separable backward wins up to this many times the sparse multiply-add count (benchmarks/README.md).
SEPARABLE_MAX_RATIO = 16.0
# The values of ``backward``: "auto" picks by the sizes; the others force one backward.
BACKWARDS = ("auto", "torchvision", "sparse", "separable")


def use_separable(output_size: int, sampling_ratio: int, height: int, width: int) -> bool:
    """Whether ``separable_backward`` is the cheaper of the two for this map and output size.

    Per RoI and channel the separable products cost ``P*W*(P + H)`` multiply-adds and the sparse one
    ``4*P*P*s*s`` (four taps per sample); dense products run several times faster per multiply-add, so
    the separable one wins up to ``SEPARABLE_MAX_RATIO`` times the sparse count.
    """
    separable = output_size * width * (output_size + height)
    sparse = 4 * output_size * output_size * sampling_ratio * sampling_ratio
    return separable <= SEPARABLE_MAX_RATIO * sparse


def choose_backward(
    channels: int, height: int, width: int, output_size: int, sampling_ratio: int, backward: str = "auto"
) -> str:
    """The backward :func:`roi_align` runs for a ``[N, channels, height, width]`` map on the CPU.

    Args:
        channels, height, width: the feature map's size.
        output_size: side P of the pooled square.
        sampling_ratio: bilinear samples per bin side; ``<= 0`` (adaptive: a different grid per RoI)
            always takes torchvision's backward.
        backward: ``"auto"``, or one of ``"torchvision"``, ``"sparse"``, ``"separable"`` to force it.

    Returns:
        ``"torchvision"``, ``"sparse"`` or ``"separable"``.
    """
    if backward not in BACKWARDS:
        raise ValueError(f"roi_align backward must be one of {BACKWARDS}, got {backward!r}")
    if sampling_ratio <= 0:
        return "torchvision"
    if backward != "auto":
        return backward
    if channels < MIN_CHANNELS:
        return "torchvision"
    return "separable" if use_separable(output_size, sampling_ratio, height, width) else "sparse"


def needs_deterministic_path(features: Tensor) -> bool:
    """Whether ``features`` is on a GPU and deterministic algorithms are required (``trainer.deterministic=true``).

    torchvision's CUDA RoIAlign and RoIPool backwards add into the feature gradient with atomic adds, whose order
    (and so the float sum) changes from run to run; under ``torch.use_deterministic_algorithms(True)`` they raise.
    In ``warn_only`` mode (``trainer.deterministic=warn``) torch warns about them itself and they run.
    """
    return (
        features.device.type != "cpu"
        and torch.are_deterministic_algorithms_enabled()
        and not torch.is_deterministic_algorithms_warn_only_enabled()
    )


def deterministic_backward(sampling_ratio: int, supported: bool) -> str:
    """The backward for a GPU RoIAlign under deterministic algorithms: ``"separable"``.

    The separable backward is deterministic on a GPU: dense matrix products (cuBLAS, deterministic with
    ``CUBLAS_WORKSPACE_CONFIG``, which Lightning sets for ``deterministic=True``) and ``scatter_add_`` (which
    torch runs deterministically in this mode). It needs a fixed ``sampling_ratio`` (every config here has 2).

    Raises:
        RuntimeError: an adaptive ``sampling_ratio`` (``<= 0``) or a form only torchvision takes (a list of boxes,
            a ``(h, w)`` output), for which no deterministic GPU backward exists.
    """
    if sampling_ratio <= 0 or not supported:
        raise RuntimeError(
            "RoIAlign on a GPU with deterministic algorithms (trainer.deterministic=true) needs a fixed "
            f"sampling_ratio > 0 (got {sampling_ratio}), rois as one [R, 5] tensor and an int output size: "
            "torchvision's backward is not deterministic (atomic adds). Set the pooler's sampling_ratio (the "
            "configs use 2), or trainer.deterministic=warn to run it anyway"
        )
    return "separable"


def roi_align_kernel(
    features: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    """torchvision's RoIAlign kernel, called directly: ``[N, C, H, W]`` and ``rois [R, 5]`` -> ``[R, C, P, P]``.

    ``torchvision.ops.roi_align`` swaps its kernel for a ``torch.compile``d Python version on a GPU whenever
    deterministic algorithms are on (``trainer.deterministic=true`` or ``warn``): a compile for each new output
    size, sampling ratio and RoI count, and with an adaptive ``sampling_ratio`` (mask targets) a sum over every
    pixel of the map for every bin. Its forward is deterministic (only the backward adds atomically), so this
    calls the kernel itself: the same outputs, autocast and autograd as the wrapper's default path.
    """
    return torch.ops.torchvision.roi_align(
        features, rois, spatial_scale, output_size, output_size, sampling_ratio, aligned
    )


class _RoIAlignFunction(torch.autograd.Function):
    """torchvision's forward; the backward as dense or sparse products (see the module docstring)."""

    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned, separable):
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, sampling_ratio, aligned, tuple(features.shape), features.dtype, separable)
        return roi_align_kernel(features, rois, output_size, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    @once_differentiable  # as torchvision's: no double backward
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        spatial_scale, sampling_ratio, aligned, shape, dtype, separable = ctx.args
        # Accumulate in float32 (float64 for float64): the sparse kernel has no bf16 / fp16 version, and
        # sums over many samples are more accurate there anyway.
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        grad_output = grad_output.to(compute)
        if separable:
            grad = separable_backward(grad_output, rois, spatial_scale, sampling_ratio, aligned, shape)
        else:
            grad = sparse_backward(grad_output, rois, spatial_scale, sampling_ratio, aligned, shape)
        return grad.to(dtype).contiguous(), None, None, None, None, None, None


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    backward: str = "auto",
) -> Tensor:
    """``torchvision.ops.roi_align`` (square output, ``rois [R, 5]``) with a fast CPU backward.

    Args:
        features: ``[N, C, H, W]`` feature map.
        rois: ``[R, 5]`` (batch index, x1, y1, x2, y2) in image pixels (a list of boxes goes to torchvision).
        output_size: side P of the pooled square (a ``(h, w)`` tuple goes to torchvision).
        spatial_scale: feature pixels per image pixel.
        sampling_ratio: bilinear samples per bin side; ``<= 0``: adaptive (torchvision's backward).
        aligned: half-pixel offset.
        backward: which CPU backward to run (:func:`choose_backward`); ``"auto"`` picks by the sizes.

    Returns:
        ``[R, C, P, P]`` pooled features.
    """
    tensor_form = isinstance(rois, Tensor) and isinstance(output_size, int)
    needs_grad = features.requires_grad and torch.is_grad_enabled()
    kind = "torchvision"
    if needs_grad and tensor_form and features.device.type == "cpu" and rois.numel() > 0:
        _, channels, height, width = features.shape
        kind = choose_backward(channels, height, width, output_size, sampling_ratio, backward)
    elif needs_grad and needs_deterministic_path(features):
        # Also for no RoIs (an FPN level that gets none, a batch without objects): torchvision's backward would
        # raise there as anywhere, and the separable one returns zeros.
        kind = deterministic_backward(sampling_ratio, tensor_form)
    if kind == "torchvision":
        if not tensor_form:
            return tv_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
        return roi_align_kernel(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return _RoIAlignFunction.apply(
        features, rois, output_size, float(spatial_scale), int(sampling_ratio), aligned, kind == "separable"
    )
