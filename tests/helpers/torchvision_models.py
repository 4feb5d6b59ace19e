"""torchvision Mask R-CNNs as torchvision's own builder makes them when it loads COCO weights, without downloading any.

``maskrcnn_resnet50_fpn(weights=COCO_V1)`` builds a ResNet with FrozenBatchNorm2d, loads the COCO state dict and
then sets every FrozenBatchNorm2d ``eps`` to 0 (``overwrite_eps(model, 0.0)``). With ``weights=None`` it builds plain
BatchNorm2d with eps 1e-5 and default statistics (mean 0, variance 1), which hides any eps difference. These helpers
build the FrozenBatchNorm2d model, give it statistics measured on an image and then perturbed (so that eps matters,
as it does with COCO's real statistics), and set eps 0 as the builder does.
"""

import math

import torch
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


def torchvision_maskrcnn(
    num_classes: int = 91,
    depth: int = 50,
    fpn_channels: int = 256,
    box_head_dim: int = 1024,
    mask_head_dim: int = 256,
    trainable_layers: int = 3,
    **kwargs,
) -> MaskRCNN:
    """torchvision's ``MaskRCNN`` on a FrozenBatchNorm2d ResNet-FPN, as ``maskrcnn_resnet50_fpn`` builds it for weights.

    With the defaults it is exactly ``maskrcnn_resnet50_fpn(weights=COCO_V1)`` before the weights load; smaller
    ``depth`` / widths give a torchvision-format model of the same layout for fast tests. ``kwargs`` go to
    ``MaskRCNN`` (e.g. ``min_size``, ``max_size``).
    """
    body = getattr(resnet, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    for name, parameter in body.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    in_channels = [body.inplanes // 8 * 2 ** (i - 1) for i in range(1, 5)]
    backbone = BackboneWithFPN(
        body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, in_channels, fpn_channels, extra_blocks=LastLevelMaxPool()
    )
    return MaskRCNN(
        backbone,
        num_classes=None,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes),
        mask_head=MaskRCNNHeads(fpn_channels, [mask_head_dim] * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_dim, mask_head_dim, num_classes),
        **kwargs,
    )


@torch.no_grad()
def set_measured_bn_statistics(model: MaskRCNN, image: torch.Tensor, generator: torch.Generator) -> None:
    """Gives every FrozenBatchNorm2d of ``model`` the statistics of ``image``'s activations, then perturbs them.

    Each layer's mean and variance are measured layer by layer on the (normalized, resized) image, so the
    activations stay in a realistic range through the whole ResNet; then each channel's variance is scaled by
    ``s**2`` and its weight by ``s`` (``s`` log-uniform in [0.5, 1]: the same map at eps 0), and means, weights
    and biases are jittered. Small variances are where eps matters (COCO's statistics have many), so a 1e-5 vs 0
    eps difference becomes visible in the detections.
    """
    norms = [m for m in model.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    measured = {}

    def measure(module, inputs):
        if module not in measured:
            x = inputs[0]
            measured[module] = True
            module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    hooks = [m.register_forward_pre_hook(measure) for m in norms]
    try:
        was_training = model.training
        model.eval()
        images, _ = model.transform([image])
        model.backbone.body(images.tensors)
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    for m in norms:
        channels = len(m.running_var)
        # var * s^2 with weight * s is the same affine map at eps 0, but eps now counts 1 / s^2 times more:
        # channels of small variance, as trained weights have.
        scale = torch.empty(channels).uniform_(math.log(0.5), 0.0, generator=generator).exp()
        m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(channels, generator=generator))
        m.running_var.mul_(scale**2)
        m.weight.mul_(scale * torch.empty(channels).uniform_(0.9, 1.1, generator=generator))
        m.bias.add_(0.05 * torch.randn(channels, generator=generator))


def coco_like_torchvision_maskrcnn(image: torch.Tensor, seed: int = 0, **kwargs) -> MaskRCNN:
    """``torchvision_maskrcnn(**kwargs)`` in the state torchvision's builder leaves COCO weights in.

    Random weights (seeded), measured-then-perturbed FrozenBatchNorm2d statistics, eps 0, eval mode.
    """
    torch.manual_seed(seed)
    model = torchvision_maskrcnn(**kwargs)
    set_measured_bn_statistics(model, image, torch.Generator().manual_seed(seed))
    overwrite_eps(model, 0.0)
    return model.eval()
