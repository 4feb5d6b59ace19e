"""ResNet bodies: torchvision's layout at the standard width, and the ``width`` knob for narrow CPU models."""

import pytest
import torch
from torchvision.models import resnet18, resnet50

from mrcnn.modeling.backbone import resnet_body, resnet_c4, resnet_c5, resnet_fpn, stage_channels
from mrcnn.modeling.box_head import Res5BoxHead


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("depth, reference", [(18, resnet18), (50, resnet50)])
def test_standard_width_is_torchvisions_resnet(depth, reference):
    ours = resnet_body(depth, "bn")
    assert shapes(ours) == shapes(reference(weights=None))


@pytest.mark.parametrize("depth, width", [(18, 16), (18, 32), (50, 16)])
def test_narrow_resnet_scales_every_stage_and_keeps_the_names(depth, width):
    body = resnet_body(depth, "gn", width=width)
    standard = resnet_body(depth, "gn")
    assert body.state_dict().keys() == standard.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    x = body.maxpool(body.relu(body.bn1(body.conv1(x))))
    assert x.shape == (2, width, 16, 16)
    for stage, layer in zip(range(2, 6), [body.layer1, body.layer2, body.layer3, body.layer4]):
        x = layer(x)
        side = 16 // 2 ** (stage - 2)
        assert x.shape == (2, stage_channels(depth, stage, width), side, side)
    # Initialised as torchvision initialises: He-normal convs (fan out), unit-scale zero-bias norms.
    conv = body.layer4[0].conv1
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    assert torch.equal(body.bn1.weight, torch.ones(width)) and torch.equal(body.bn1.bias, torch.zeros(width))


def test_stage_channels():
    assert [stage_channels(18, s) for s in range(2, 6)] == [64, 128, 256, 512]
    assert [stage_channels(50, s) for s in range(2, 6)] == [256, 512, 1024, 2048]
    assert [stage_channels(18, s, 16) for s in range(2, 6)] == [16, 32, 64, 128]
    assert stage_channels(50, 4, 32) == 512


def test_narrow_necks_and_c4_head_fit_together():
    images = torch.randn(1, 3, 64, 64)
    c4 = resnet_c4(depth=18, norm="gn", width=16)
    res4 = c4(images)["0"]
    assert res4.shape == (1, c4.out_channels, 4, 4) and c4.out_channels == 64
    head = Res5BoxHead(depth=18, norm="gn", width=16)
    assert head(torch.randn(3, 64, 14, 14)).shape == (3, head.out_channels, 7, 7) and head.out_channels == 128
    c5 = resnet_c5(depth=18, norm="gn", width=16)
    assert c5(images)["0"].shape == (1, 128, 2, 2)
    fpn = resnet_fpn(depth=18, norm="gn", out_channels=32, width=16)
    assert [tuple(v.shape) for v in fpn(images).values()] == [(1, 32, s, s) for s in (16, 8, 4, 2, 1)]


def test_pretrained_weights_with_a_narrow_width_are_a_clear_error(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    resnet_body(18, "frozen_bn", str(path))  # the standard width loads
    with pytest.raises(ValueError, match=f"{path}.*width 64.*16"):
        resnet_body(18, "frozen_bn", str(path), width=16)
    with pytest.raises(ValueError, match="width must be positive"):
        resnet_body(18, "gn", width=0)


@pytest.mark.parametrize("norm", ["bn", "syncbn"])
def test_frozen_stages_keep_their_batchnorm_statistics(norm):
    # As Detectron2 freezes them: a frozen stage is a fixed function; trainable BatchNorm in it would still
    # normalise by each batch's statistics and move its running ones.
    torch.manual_seed(0)
    trained = resnet_fpn(depth=18, norm=norm, trainable_layers=5, width=8)
    for module in trained.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):  # statistics of their own, not 0 and 1
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    frozen = resnet_fpn(depth=18, norm=norm, trainable_layers=2, width=8)
    frozen.load_state_dict(trained.state_dict())  # a checkpoint trained with BatchNorm everywhere loads
    images = torch.randn(2, 3, 64, 64)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}

    frozen.train()
    if norm == "syncbn":  # one process: SyncBatchNorm refuses a CPU input in training; its frozen stages take it
        for stage in ("layer1", "layer2"):
            assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in getattr(frozen.body, stage).modules())
    else:
        frozen(images)
        after = frozen.state_dict()
        moved = {k for k in before if "running" in k and not torch.equal(before[k], after[k])}
        assert moved and all(k.startswith(("body.layer3.", "body.layer4.")) for k in moved), sorted(moved)
    # The frozen stages compute what the trained model's stages compute at evaluation, in training too.
    trained.eval()
    reference = trained.body.layer2(
        trained.body.layer1(trained.body.maxpool(trained.body.relu(trained.body.bn1(trained.body.conv1(images)))))
    )
    ours = frozen.body.layer2(
        frozen.body.layer1(frozen.body.maxpool(frozen.body.relu(frozen.body.bn1(frozen.body.conv1(images)))))
    )
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert not any(
        p.requires_grad for name, p in frozen.body.named_parameters() if not name.startswith(("layer3", "layer4"))
    )
