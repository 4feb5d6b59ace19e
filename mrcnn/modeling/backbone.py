"""ResNet backbones and the three necks of the paper: C4, C5 and FPN (Table 2a and 2d).

The ResNet body is torchvision's. Each builder returns a module whose ``forward`` maps an
image batch ``[B, 3, H, W]`` to an ordered dict of feature maps and that carries
``out_channels`` (channels of every returned map).

- ``resnet_fpn``: P2-P5 from a top-down pyramid plus P6 by max-pooling (keys "0".."3", "pool").
  Built with torchvision's ``BackboneWithFPN``, so its state dict matches torchvision's Mask R-CNN.
- ``resnet_c4``: res2-res4, one map of stride 16 (key "0"); res5 then runs inside the RoI head.
- ``resnet_c5``: res2-res5, one map of stride 32 (key "0"): the large-stride features of Table 2d.
- ``resnet_single_map``: what both are, for any last stage.
"""

import logging
import math
import re
from collections import OrderedDict
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mrcnn.errors import CommandError
from mrcnn.modeling.frozen_bn import frozen_batchnorm

log = logging.getLogger(__name__)

# Residual block type and blocks per stage (res2-res5) of each depth, as in torchvision's builders.
RESNETS = {
    18: (resnet.BasicBlock, [2, 2, 2, 2]),
    34: (resnet.BasicBlock, [3, 4, 6, 3]),
    50: (resnet.Bottleneck, [3, 4, 6, 3]),
    101: (resnet.Bottleneck, [3, 4, 23, 3]),
    152: (resnet.Bottleneck, [3, 8, 36, 3]),
}
NORMS = ("frozen_bn", "bn", "gn", "syncbn")


def stage_channels(depth: int, stage: int, width: int = 64) -> int:
    """Output channels of ResNet stage ``stage`` (2..5), e.g. ``stage_channels(50, 4) == 1024``.

    ``width`` is the stem's channels (64 in every standard ResNet); each stage doubles it.
    """
    if depth not in RESNETS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNETS)}, got {depth}")
    return width * 2 ** (stage - 2) * RESNETS[depth][0].expansion


def norm_layer(norm: str, gn_groups: int = 32):
    """Normalization layer factory for ResNet bodies and heads.

    ``frozen_bn`` is for fine-tuning from a pretrained file; from scratch it diverges (see
    PITFALLS.md), so use ``gn`` (one GPU/CPU) or ``syncbn`` (many GPUs) then.
    """
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "syncbn":
        return nn.SyncBatchNorm
    if norm == "gn":
        return partial(group_norm, groups=gn_groups)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups, or the largest divisor of ``channels`` below it for narrow layers."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def resnet_body(
    depth: int, norm: str, weights_path: str | None = None, width: int = 64, part: str = "backbone"
) -> resnet.ResNet:
    """A torchvision ResNet, optionally initialised from a local ImageNet state dict file.

    Args:
        depth: 18, 34, 50 or 101.
        norm: one of ``NORMS``.
        weights_path: a torchvision ResNet ``state_dict`` saved with ``torch.save``
            (e.g. ``resnet50-0676ba61.pth``); nothing is downloaded.
        width: channels of the stem (64 in the standard ResNets); the four stages have ``width`` x 1, 2, 4,
            8 (x4 for Bottleneck) output channels. A narrower ResNet is for small data on a CPU: res5
            costs ``(width / 64) ** 2`` of the standard one (the C4 head runs it on every RoI). Module
            and parameter names do not depend on it.
        part: what the body is for, for the log line of ``weights_path`` (:func:`load_resnet_weights`).
    """
    if depth not in RESNETS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNETS)}, got {depth}")
    if width < 1:
        raise ValueError(f"ResNet width must be positive, got {width}")
    if weights_path and width != 64:
        raise ValueError(f"{weights_path}: pretrained torchvision ResNets have width 64, got model width {width}")
    block, layers = RESNETS[depth]
    body = resnet.ResNet(block, layers, norm_layer=norm_layer(norm))
    if width != 64:
        _narrow(body, block, layers, width)
    if weights_path:
        load_resnet_weights(body, weights_path, depth, part)
    return body


