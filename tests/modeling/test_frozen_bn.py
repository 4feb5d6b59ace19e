"""``model.frozen_bn_keeps_dtype``: FrozenBatchNorm2d in the activations' dtype (mrcnn.modeling.frozen_bn)."""

import pytest
import torch
from hydra.utils import instantiate
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from mrcnn.modeling.frozen_bn import FrozenBatchNorm2dKeepsDtype, frozen_bn_keeps_dtype
from mrcnn.modeling.mask_rcnn import LOSS_KEYS
from mrcnn.reporting.job_record import describe_model
from tests.helpers.comparisons import assert_close_for_dtype
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.data import shapes_batch

BF16_EPS = 2.0**-8  # bf16's unit roundoff, the largest relative error of one rounding (8 significant bits)


def randomize(layer: FrozenBatchNorm2d, generator: torch.Generator) -> None:
    """Statistics and affine parameters of a trained network's order, instead of the identity a new layer has."""
    channels = layer.weight.shape[0]
    layer.weight.copy_(0.5 + torch.rand(channels, generator=generator))
    layer.bias.copy_(torch.randn(channels, generator=generator))
    layer.running_mean.copy_(torch.randn(channels, generator=generator))
    layer.running_var.copy_(0.1 + torch.rand(channels, generator=generator) * 3)


def test_the_layer_is_torchvisions_in_float32_and_keeps_bf16_within_its_rounding():
    generator = torch.Generator().manual_seed(0)
    theirs = FrozenBatchNorm2d(32, eps=1e-5)
    randomize(theirs, generator)
    ours = torch.nn.Sequential(theirs)
    assert frozen_bn_keeps_dtype(ours) == 1
    ours = ours[0]
    assert isinstance(ours, FrozenBatchNorm2dKeepsDtype) and ours.eps == theirs.eps
    assert all(
        getattr(ours, name) is getattr(theirs, name) for name in ("weight", "bias", "running_mean", "running_var")
    )

    x = torch.randn(2, 32, 9, 11, generator=generator, requires_grad=True)
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.dtype == torch.float32 and torch.equal(y_ours, y_theirs)
    (grad_ours,) = torch.autograd.grad(y_ours.square().sum(), x)
    (grad_theirs,) = torch.autograd.grad(y_theirs.square().sum(), x)
    assert torch.equal(grad_ours, grad_theirs)

    # A bf16 input (a convolution's output under autocast): torchvision promotes to float32, ours stays bf16. The scale
    # and shift are rounded to bf16 and the result once more: each term is off by at most its own rounding.
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    yb = ours(xb)
    exact = theirs(xb.detach())
    assert theirs(xb).dtype == torch.float32 and yb.dtype == torch.bfloat16
    scale = theirs.weight * (theirs.running_var + theirs.eps).rsqrt()
    shift = theirs.bias - theirs.running_mean * scale
    terms = (xb.detach().float() * scale[:, None, None]).abs() + shift[:, None, None].abs()
    error = (yb.detach().float() - exact).abs()
    assert (error <= 2 * BF16_EPS * terms).all(), (error / terms).max()
    # The bound fails a layer that applies each channel the next channel's statistics.
    wrong = xb.detach().float() * scale.roll(1)[:, None, None] + shift.roll(1)[:, None, None]
    assert ((wrong - exact).abs() > 2 * BF16_EPS * terms).float().mean() > 0.9
    (grad,) = torch.autograd.grad(yb.float().square().sum(), xb)
    assert grad.dtype == torch.bfloat16
    # d(y^2)/dx = 2 y scale: off by the output's error, the scale's rounding and the gradient's own.
    scale = scale[:, None, None]
    assert ((grad.float() - 2 * exact * scale).abs() <= 8 * BF16_EPS * terms * scale.abs()).all()


def frozen_bn_model(keeps_dtype: bool):
    """The tiny model with FrozenBatchNorm2d in its ResNet, from seed 0, with random statistics (the same each call)."""
    cfg = compose_config([*TINY_MODEL, "model.norm=frozen_bn", f"model.frozen_bn_keeps_dtype={keeps_dtype}"])
    torch.manual_seed(0)
    model = instantiate(cfg.model.net)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            randomize(module, generator)
    return model


