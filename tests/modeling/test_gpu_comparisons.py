"""The GPU tests' comparisons (tests/helpers/comparisons.py) on the CPU: they pass on two correct layouts and
fail on a real error, so a GPU test that uses them can fail for a reason, not for TF32 or summation noise."""

import pytest
import torch
from hydra.utils import instantiate

from mrcnn.data.shapes import ShapesDataset
from tests.helpers.comparisons import assert_close_for_dtype, assert_same_backbone
from tests.helpers.config import TINY_MODEL, compose_config


def build(overrides=()):
    torch.manual_seed(0)
    return instantiate(compose_config([*TINY_MODEL, *overrides]).module)


@pytest.fixture(scope="module")
def images():
    dataset = ShapesDataset(num_images=2, image_size=64, seed=1)
    return torch.stack([dataset[i][0] for i in range(2)])


def test_channels_last_backbone_passes_the_comparison(images):
    plain, fast = build(), build(["module.channels_last=true"])
    fast.load_state_dict(plain.state_dict())
    assert fast.model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # On one NCHW batch the two layouts are really compared: the NHWC weights make their convolutions NHWC, the
    # reference's stay NCHW. (An NHWC batch would have made the reference's NHWC as well.)
    with torch.no_grad():
        assert all(m.is_contiguous() for m in plain.model.backbone(images).values())
        maps = fast.model.backbone(images)
        assert all(m.is_contiguous(memory_format=torch.channels_last) for m in maps.values())
        assert not maps["0"].is_contiguous()  # (a 1x1 map, P6 here, is both)
        nhwc_batch = images.contiguous(memory_format=torch.channels_last)
        assert not plain.model.backbone(nhwc_batch)["0"].is_contiguous()
    assert_same_backbone(fast, plain, images)


def test_a_swapped_channel_order_fails_the_comparison(images):
    plain, swapped = build(), build(["module.channels_last=true"])
    swapped.load_state_dict(plain.state_dict())
    with torch.no_grad():  # the first convolution reads BGR where the reference reads RGB
        weight = swapped.model.backbone.body.conv1.weight
        weight.copy_(weight[:, [2, 1, 0]].clone())
    with pytest.raises(AssertionError, match="feature map"):
        assert_same_backbone(swapped, plain, images)


def test_dtype_tolerance_admits_reordered_sums_and_rejects_real_errors():
    torch.manual_seed(0)
    terms = torch.randn(64, 100_000)
    forward, backward = terms.sum(1), terms.flip(1).sum(1)  # the same sums in another order
    assert not torch.equal(forward, backward)
    assert_close_for_dtype(forward, backward, torch.float32)
    wrong = backward.clone()
    wrong[3] += 0.01 * backward.abs().max()  # one entry off by 1% of the scale
    with pytest.raises(AssertionError):
        assert_close_for_dtype(wrong, forward, torch.float32)
