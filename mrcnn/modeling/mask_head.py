"""Mask heads (FCN and MLP, Table 2e) and mask losses (sigmoid and softmax, Table 2b).

A mask head maps pooled RoI features to mask logits ``[R, C, M, M]`` where ``C = K + 1`` (channel
k predicts class k; channel 0 is background, used only by the softmax loss) or ``C = 1`` when
class-agnostic. A mask loss object pairs a training loss with its matching inference.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from mrcnn.modeling.backbone import norm_layer


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
        norm: ``None`` or ``"gn"`` (GroupNorm after each conv, for training from scratch).
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
    ):
        super().__init__()
        self.class_agnostic = class_agnostic
        self.mask_resolution = mask_resolution
        self.out_masks = 1 if class_agnostic else num_classes + 1
        dims = [in_channels * resolution**2, *hidden_dims]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.predictor = nn.Linear(dims[-1], self.out_masks * mask_resolution**2)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        for fc in self.hidden:
            x = F.relu(fc(x))
        return self.predictor(x).view(len(x), self.out_masks, self.mask_resolution, self.mask_resolution)


def mask_targets(gt_masks: Tensor, proposals: Tensor, matched_idxs: Tensor, size: int, aligned: bool = False) -> Tensor:
    """Crop each positive RoI's matched ground-truth mask and resize it to ``size x size``.

    Each ground-truth mask is treated as its own 1-channel "image" so only the matched masks
    are read, at the RoI's resolution (no full-resolution copy per RoI).

    Args:
        gt_masks: uint8 ``[G, H, W]`` masks of one image.
        proposals: ``[P, 4]`` positive RoIs of that image.
        matched_idxs: int64 ``[P]`` index of each RoI's ground truth.
        aligned: sample at pixel centres. ``False`` (torchvision's choice, kept for parity) reads the
            mask half a pixel off, so a box that exactly covers a square gets soft last rows/columns.

    Returns:
        float ``[P, size, size]`` soft targets in [0, 1].
    """
    rois = torch.cat([matched_idxs[:, None].to(proposals), proposals], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0, aligned=aligned)[:, 0]


def _select_class(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """``[R, C, M, M]`` -> ``[R, M, M]``: the channel of each RoI's class (channel 0 if class-agnostic)."""
    index = torch.zeros_like(labels) if mask_logits.shape[1] == 1 else labels
    return mask_logits[torch.arange(len(labels), device=labels.device), index]


def mask_loss_sigmoid(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Per-class binary cross-entropy on the ground-truth class's channel only (the paper's default).

    Args:
        mask_logits: ``[R, C, M, M]``.
        labels: int64 ``[R]`` ground-truth class of each positive RoI.
        targets: ``[R, M, M]`` soft binary targets.
    """
    if targets.numel() == 0:
        # Keep every parameter in the graph (DDP with find_unused_parameters=False needs it).
        return mask_logits.sum() * 0
    return F.binary_cross_entropy_with_logits(_select_class(mask_logits, labels), targets)


def mask_inference_sigmoid(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Foreground probability of each detection's class: ``[D, C, M, M]`` -> ``[D, 1, M, M]``."""
    if len(labels) == 0:
        return mask_logits.new_zeros((0, 1, *mask_logits.shape[-2:]))
    return _select_class(mask_logits, labels).sigmoid()[:, None]


def mask_loss_softmax(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Multinomial loss: a per-pixel softmax over all ``K + 1`` channels, so classes compete.

    A pixel's target class is the RoI's ground-truth class where the target mask is >= 0.5,
    and background (0) elsewhere.
    """
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    if mask_logits.shape[1] == 1:
        raise ValueError("the softmax mask loss needs per-class mask channels, not a class-agnostic head")
    pixel_classes = (targets >= 0.5).to(torch.int64) * labels[:, None, None]
    return F.cross_entropy(mask_logits, pixel_classes)


def mask_inference_softmax(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax probability of each detection's class at each pixel: ``[D, K+1, M, M]`` -> ``[D, 1, M, M]``."""
    if len(labels) == 0:
        return mask_logits.new_zeros((0, 1, *mask_logits.shape[-2:]))
    return _select_class(mask_logits.softmax(dim=1), labels)[:, None]


class SigmoidMaskLoss:
    """Config handle for the sigmoid (per-class binary) mask loss and its inference."""

    per_class_only = False

    def loss(self, mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
        return mask_loss_sigmoid(mask_logits, labels, targets)

    def inference(self, mask_logits: Tensor, labels: Tensor) -> Tensor:
        return mask_inference_sigmoid(mask_logits, labels)


class SoftmaxMaskLoss:
    """Config handle for the softmax (multinomial) mask loss and its inference."""

    per_class_only = True

    def loss(self, mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
        return mask_loss_softmax(mask_logits, labels, targets)

    def inference(self, mask_logits: Tensor, labels: Tensor) -> Tensor:
        return mask_inference_softmax(mask_logits, labels)
