"""Mask heads (FCN and MLP, Table 2e) and mask losses (sigmoid and softmax, Table 2b).

A mask head maps pooled RoI features to mask logits ``[R, C, M, M]`` where ``C = K + 1`` (channel
k predicts class k; channel 0 is background, used only by the softmax loss) or ``C = 1`` when
class-agnostic. A mask loss object pairs a training loss with its matching inference.

Every mask loss receives the same target tensor, ``[R, M, M]`` floats in [0, 1] from :func:`mask_targets`:
``soft`` (torchvision's resampled masks) or ``binary`` (thresholded at 0.5, Detectron's and the paper's). The
target form is a switch of the RoI heads, not of a loss, so swapping the loss changes nothing else (Table 2b).
"""

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrcnn.modeling.backbone import norm_layer
from mrcnn.modeling.roi_align import roi_align_kernel
from mrcnn.modeling.sampling import upcast


def _init_conv(module: nn.Module) -> None:
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class FCNMaskHead(nn.Module):
    """The paper's FCN mask head: ``num_convs`` 3x3 convs, a 2x deconv, then a 1x1 predictor.

    FPN uses 4 convs on 14x14 RoIs (28x28 masks); C4 uses 0 convs on the 7x7 res5 output (14x14 masks).

    Args:
        in_channels: channels of the input features.
        num_classes: foreground classes K.
        num_convs: number of 3x3 conv layers before the deconv.
        conv_dim: channels of the convs and the deconv.
        norm: ``None``, or a norm after each conv (:func:`~mrcnn.modeling.backbone.norm_layer`): ``"gn"``
            (GroupNorm, for training from scratch), ``"bn"`` or ``"syncbn"``.
        class_agnostic: predict one mask per RoI instead of one per class.

    Shapes:
        ``[R, in_channels, S, S]`` -> ``[R, C, 2S, 2S]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_convs: int = 4,
        conv_dim: int = 256,
        norm: str | None = None,
        class_agnostic: bool = False,
    ):
        super().__init__()
        self.class_agnostic = class_agnostic
        layers = []
        channels = in_channels
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, conv_dim, 3, padding=1, bias=norm is None)
            _init_conv(conv)
            layers += [conv] + ([norm_layer(norm)(conv_dim)] if norm else []) + [nn.ReLU(inplace=True)]
            channels = conv_dim
        self.convs = nn.Sequential(*layers)
        self.deconv = nn.ConvTranspose2d(channels, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1 if class_agnostic else num_classes + 1, 1)
        _init_conv(self.deconv)
        _init_conv(self.predictor)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(F.relu(self.deconv(self.convs(x))))


class MLPMaskHead(nn.Module):
    """MLP mask head (Table 2e): fc layers on the flattened RoI features, ending in ``C * M * M`` outputs.

    Args:
        in_channels: channels of the pooled features.
        num_classes: foreground classes K.
        resolution: side of the pooled features (14).
        hidden_dims: widths of the hidden fc layers: ``(1024, 1024)`` or ``(1024, 1024, 1024)``.
        mask_resolution: side M of the predicted masks (28).
        class_agnostic: predict one mask per RoI instead of one per class.
        norm: ``None`` (the paper's), or a norm after each hidden fc layer, as :class:`FCNMaskHead` has after each
            conv (the configs give both ``model.head_norm``, so the two heads of Table 2e differ in their layout only;
            ``gn`` normalises groups of a layer's features).

    The first fc layer is sized for ``resolution``: the RoI heads refuse a head whose ``input_resolution``
    differs from the side of the features they feed it (14 pooled for FPN / C5, res5's 7 for C4).

    Shapes:
        ``[R, in_channels, resolution, resolution]`` -> ``[R, C, M, M]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolution: int = 14,
        hidden_dims: tuple[int, ...] = (1024, 1024),
        mask_resolution: int = 28,
        class_agnostic: bool = False,
        norm: str | None = None,
    ):
        super().__init__()
        self.class_agnostic = class_agnostic
        self.input_resolution = resolution
        self.mask_resolution = mask_resolution
        self.out_masks = 1 if class_agnostic else num_classes + 1
        dims = [in_channels * resolution**2, *hidden_dims]
        # A norm's shift makes the fc's bias redundant, as for FCNMaskHead's convs.
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=norm is None) for a, b in itertools.pairwise(dims))
        self.norms = nn.ModuleList(norm_layer(norm)(b) for b in hidden_dims) if norm else None
        self.predictor = nn.Linear(dims[-1], self.out_masks * mask_resolution**2)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        for i, fc in enumerate(self.hidden):
            x = fc(x)
            if self.norms is not None:
                # As [R, C, 1, 1]: the 2-d norms (GroupNorm, BatchNorm2d) take it, each feature a channel.
                x = self.norms[i](x[:, :, None, None]).flatten(start_dim=1)
            x = F.relu(x)
        return self.predictor(x).view(len(x), self.out_masks, self.mask_resolution, self.mask_resolution)


