"""A FrozenBatchNorm2d that returns its input's dtype (``model.frozen_bn_keeps_dtype``).

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
from torchvision.ops import FrozenBatchNorm2d

BUFFERS = ("weight", "bias", "running_mean", "running_var")


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
