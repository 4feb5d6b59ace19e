"""The default configuration computes exactly what torchvision's Mask R-CNN computes."""

from functools import partial

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from mrcnn.modeling.backbone import resnet_fpn
from mrcnn.modeling.box_head import BoxPredictor, MLPBoxHead
from mrcnn.modeling.mask_head import FCNMaskHead, SigmoidMaskLoss
from mrcnn.modeling.mask_rcnn import MaskRCNN, load_torchvision_weights
from mrcnn.modeling.poolers import RoIAlignPooler
from mrcnn.modeling.roi_heads import RoIHeads
from mrcnn.modeling.rpn import RPN
from tests.helpers.torchvision_models import coco_like_torchvision_maskrcnn, torchvision_maskrcnn

FPN_LEVELS = ["0", "1", "2", "3"]


def build_reference_config(num_classes: int, min_size: int, max_size: int) -> MaskRCNN:
    """Ours, configured like torchvision's maskrcnn_resnet50_fpn (weights=None: plain BatchNorm)."""
    return MaskRCNN(
        backbone=resnet_fpn(depth=50, norm="bn", trainable_layers=5),
        rpn=RPN(256, [[32], [64], [128], [256], [512]]),
        roi_heads=RoIHeads(
            pooler=partial(RoIAlignPooler, FPN_LEVELS, sampling_ratio=2, aligned=False),
            box_resolution=7,
            box_head=MLPBoxHead(256, 7, 1024),
            box_predictor=BoxPredictor(1024, num_classes),
            mask_head=FCNMaskHead(256, num_classes, num_convs=4, conv_dim=256),
            mask_loss=SigmoidMaskLoss(),
            mask_resolution=14,
        ),
        min_size=min_size,
        max_size=max_size,
    )


def _random_targets(images, num_classes, generator):
    targets = []
    for img in images:
        h, w = img.shape[-2:]
        n = 3
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([w / 2, h / 2])
        wh = 16 + torch.rand(n, 2, generator=generator) * torch.tensor([w / 3, h / 3])
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
            masks[i, y1:y2, x1:x2] = 1
        labels = torch.randint(1, num_classes + 1, (n,), generator=generator)
        targets.append(dict(boxes=boxes, labels=labels, masks=masks))
    return targets


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=256, max_size=320
    )
    # Random-init heads predict almost nothing above the score threshold; sharpen the class
    # scores so there are many detections (and masks) to compare.
    with torch.no_grad():
        theirs.roi_heads.box_predictor.cls_score.weight.mul_(30)
    ours = build_reference_config(90, 256, 320)
    load_torchvision_weights(ours, theirs.state_dict())
    return ours.eval(), theirs.eval()


def test_detections_equal_torchvision(models):
    ours, theirs = models
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 240, 320, generator=g), torch.rand(3, 200, 260, generator=g)]
    with torch.no_grad():
        expected = theirs(images)
        detections, losses = ours(images)
    assert losses == {}
    for mine, ref in zip(detections, expected):
        assert len(ref["boxes"]) > 10, "the comparison needs detections"
        for key in ("boxes", "labels", "scores", "masks"):
            torch.testing.assert_close(mine[key], ref[key], rtol=1e-4, atol=1e-4)


def test_training_losses_equal_torchvision(models):
    """Same weights, same RNG state: the five losses equal torchvision's four-plus-one."""
    ours, theirs = models
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 240, 320, generator=g), torch.rand(3, 200, 260, generator=g)]
    targets = _random_targets(images, 90, g)
    ours.train(), theirs.train()
    try:
        torch.manual_seed(3)
        ref = theirs(images, [dict(t) for t in targets])
        torch.manual_seed(3)
        detections, mine = ours(images, [dict(t) for t in targets])
    finally:
        ours.eval(), theirs.eval()
    assert detections == []
    names = {
        "loss_objectness": "rpn_class_loss",
        "loss_rpn_box_reg": "rpn_bbox_loss",
        "loss_classifier": "fastrcnn_class_loss",
        "loss_box_reg": "fastrcnn_bbox_loss",
        "loss_mask": "maskrcnn_mask_loss",
    }
    for theirs_key, our_key in names.items():
        torch.testing.assert_close(mine[our_key], ref[theirs_key], rtol=1e-4, atol=1e-5)


def test_checkpoint_of_another_architecture_is_a_clear_error(models, tmp_path):
    ours, _ = models
    other = torchvision_maskrcnn(depth=18, fpn_channels=64)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match=r"other\.pth does not match.*layer1\.0\.conv1\.weight"):
        load_torchvision_weights(ours, str(path))


def _compare(detections, expected, tolerance):
    for mine, ref in zip(detections, expected, strict=True):
        for key in ("boxes", "labels", "scores", "masks"):
            torch.testing.assert_close(mine[key], ref[key], rtol=tolerance, atol=tolerance)


def test_torchvision_coco_weights_load_exactly(tmp_path):
    """``weights=`` with torchvision's COCO model reproduces torchvision's detections: boxes, scores, labels, masks.

    torchvision's builder sets every FrozenBatchNorm2d eps to 0 after loading its COCO weights. With default
    statistics (mean 0, variance 1) eps 1e-5 is invisible; here the statistics are measured on an image and
    perturbed, as trained ones are, and the test shows it would catch the 1e-5 / 0 difference.
    """
    from mrcnn.engine.build import build_module
    from tests.helpers.config import compose_config

    g = torch.Generator().manual_seed(4)
    images = [torch.rand(3, 240, 320, generator=g), torch.rand(3, 200, 260, generator=g)]
    theirs = coco_like_torchvision_maskrcnn(images[0], num_classes=91, min_size=256, max_size=320)
    with torch.no_grad():
        # Random-init heads score every class alike; sharpen the class scores so that there are many
        # detections, with distinct scores, to compare.
        theirs.roi_heads.box_predictor.cls_score.weight.mul_(3)
    assert {m.eps for m in theirs.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}
    path = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(theirs.state_dict(), path)

    overrides = ["model=torchvision_r50_fpn", "model.num_classes=90", "data.min_size=256", "data.max_size=320"]
    ours = build_module(compose_config([*overrides, f"weights={path}"])).model.eval()
    norms = [m for m in ours.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(norms) == 53 and {m.eps for m in norms} == {0.0}
    with torch.no_grad():
        expected = theirs(images)
        detections, _ = ours(images)
    assert all(len(ref["boxes"]) > 10 for ref in expected), "the comparison needs detections"
    _compare(detections, expected, 1e-5)

    # The eps the model had before (1e-5): the same weights give detections the comparison rejects.
    for norm in norms:
        norm.eps = 1e-5
    with torch.no_grad():
        detections, _ = ours(images)
    with pytest.raises(AssertionError):
        _compare(detections, expected, 1e-4)
