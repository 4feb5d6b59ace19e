"""A FrozenBatchNorm2d that returns its input's dtype (``model.frozen_bn_keeps_dtype``); BatchNorm layers frozen
into FrozenBatchNorm2d (:func:`frozen_batchnorm`, for a backbone's frozen stages).

torchvision's ``FrozenBatchNorm2d`` computes ``x * scale + bias`` with float32 ``scale`` and ``bias``. Under bf16
autocast its input (a convolution's output) is bf16, so type promotion makes its output float32: the ReLU, the
residual add and the next block's input all run on float32 activations, and autocast casts them back to bf16 before
every convolution. On the H200 (``benchmarks/gpu/2026-12-04-h200/prof_ours.txt``, R50-FPN at 800x1333, batch 8)
all the elementwise kernels of those kinds (``aten::mul``, ``add``, ``add_``, ``copy_``, ``clamp_min_``: these and
others, such as the weights' casts) took 85 of the 240 ms of GPU time of two training steps, in torchvision's model
and ours alike: the most this can save.

``FrozenBatchNorm2dKeepsDtype`` computes the same affine map in the input's dtype when that differs from its
buffers' (one ``addcmul`` kernel), so the residual stream stays bf16, as it does with trainable BatchNorm under
autocast. The price is rounding: the scale and shift are rounded to bf16 (as autocast rounds every convolution's
weights) and the output once more, where torchvision's float32 output is rounded once, by the next convolution's
cast; each output is within two bf16 roundings of its terms (``tests/modeling/test_frozen_bn.py``). With an input of
the buffers' dtype (float32 training, inference without autocast) it is torchvision's forward, bit for bit. State
dict keys, ``eps`` and the buffers are torchvision's, so checkpoints and ``isinstance(m, FrozenBatchNorm2d)`` are
unaffected.
"""

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

BUFFERS = ("weight", "bias", "running_mean", "running_var")


def frozen_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with each BatchNorm layer (plain or synchronised, at any depth) replaced by a ``FrozenBatchNorm2d``
    holding its affine parameters, running statistics and ``eps``; ``module`` itself if it is one.

    In evaluation mode the result computes what ``module`` computes; in training mode too.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            for buffer in BUFFERS:
                value = getattr(module, buffer)
                if value is not None:  # affine=False or track_running_stats=False: FrozenBatchNorm2d's 1 and 0
                    getattr(frozen, buffer).copy_(value)
        return frozen
    for name, child in module.named_children():
        setattr(module, name, frozen_batchnorm(child))
    return module


