"""``model.frozen_bn_keeps_dtype``: FrozenBatchNorm2d in the activations' dtype (mrcnn.modeling.frozen_bn)."""

import pytest
import torch
from hydra.utils import instantiate
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from mrcnn.engine.model_record import set_frozen_bn_eps
from mrcnn.modeling.frozen_bn import (
    FoldedConv2d,
    FoldedFrozenBatchNorm2d,
    FrozenBatchNorm2dKeepsDtype,
    fold_frozen_bn,
    frozen_bn_keeps_dtype,
)
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


def frozen_bn_model(keeps_dtype: bool, fold: bool = False):
    """The tiny model with FrozenBatchNorm2d in its ResNet, from seed 0, with random statistics (the same each call)."""
    cfg = compose_config(
        [
            *TINY_MODEL,
            "model.norm=frozen_bn",
            f"model.frozen_bn_keeps_dtype={keeps_dtype}",
            f"model.fold_frozen_bn={fold}",
        ]
    )
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


def train_and_detect(model, images, targets) -> tuple[dict, dict, list]:
    """One training forward and backward (losses, parameter gradients), then the detections in eval mode."""
    model.train()
    torch.manual_seed(5)
    _, losses = model(images, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        detections, _ = model(images)
    return losses, grads, detections


def test_in_float32_the_model_computes_exactly_what_it_did():
    images, targets = shapes_batch(seed=3)
    (losses0, grads0, det0), (losses1, grads1, det1) = (
        train_and_detect(frozen_bn_model(keeps_dtype), images, targets) for keeps_dtype in (False, True)
    )
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


# ---- model.fold_frozen_bn ------------------------------------------------------------------------------------------
BUFFER_NAMES = ("weight", "bias", "running_mean", "running_var")


def test_folding_applies_each_norm_after_its_convolution_and_leaves_the_others():
    generator = torch.Generator().manual_seed(0)
    first = FrozenBatchNorm2d(3)  # reads the input, no convolution before it: left as it is
    layers = torch.nn.Sequential(
        first,
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        FrozenBatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 1, stride=2, bias=True),
        FrozenBatchNorm2d(6, eps=1e-3),
    ).double()
    for layer in layers:
        if isinstance(layer, FrozenBatchNorm2d):
            randomize(layer, generator)
    x = torch.randn(2, 3, 11, 9, generator=generator, dtype=torch.float64)
    expected = layers(x)
    weights = [layers[1].weight, layers[4].weight, layers[4].bias]
    buffers = [getattr(layers[i], name) for i in (2, 5) for name in ("weight", "bias", "running_mean", "running_var")]
    state = layers.state_dict()

    assert fold_frozen_bn(layers) == 2
    assert [type(layer).__name__ for layer in layers] == [
        "FrozenBatchNorm2d",
        "FoldedConv2d",
        "FoldedFrozenBatchNorm2d",
        "ReLU",
        "FoldedConv2d",
        "FoldedFrozenBatchNorm2d",
    ]
    assert [layers[1].weight, layers[4].weight, layers[4].bias] == weights  # the same Parameters
    assert all(a is b for a, b in zip(buffers, (getattr(layers[i], n) for i in (2, 5) for n in BUFFER_NAMES)))
    assert list(layers.state_dict()) == list(state) and layers[5].eps == 1e-3
    torch.testing.assert_close(layers(x), expected, rtol=1e-12, atol=1e-12)

    # A changed eps (as a checkpoint's model record sets it) is read at the next forward.
    set_frozen_bn_eps(layers, 0.5)
    assert not torch.allclose(layers(x), expected, rtol=1e-3, atol=1e-3)


def test_folding_changes_neither_the_state_dict_nor_what_the_job_record_says():
    plain, folded = frozen_bn_model(False), frozen_bn_model(False, fold=True)
    frozen = [n for n, m in plain.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert [n for n, m in folded.named_modules() if type(m) is FoldedFrozenBatchNorm2d] == frozen  # all 20
    assert sum(isinstance(m, FoldedConv2d) for m in folded.modules()) == 20
    plain_state, folded_state = plain.state_dict(), folded.state_dict()
    assert list(folded_state) == list(plain_state)
    assert all(torch.equal(folded_state[k], v) for k, v in plain_state.items())
    assert [n for n, _ in folded.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert describe_model(folded) == describe_model(plain)


def test_the_folded_model_trains_and_detects_as_the_unfolded_one():
    # float64, where the two roundings differ by about 1e-16: the same proposals, samples and detections.
    images, targets = shapes_batch(seed=3)
    images = [image.double() for image in images]
    (losses0, grads0, det0), (losses1, grads1, det1) = (
        train_and_detect(frozen_bn_model(False, fold=fold).double(), images, targets) for fold in (False, True)
    )
    for key in LOSS_KEYS:
        torch.testing.assert_close(losses1[key], losses0[key], rtol=1e-9, atol=1e-12)
    assert grads0.keys() == grads1.keys()
    assert any(".conv1.weight" in k for k in grads1)  # the folded convolutions' weights still learn
    for key in grads0:
        torch.testing.assert_close(grads1[key], grads0[key], rtol=1e-7, atol=1e-10, msg=key)
    for a, b in zip(det0, det1):
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-9, atol=1e-9)
        assert torch.equal(b["labels"], a["labels"])


def test_a_checkpoint_of_the_unfolded_model_loads_into_the_folded_one():
    plain = frozen_bn_model(False).eval()
    folded = frozen_bn_model(False, fold=True).eval()
    generator = torch.Generator().manual_seed(9)
    for module in plain.modules():
        if isinstance(module, FrozenBatchNorm2d):
            randomize(module, generator)  # other statistics than the folded model was built with
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, before = plain.backbone(x), folded.backbone(x)
        folded.load_state_dict(plain.state_dict())
        actual = folded.backbone(x)
    for name in expected:
        scale = float(expected[name].abs().max())
        assert (before[name] - expected[name]).abs().max() > 0.1 * scale  # the statistics loaded did change it
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-5 * scale, msg=name)


def test_under_bf16_autocast_the_folded_backbone_stays_bf16_and_agrees_to_bf16_rounding():
    images, targets = shapes_batch(seed=3)
    plain, folded = frozen_bn_model(False).train(), frozen_bn_model(False, fold=True).train()
    dtypes, losses = block_output_dtypes(folded, images, targets)
    assert dtypes == {torch.bfloat16} and all(torch.isfinite(losses[k]) for k in LOSS_KEYS)
    maps = []
    for model in (plain, folded):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            maps.append(model.backbone(model.transform(images)[0].tensors))
    for name in maps[0]:
        assert_close_for_dtype(maps[1][name], maps[0][name], torch.bfloat16, msg=name)


def test_folding_on_a_model_without_frozen_bn_says_it_does_nothing():
    cfg = compose_config([*TINY_MODEL, "model.fold_frozen_bn=true"])  # the tiny model has GroupNorm
    with pytest.warns(UserWarning, match="fold_frozen_bn.*no FrozenBatchNorm2d"):
        instantiate(cfg.model.net)