def test_the_switch_replaces_every_frozen_bn_and_keeps_the_state_dict():
    plain, keeps = frozen_bn_model(False), frozen_bn_model(True)
    frozen = [n for n, m in plain.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 20  # ResNet-18: the stem, 8 blocks of 2, 3 downsamples
    assert not any(isinstance(m, FrozenBatchNorm2dKeepsDtype) for m in plain.modules())
    assert [n for n, m in keeps.named_modules() if type(m) is FrozenBatchNorm2dKeepsDtype] == frozen
    assert not any(type(m) is FrozenBatchNorm2d for m in keeps.modules())
    plain_state, keeps_state = plain.state_dict(), keeps.state_dict()
    assert list(keeps_state) == list(plain_state)
    assert all(torch.equal(keeps_state[k], v) for k, v in plain_state.items())
    # A speed switch: the job record (and so a sweep's report) describes the same model.
    assert describe_model(keeps) == describe_model(plain)
    assert describe_model(keeps)["backbone.norm"] == "FrozenBatchNorm2d"


def test_in_float32_the_model_computes_exactly_what_it_did():
    images, targets = shapes_batch(seed=3)
    results = []
    for keeps_dtype in (False, True):
        model = frozen_bn_model(keeps_dtype).train()
        torch.manual_seed(5)
        _, losses = model(images, targets)
        sum(losses.values()).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            detections, _ = model(images)
        results.append((losses, grads, detections))
    (losses0, grads0, det0), (losses1, grads1, det1) = results
    assert all(torch.equal(losses0[k], losses1[k]) for k in LOSS_KEYS)
    assert grads0.keys() == grads1.keys() and all(torch.equal(grads0[k], grads1[k]) for k in grads0)
    for a, b in zip(det0, det1):
        assert all(torch.equal(a[k], b[k]) for k in a)


def block_output_dtypes(model, images, targets, device_type="cpu") -> tuple[set[torch.dtype], dict]:
    """The dtypes of every ResNet block's output in one bf16-autocast training forward, and its losses."""
    dtypes = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        for m in model.modules()
        if isinstance(m, (BasicBlock, Bottleneck))
    ]
    torch.manual_seed(5)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        _, losses = model(images, targets)
    for hook in hooks:
        hook.remove()
    return dtypes, losses


@pytest.mark.parametrize("keeps_dtype", [False, True])
def test_under_bf16_autocast_the_residual_stream_stays_bf16(keeps_dtype):
    images, targets = shapes_batch(seed=3)
    dtypes, losses = block_output_dtypes(frozen_bn_model(keeps_dtype).train(), images, targets)
    # torchvision's FrozenBatchNorm2d turns every block's output into float32; with the switch none is.
    assert dtypes == ({torch.bfloat16} if keeps_dtype else {torch.float32})
    assert all(torch.isfinite(losses[k]) for k in LOSS_KEYS)


def test_under_bf16_autocast_the_features_and_rpn_losses_agree_to_bf16_rounding():
    # The backbone's maps (what the switch changes) within bf16's tolerance, and the RPN losses, which read them
    # directly. The heads' losses are left out: which proposals a random model ranks first flips with any rounding.
    images, targets = shapes_batch(seed=3)
    maps, losses = [], []
    for keeps_dtype in (False, True):
        model = frozen_bn_model(keeps_dtype).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            maps.append(model.backbone(model.transform(images)[0].tensors))
        _, step_losses = block_output_dtypes(model, images, targets)
        losses.append(step_losses)
    for name in maps[0]:
        assert_close_for_dtype(maps[1][name], maps[0][name], torch.bfloat16, msg=name)
    for key in ("rpn_class_loss", "rpn_bbox_loss"):
        torch.testing.assert_close(losses[1][key].float(), losses[0][key].float(), rtol=0.01, atol=1e-4)


def test_the_switch_on_a_model_without_frozen_bn_says_it_does_nothing():
    cfg = compose_config([*TINY_MODEL, "model.frozen_bn_keeps_dtype=true"])  # the tiny model has GroupNorm
    with pytest.warns(UserWarning, match="frozen_bn_keeps_dtype.*no FrozenBatchNorm2d"):
        instantiate(cfg.model.net)