def load_resnet_weights(body: resnet.ResNet, path: str, depth: int, part: str = "backbone") -> None:
    """Loads a torchvision ResNet state dict file (``model.backbone_weights``) into ``body``, all but its ``fc``.

    Every tensor is compared with the body's before any is loaded: a file of another depth stops with one line
    naming the depth the file holds, where torch's ``load_state_dict`` would give a clause per mismatched tensor.

    Args:
        part: what ``body`` is for, for the log line (the C4 box head uses its ``layer4``).

    Raises:
        CommandError: naming ``model.backbone_weights``, the file, and the depth it holds where it can tell (else
            the first tensors that do not fit).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CommandError(
            f"model.backbone_weights={path} is not a state dict (a dict of tensors): give an ImageNet ResNet-{depth} "
            f"state dict saved with torch.save, as torchvision's resnet{depth}-*.pth"
        )
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = body.state_dict()
    # num_batches_tracked: BatchNorm's step count, which FrozenBatchNorm2d has not (and drops on load).
    counted = [k for k in own if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    reshaped = [k for k in counted if k in state and state[k].shape != own[k].shape]
    missing = [k for k in counted if k not in state]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    if reshaped or missing or unexpected:
        held = resnet_depth_of(state)
        if held is not None and held != depth:
            raise CommandError(
                f"model.backbone_weights={path} holds a ResNet-{held}, and this model is a ResNet-{depth} "
                f"(model.depth={depth}): set model.depth={held}, or give a ResNet-{depth} file (torchvision's "
                f"resnet{depth}-*.pth)"
            )
        if not (reshaped or missing) and all(k.endswith(("running_mean", "running_var")) for k in unexpected):
            raise CommandError(
                f"model.backbone_weights={path} holds BatchNorm statistics, which this model's normalisation has no "
                "place for (model.norm=gn?): fine-tune an ImageNet backbone with model.norm=frozen_bn"
            )
        raise CommandError(
            f"model.backbone_weights={path} does not fit a torchvision ResNet-{depth} (model.depth={depth}): "
            f"{len(reshaped)} tensors of another shape (e.g. {reshaped[:3]}), {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    loaded = {k: v for k, v in state.items() if k in own}
    body.load_state_dict(loaded, strict=False)
    log.info("model.backbone_weights=%s: loaded %d tensors of a ResNet-%d into the %s", path, len(loaded), depth, part)


def resnet_depth_of(state: dict[str, Tensor]) -> int | None:
    """The depth of the torchvision ResNet a state dict holds, from its block type (a Bottleneck has ``conv3``) and
    its blocks per stage (``layer<i>.<block>.``); ``None`` where it matches none of :data:`RESNETS`."""
    blocks = [len({m.group(1) for key in state if (m := re.match(rf"layer{i}\.(\d+)\.", key))}) for i in range(1, 5)]
    bottleneck = any(re.match(r"layer\d\.\d+\.conv3\.", k) for k in state)
    for depth, (block, layers) in RESNETS.items():
        if (block is resnet.Bottleneck) == bottleneck and list(layers) == blocks:
            return depth
    return None


def _narrow(body: resnet.ResNet, block: type[nn.Module], layers: list[int], width: int) -> None:
    """Rebuild ``body``'s stem and stages in place with ``width`` stem channels instead of 64."""
    # torchvision's ResNet hard-codes 64; its _make_layer builds each stage from ``inplanes`` on.
    norm = body._norm_layer
    body.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    body.bn1 = norm(width)
    body.inplanes = width
    for i, blocks in enumerate(layers):
        setattr(body, f"layer{i + 1}", body._make_layer(block, width * 2**i, blocks, stride=1 if i == 0 else 2))
    body.fc = nn.Linear(8 * width * block.expansion, body.fc.out_features)
    # The same initialisation as torchvision's ResNet constructor.
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)


def freeze_stages(body: resnet.ResNet, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` of (conv1, layer1, ..., layer4) in place.

    A frozen stage's BatchNorm layers (``norm=bn``, ``syncbn``) become ``FrozenBatchNorm2d`` holding their
    statistics, as Detectron2 freezes them: left trainable, a frozen stage would still normalise by each batch's
    statistics in training and move its running ones, so it would compute another function at every step (and
    another again at evaluation). torchvision freezes only the parameters.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if all(not name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
    for name in ("bn1", "layer1", "layer2", "layer3", "layer4"):
        if name not in trainable:
            setattr(body, name, frozen_batchnorm(getattr(body, name)))


def resnet_fpn(
    depth: int = 50,
    norm: str = "frozen_bn",
    out_channels: int = 256,
    trainable_layers: int = 5,
    weights_path: str | None = None,
    width: int = 64,
) -> BackboneWithFPN:
    """ResNet-FPN: P2-P6 feature maps with ``out_channels`` channels each (``width``: see ``resnet_body``).

    Returns:
        module mapping ``[B, 3, H, W]`` to ``{"0": P2 (stride 4), ..., "3": P5, "pool": P6}``.
    """
    body = resnet_body(depth, norm, weights_path, width)
    freeze_stages(body, trainable_layers)
    return_layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
    in_channels = [stage_channels(depth, s, width) for s in range(2, 6)]
    return BackboneWithFPN(body, return_layers, in_channels, out_channels, extra_blocks=LastLevelMaxPool())


class SingleMapBackbone(nn.Module):
    """ResNet truncated after ``last_layer``; returns its output as ``{"0": [B, C, H/s, W/s]}``."""

    def __init__(self, body: resnet.ResNet, last_layer: str, out_channels: int):
        super().__init__()
        self.body = IntermediateLayerGetter(body, return_layers={last_layer: "0"})
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.body(x)


def resnet_single_map(
    depth: int = 50,
    norm: str = "frozen_bn",
    trainable_layers: int = 5,
    weights_path: str | None = None,
    width: int = 64,
    last_stage: int = 4,
) -> SingleMapBackbone:
    """ResNet res2 .. res``last_stage``: the one map of the last stage, of stride ``2 ** last_stage``."""
    body = resnet_body(depth, norm, weights_path, width)
    freeze_stages(body, trainable_layers)
    return SingleMapBackbone(body, f"layer{last_stage - 1}", stage_channels(depth, last_stage, width))


def resnet_c4(
    depth: int = 50,
    norm: str = "frozen_bn",
    trainable_layers: int = 5,
    weights_path: str | None = None,
    width: int = 64,
) -> SingleMapBackbone:
    """ResNet-C4: res2-res4, stride 16. Pair it with ``Res5BoxHead`` (the paper's C4 head)."""
    return resnet_single_map(depth, norm, trainable_layers, weights_path, width, last_stage=4)


def resnet_c5(
    depth: int = 50,
    norm: str = "frozen_bn",
    trainable_layers: int = 5,
    weights_path: str | None = None,
    width: int = 64,
) -> SingleMapBackbone:
    """ResNet-C5: res2-res5, stride 32 (Table 2d's large-stride features)."""
    return resnet_single_map(depth, norm, trainable_layers, weights_path, width, last_stage=5)