class FrozenBatchNorm2dKeepsDtype(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` whose output has its input's dtype.

    Args:
        num_features: channels ``C`` of the input ``[N, C, H, W]``.
        eps: added to the running variance.
    """

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` -> ``[N, C, H, W]`` of ``x``'s dtype."""
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        # The scale and shift in the buffers' precision, as torchvision computes them, then rounded to x's dtype.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        shape = (1, -1, 1, 1)
        return torch.addcmul(bias.to(x.dtype).reshape(shape), x, scale.to(x.dtype).reshape(shape))


def frozen_bn_keeps_dtype(model: nn.Module) -> int:
    """Replaces every torchvision ``FrozenBatchNorm2d`` in ``model`` by a ``FrozenBatchNorm2dKeepsDtype``, in place.

    The new layers hold the old ones' buffers (the same tensors) and ``eps``.

    Args:
        model: any module; its submodules are searched at every depth.

    Returns:
        how many layers were replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not FrozenBatchNorm2d:
                continue
            layer = FrozenBatchNorm2dKeepsDtype(child.weight.shape[0], eps=child.eps)
            for buffer in BUFFERS:
                setattr(layer, buffer, getattr(child, buffer))
            setattr(parent, name, layer)
            replaced += 1
    return replaced


# ---- Folding FrozenBatchNorm2d into the convolution before it (model.fold_frozen_bn) -----------------------------
#
# A FrozenBatchNorm2d right after a convolution is a fixed affine map per output channel, so
# ``bn(conv(x, W)) = conv(x, W * scale) + shift`` with ``scale = weight / sqrt(running_var + eps)`` and
# ``shift = bias - running_mean * scale``. Folded, the convolution reads a rescaled copy of its weights (the size of
# the weights, not of the activations) and adds the shift as its bias, and the normalization layer passes its input
# through: the two activation-sized kernels of each FrozenBatchNorm2d's forward (multiply, add) and the one of its
# backward (multiply) go, for 53 layers of a ResNet-50. Under autocast the folded convolution's output is bf16, as with
# ``frozen_bn_keeps_dtype``. The weights still train (the gradient flows through the product to ``W``); the buffers
# stay where they were, so the state dict, ``eps`` and checkpoints are unchanged. The price is rounding: the product
# ``W * scale`` is rounded where the unfolded layers round ``conv(x, W)`` and then its scaled copy.


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose convolution applies it (:class:`FoldedConv2d`): it passes its input through.

    It keeps torchvision's buffers, ``eps`` and state dict keys, which the convolution reads at every forward.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x


class FoldedConv2d(nn.Conv2d):
    """A convolution followed by a frozen batch norm, as one convolution with rescaled weights and a bias.

    Built by :func:`fold_frozen_bn` from an ``nn.Conv2d`` (its parameters, the same tensors) and the
    :class:`FoldedFrozenBatchNorm2d` after it, which it reads but does not own (the norm stays where it was in the
    module tree, so the state dict keeps its keys).
    """

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C_in, H, W]`` -> ``[N, C_out, H', W']``: ``norm(conv(x))``."""
        norm = self.frozen_bn
        # torchvision's FrozenBatchNorm2d computes its scale and shift so, in the buffers' precision.
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        bias = shift if self.bias is None else torch.addcmul(shift, self.bias, scale)
        return self._conv_forward(x, self.weight * scale.reshape(-1, 1, 1, 1), bias)


def _conv_norm_pairs(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(parent, conv name, norm name)`` for each torchvision FrozenBatchNorm2d that only ever reads the output of
    the ``nn.Conv2d`` before it: ``conv{k}`` / ``bn{k}`` of a ResNet block and of the stem (``ResNet`` and the
    ``IntermediateLayerGetter`` that runs its children in order), and consecutive children of an ``nn.Sequential``
    (a block's downsample)."""
    pairs = []
    for parent in model.modules():
        children = dict(parent.named_children())
        if isinstance(parent, (resnet.Bottleneck, resnet.BasicBlock, resnet.ResNet, IntermediateLayerGetter)):
            candidates = [(f"conv{k}", f"bn{k}") for k in (1, 2, 3)]
        elif isinstance(parent, nn.Sequential):
            names = list(children)
            candidates = list(zip(names, names[1:]))
        else:
            continue
        for conv, norm in candidates:
            if type(children.get(conv)) is nn.Conv2d and type(children.get(norm)) is FrozenBatchNorm2d:
                if children[conv].out_channels == children[norm].weight.shape[0]:
                    pairs.append((parent, conv, norm))
    return pairs


def fold_frozen_bn(model: nn.Module) -> int:
    """Folds every FrozenBatchNorm2d that follows a convolution (:func:`_conv_norm_pairs`) into it, in place.

    Each such convolution becomes a :class:`FoldedConv2d` holding the same parameters and each norm a
    :class:`FoldedFrozenBatchNorm2d` holding the same buffers, so parameters, state dict and an optimizer built
    before or after are unaffected.

    Args:
        model: any module; its submodules are searched at every depth.

    Returns:
        how many norms were folded.
    """
    pairs = _conv_norm_pairs(model)
    for parent, conv_name, norm_name in pairs:
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        folded_norm = FoldedFrozenBatchNorm2d(norm.weight.shape[0], eps=norm.eps)
        for buffer in BUFFERS:
            setattr(folded_norm, buffer, getattr(norm, buffer))
        folded = FoldedConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        folded.weight = conv.weight
        folded.bias = conv.bias
        # Not a registered submodule: the norm stays a child of its parent (and in the state dict) under its name.
        folded.__dict__["frozen_bn"] = folded_norm
        setattr(parent, conv_name, folded)
        setattr(parent, norm_name, folded_norm)
    return len(pairs)
