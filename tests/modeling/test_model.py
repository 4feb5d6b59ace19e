"""MaskRCNN behaviour for every neck: losses in training, detections and losses in eval, empty input."""

import pytest
import torch
from hydra.utils import instantiate

from mrcnn.data.shapes import ShapesDataset
from mrcnn.modeling.mask_rcnn import LOSS_KEYS
from tests.helpers.config import TINY_MODEL, compose_config


def build(overrides=()):
    return instantiate(compose_config([*TINY_MODEL, *overrides]).model.net)


def batch(n=2, size=64, empty_first=False):
    ds = ShapesDataset(num_images=n, image_size=size, seed=3)
    images, targets = zip(*(ds[i] for i in range(n)))
    targets = [dict(t) for t in targets]
    if empty_first:
        t = targets[0]
        targets[0] = dict(t, boxes=t["boxes"][:0], labels=t["labels"][:0], masks=t["masks"][:0])
    return list(images), targets


@pytest.mark.parametrize("width", [64, 16])
@pytest.mark.parametrize("backbone", ["fpn", "c4", "c5"])
def test_train_mode_returns_five_finite_losses_that_backpropagate(backbone, width):
    torch.manual_seed(0)
    model = build([f"model/backbone={backbone}", f"model.width={width}"]).train()
    images, targets = batch(empty_first=True)
    detections, losses = model(images, targets)
    assert detections == [] and set(losses) == set(LOSS_KEYS)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with_grad = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in with_grad), "every trainable parameter is in the graph"


@pytest.mark.parametrize("backbone", ["fpn", "c4"])
def test_eval_mode_returns_detections_and_losses_in_one_forward(backbone):
    torch.manual_seed(0)
    model = build([f"model/backbone={backbone}", "model.box_score_thresh=0.0"]).eval()
    images, targets = batch()
    with torch.no_grad():
        detections, losses = model(images, targets)
        only_detections, no_losses = model(images)
    assert set(losses) == set(LOSS_KEYS) and no_losses == {}
    for det, img in zip(detections, images):
        n = len(det["boxes"])
        assert n > 0
        assert det["masks"].shape == (n, 1, *img.shape[-2:])
        assert det["labels"].dtype == torch.int64 and det["scores"].shape == (n,)
        assert 0 <= det["masks"].min() and det["masks"].max() <= 1
    for a, b in zip(detections, only_detections):
        torch.testing.assert_close(a["boxes"], b["boxes"])


def test_validation_losses_leave_batchnorm_statistics_alone():
    model = build(["model.norm=bn"]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    images, targets = batch()
    with torch.no_grad():
        model(images, targets)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_no_detections_gives_empty_well_shaped_outputs():
    model = build(["model.box_score_thresh=1.0"]).eval()
    images, _ = batch()
    with torch.no_grad():
        detections, _ = model(images)
    for det, img in zip(detections, images):
        assert det["boxes"].shape == (0, 4) and det["masks"].shape == (0, 1, *img.shape[-2:])


def test_a_batch_without_any_objects_trains():
    model = build().train()
    images, targets = batch(n=1, empty_first=True)
    _, losses = model(images, targets)
    assert losses["maskrcnn_mask_loss"].item() == 0.0 and losses["fastrcnn_bbox_loss"].item() == 0.0
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_bad_targets_fail_early_naming_the_image():
    model = build().train()
    images, targets = batch()
    targets[1]["boxes"][0] = torch.tensor([10.0, 10.0, 10.0, 20.0])
    with pytest.raises(ValueError, match=r"image_id 2.*non-positive width"):
        model(images, targets)
    images, targets = batch()
    targets[0]["labels"] = targets[0]["labels"].to(torch.int32)
    with pytest.raises(ValueError, match="int64"):
        model(images, targets)
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