MASK_TARGET_FORMS = ("soft", "binary")


# RoIAlign reads float masks: at most this many bytes of them at once. COCO's usual batch needs far less (8 images of
# 7 masks of 800 x 1200: 0.2 GB) and takes one pass; dense images (90 instances at 800 x 1333 are 0.4 GB an image,
# 3 GB for a batched batch of 8) take several passes instead of a peak of that size.
MASK_TARGET_CHUNK_BYTES = 256 * 2**20


def mask_targets(
    gt_masks: Tensor,
    proposals: Tensor,
    matched_idxs: Tensor,
    size: int,
    aligned: bool = False,
    form: str = "soft",
    chunk_bytes: int = MASK_TARGET_CHUNK_BYTES,
) -> Tensor:
    """Crop each positive RoI's matched ground-truth mask and resize it to ``size x size``.

    Each ground-truth mask is treated as its own 1-channel "image" so only the matched masks
    are read, at the RoI's resolution (no full-resolution copy per RoI). RoIAlign reads float masks: when
    all of them would take more than ``chunk_bytes``, they are converted and read a chunk at a time, each pass
    resampling the RoIs of its masks (the others get an empty box, which costs RoIAlign nothing). The targets are
    the same bit for bit; the chunks follow from the masks' shape alone, so the host reads nothing.

    Args:
        gt_masks: uint8 ``[G, H, W]`` masks of one image.
        proposals: ``[P, 4]`` positive RoIs of that image.
        matched_idxs: int64 ``[P]`` index of each RoI's ground truth.
        aligned: sample at pixel centres. ``False`` (torchvision's choice, kept for parity) reads the
            mask half a pixel off, so a box that exactly covers a square gets soft last rows/columns.
        form: ``"soft"``: the bilinearly resampled mask, values in [0, 1] (torchvision's targets, the parity
            default); ``"binary"``: that mask thresholded at 0.5, values in {0, 1} (Detectron's and the
            paper's binary mask targets).
        chunk_bytes: the most bytes of float masks RoIAlign reads at once.

    Returns:
        float ``[P, size, size]`` targets in [0, 1].
    """
    if form not in MASK_TARGET_FORMS:
        raise ValueError(f"mask target form must be one of {MASK_TARGET_FORMS}, got {form!r}")
    # In float32 whatever the boxes' dtype (trainer.precision=bf16-true / 16-true): the mask index rides in RoIAlign's
    # box column, and bfloat16 holds whole numbers exactly only up to 256 (float16: 2048), past which a RoI would
    # read another object's mask.
    dtype = proposals.dtype
    proposals = upcast(proposals)
    per_mask = gt_masks[0].numel() * proposals.element_size() if len(gt_masks) else 1
    chunk = max(1, chunk_bytes // max(per_mask, 1))
    # torchvision's kernel itself (adaptive sampling), as torchvision.ops.roi_align calls it outside deterministic
    # mode on a GPU (roi_align_kernel says why).
    if len(gt_masks) <= chunk:
        rois = torch.cat([matched_idxs[:, None].to(proposals), proposals], dim=1)
        targets = roi_align_kernel(gt_masks[:, None].to(rois), rois, size, 1.0, -1, aligned)[:, 0]
    else:
        targets = proposals.new_zeros((len(proposals), size, size))
        empty = torch.zeros_like(proposals)
        for start in range(0, len(gt_masks), chunk):
            masks = gt_masks[start : start + chunk]
            inside = (matched_idxs >= start) & (matched_idxs < start + len(masks))
            local = torch.where(inside, matched_idxs - start, 0)
            rois = torch.cat([local[:, None].to(proposals), torch.where(inside[:, None], proposals, empty)], dim=1)
            chunk_targets = roi_align_kernel(masks[:, None].to(rois), rois, size, 1.0, -1, aligned)[:, 0]
            targets = torch.where(inside[:, None, None], chunk_targets, targets)
    if form == "binary":
        targets = (targets >= 0.5).to(targets.dtype)
    return targets.to(dtype)


def stack_masks(gt_masks: list[Tensor]) -> Tensor:
    """Every image's ground-truth masks in one ``[sum G_i, H, W]`` uint8 tensor, ``H, W`` the largest sizes.

    Images of one size are simply concatenated. A smaller image's masks are padded, with their last row and column
    repeated once beyond the image (zeros further out), so that RoIAlign reads them there as it reads the unpadded
    mask: it clamps a sample between the last pixel's centre and the image's edge to the last pixel, and a RoI inside
    its image samples no further out. (A zero row there would blend the mask's edge with 0.) The exception: with
    ``aligned=False`` RoIAlign widens a RoI under one pixel to one, and such a RoI at a smaller image's bottom or
    right edge samples past it, where the per-image call reads 0 and this reads the repeated edge (a proposal under
    a pixel wide that overlaps a ground-truth box by IoU 0.5: almost never).
    """
    if len({m.shape[1:] for m in gt_masks}) <= 1:
        return torch.cat(gt_masks)
    height, width = max(m.shape[1] for m in gt_masks), max(m.shape[2] for m in gt_masks)
    stacked = gt_masks[0].new_zeros((sum(len(m) for m in gt_masks), height, width))
    start = 0
    for masks in gt_masks:
        count, h, w = masks.shape
        if count and h and w:
            image = stacked[start : start + count]
            image[:, :h, :w] = masks
            if h < height:
                image[:, h, :w] = masks[:, h - 1]
            if w < width:
                rows = min(h + 1, height)
                image[:, :rows, w] = image[:, :rows, w - 1]
        start += count
    return stacked


def mask_targets_batched(
    gt_masks: list[Tensor],
    images: Tensor,
    proposals: Tensor,
    matched_idxs: Tensor,
    size: int,
    aligned: bool = False,
    form: str = "soft",
    chunk_bytes: int = MASK_TARGET_CHUNK_BYTES,
) -> Tensor:
    """:func:`mask_targets` for RoIs of several images in one RoIAlign (the ``[B]`` per-image calls otherwise).

    The images' masks are stacked (:func:`stack_masks`) and each RoI reads its ground truth there. The RoIs must
    lie in their images (proposals are clipped to them; ground-truth boxes lie in them). Targets equal the
    per-image ones bit for bit when the images have one size; else the samples at a smaller image's bottom or right
    edge blend two equal values where the per-image call reads one (float rounding,
    ``tests/modeling/test_heads_losses.py``). It holds every image's masks at once, as uint8 (the float copy RoIAlign
    reads is bounded by :data:`MASK_TARGET_CHUNK_BYTES`).

    Args:
        gt_masks: per image uint8 ``[G_i, H_i, W_i]``.
        images: int64 ``[K]``, the image of each RoI.
        proposals: ``[K, 4]`` RoIs.
        matched_idxs: int64 ``[K]``, each RoI's ground truth within its image (``< G_i``).
        size, aligned, form, chunk_bytes: as :func:`mask_targets`.

    Returns:
        float ``[K, size, size]`` targets.
    """
    # Each image's first row in the stack, from the mask counts the host knows, copied to the device from pinned
    # memory without waiting for it (a copy from pageable memory may wait for the device's queue).
    starts = [0, *itertools.accumulate(len(m) for m in gt_masks)][:-1]
    firsts = torch.tensor(starts, dtype=torch.int64, pin_memory=matched_idxs.is_cuda)
    firsts = firsts.to(matched_idxs.device, non_blocking=True)
    return mask_targets(
        stack_masks(gt_masks), proposals, firsts[images] + matched_idxs, size, aligned, form, chunk_bytes
    )


def _select_class(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """``[R, C, M, M]`` -> ``[R, M, M]``: the channel of each RoI's class (channel 0 if class-agnostic)."""
    index = torch.zeros_like(labels) if mask_logits.shape[1] == 1 else labels
    return mask_logits[torch.arange(len(labels), device=labels.device), index]


def mask_loss_sigmoid(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Per-class binary cross-entropy on the ground-truth class's channel only (the paper's default).

    Args:
        mask_logits: ``[R, C, M, M]``.
        labels: int64 ``[R]`` ground-truth class of each positive RoI.
        targets: ``[R, M, M]`` foreground probability of each pixel, in [0, 1] (soft or binary).
    """
    if targets.numel() == 0:
        # Keep every parameter in the graph (DDP with find_unused_parameters=False needs it).
        return mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(_select_class(mask_logits, labels), targets)


def mask_inference_sigmoid(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Foreground probability of each detection's class: ``[D, C, M, M]`` -> ``[D, 1, M, M]``."""
    if len(labels) == 0:
        return mask_logits.new_zeros((0, 1, *mask_logits.shape[-2:]))
    # In float32, as the softmax arm's probabilities are under autocast: both arms are thresholded alike.
    return _select_class(mask_logits, labels).float().sigmoid()[:, None]


def mask_loss_softmax(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Multinomial loss: a per-pixel softmax over all ``K + 1`` channels, so classes compete.

    Each pixel's target is a distribution over the channels: the RoI's ground-truth class with probability
    ``t`` (the target mask's value there) and background (channel 0) with ``1 - t``; the loss is the
    cross-entropy against it, averaged over pixels. The sigmoid loss reads the same ``t`` as its binary
    target, so both losses learn from the same targets: with binary ``t`` this is the usual per-pixel
    cross-entropy with hard labels (class or background), with soft ``t`` its probabilistic form.

    Args:
        mask_logits: ``[R, K+1, M, M]``.
        labels: int64 ``[R]`` ground-truth class (1..K) of each positive RoI.
        targets: ``[R, M, M]`` foreground probability of each pixel, in [0, 1] (soft or binary).
    """
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    if mask_logits.shape[1] == 1:
        raise ValueError("the softmax mask loss needs per-class mask channels, not a class-agnostic head")
    log_probs = F.log_softmax(mask_logits, dim=1)
    class_log_probs = _select_class(log_probs, labels)
    losses = -(targets * class_log_probs + (1 - targets) * log_probs[:, 0])
    return losses.mean()


def mask_inference_softmax(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax probability of each detection's class at each pixel: ``[D, K+1, M, M]`` -> ``[D, 1, M, M]``."""
    if len(labels) == 0:
        return mask_logits.new_zeros((0, 1, *mask_logits.shape[-2:]))
    return _select_class(mask_logits.softmax(dim=1), labels)[:, None]


class MaskLoss:
    """A mask loss and its inference, the pair the RoI heads call; a config names one subclass (model/mask_loss).

    ``loss(mask_logits [R, C, M, M], labels [R], targets [R, M, M]) -> scalar`` and
    ``inference(mask_logits [D, C, M, M], labels [D]) -> [D, 1, M, M]`` probabilities. ``per_class_only``: the loss
    needs per-class mask channels (a class-agnostic head is an error).
    """

    per_class_only = False
    loss: Callable[[Tensor, Tensor, Tensor], Tensor]
    inference: Callable[[Tensor, Tensor], Tensor]


class SigmoidMaskLoss(MaskLoss):
    """The sigmoid (per-class binary) mask loss and its inference."""

    loss = staticmethod(mask_loss_sigmoid)
    inference = staticmethod(mask_inference_sigmoid)


class SoftmaxMaskLoss(MaskLoss):
    """The softmax (multinomial) mask loss and its inference."""

    per_class_only = True
    loss = staticmethod(mask_loss_softmax)
    inference = staticmethod(mask_inference_softmax)
