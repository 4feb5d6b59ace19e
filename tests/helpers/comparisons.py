"""Comparisons of two models' numbers whose tolerance comes from the dtype, not from one machine's noise.

On a GPU, two correct paths (NCHW and NHWC convolutions, eager and compiled kernels) sum in different orders, and
a gradient that is a sum over millions of products differs in its last bits. End to end, such a difference can
also flip a near-tie in proposal ranking or sampling and move a gradient by much more, while the losses stay
equal. So these helpers compare the part that a switch changes (the backbone) on a fixed objective, at a relative
tolerance set by the dtype and scaled by the tensor's largest value; a real error (a swapped channel order, a
wrong layout) moves the numbers by their own size and fails (tests/modeling/test_gpu_comparisons.py).
"""

import torch

# Relative tolerance per dtype: about 2**-10 for fp32 sums reordered over ~1e6 terms (sqrt(n) * 2**-24 ~ 6e-5,
# with margin), 2**-5 for bf16's 8-bit mantissa.
RTOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def assert_close_for_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype=torch.float32, msg: str = "") -> None:
    """``actual`` equals ``expected`` within ``dtype``'s relative tolerance, elementwise up to
    ``RTOL[dtype] * max|expected|`` (entries near zero are held to the tensor's scale, not their own)."""
    rtol = RTOL[dtype]
    atol = rtol * float(expected.detach().abs().max()) + 1e-12
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda text: f"{msg}: {text}" if msg else text
    )


def backbone_outputs_and_grad(module, images: torch.Tensor, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """The backbone's feature maps on ``images`` [B, 3, H, W] and the gradient of its first convolution's
    weight for a fixed objective (each map's dot product with fixed random weights drawn from ``seed``).

    Returns:
        ({name: map [B, C, h, w] as a contiguous fp32 tensor}, conv1 weight gradient [C_out, 3, k, k]).
    """
    backbone = module.model.backbone
    backbone.zero_grad(set_to_none=True)
    maps = backbone(images)
    generator = torch.Generator().manual_seed(seed)
    objective = sum((m.float() * torch.randn(m.shape, generator=generator).to(m.device)).sum() for m in maps.values())
    objective.backward()
    grad = backbone.body.conv1.weight.grad.detach().contiguous().float()
    return {k: v.detach().contiguous().float() for k, v in maps.items()}, grad


def assert_same_backbone(module, reference, images: torch.Tensor, dtype=torch.float32) -> None:
    """``module``'s backbone computes what ``reference``'s does on ``images``: maps and conv1 gradients."""
    maps, grad = backbone_outputs_and_grad(module, images)
    ref_maps, ref_grad = backbone_outputs_and_grad(reference, images)
    assert maps.keys() == ref_maps.keys()
    for name in maps:
        assert_close_for_dtype(maps[name], ref_maps[name], dtype, msg=f"feature map {name}")
    assert_close_for_dtype(grad, ref_grad, dtype, msg="conv1 weight gradient")
