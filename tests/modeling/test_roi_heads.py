"""RoIHeads directly: RoI sampling, the pooler built once per branch, and the C4 design (Res5RoIHeads)."""

from functools import partial

import pytest
import torch

from mrcnn.modeling.box_head import BoxPredictor, MLPBoxHead, Res5BoxHead
from mrcnn.modeling.mask_head import FCNMaskHead, SigmoidMaskLoss
from mrcnn.modeling.poolers import RoIAlignPooler, RoIPoolPooler
from mrcnn.modeling.roi_heads import Res5RoIHeads, RoIHeads


def fpn_heads(batch_size_per_image=8, positive_fraction=0.25, pooler=None):
    return RoIHeads(
        pooler=pooler or partial(RoIAlignPooler, ["0"], sampling_ratio=2),
        box_resolution=7,
        box_head=MLPBoxHead(4, 7, 16),
        box_predictor=BoxPredictor(16, num_classes=3),
        mask_head=FCNMaskHead(4, 3, num_convs=1, conv_dim=4),
        mask_loss=SigmoidMaskLoss(),
        mask_resolution=14,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
    )


def c4_heads():
    # res5 of a quarter-width ResNet-18: 64 input channels (res4), 128 out.
    return Res5RoIHeads(
        pooler=partial(RoIAlignPooler, ["0"], sampling_ratio=2),
        box_resolution=14,
        box_head=Res5BoxHead(depth=18, width=16, norm="gn"),
        box_predictor=BoxPredictor(128, num_classes=3),
        mask_head=FCNMaskHead(128, 3, num_convs=0, conv_dim=8),
        mask_loss=SigmoidMaskLoss(),
        batch_size_per_image=16,
    )


def target(boxes, labels, size=64):
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, int(y1) : int(y2), int(x1) : int(x2)] = 1
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels), "masks": masks}


def test_the_pooler_is_built_once_per_branch_at_its_resolution():
    heads = fpn_heads(pooler=partial(RoIPoolPooler, ["0"]))
    assert isinstance(heads.box_pooler, RoIPoolPooler) and isinstance(heads.mask_pooler, RoIPoolPooler)
    assert (heads.box_pooler.output_size, heads.mask_pooler.output_size) == (7, 14)
    assert heads.box_pooler is not heads.mask_pooler and heads.box_pooler.featmap_names == ["0"]


def test_sample_rois_adds_ground_truth_matches_and_balances():
    torch.manual_seed(0)
    heads = fpn_heads(batch_size_per_image=8, positive_fraction=0.25)
    gt = target([[10, 10, 30, 30], [40, 5, 60, 25]], [2, 1])
    # Proposals: one on each object (IoU > 0.5), one between thresholds is impossible at 0.5/0.5,
    # and many far from both (negatives).
    on_objects = torch.tensor([[11.0, 11.0, 30.0, 31.0], [40.0, 6.0, 59.0, 25.0]])
    background = torch.tensor([[0.0, 40.0, 10.0 + i, 50.0 + i] for i in range(20)])
    rois, labels, matched, regression = heads.sample_rois([torch.cat([on_objects, background])], [gt])

    [rois], [labels], [matched] = rois, labels, matched
    assert len(rois) == len(labels) == len(matched) == len(regression) == 8
    positives = labels > 0
    # 2 proposals + 2 ground-truth boxes are positives, capped at a quarter of 8.
    assert positives.sum() == 2 and (labels[~positives] == 0).all()
    # Each positive is labelled with the class of the ground truth it matched.
    assert torch.equal(labels[positives], gt["labels"][matched[positives]])
    # Regression targets encode the RoI against its matched box: zero for a ground-truth box itself.
    decoded = heads.box_coder.decode_single(regression[positives], rois[positives])
    torch.testing.assert_close(decoded, gt["boxes"][matched[positives]], atol=1e-4, rtol=0)


def test_sample_rois_on_an_image_without_objects_gives_only_background():
    heads = fpn_heads(batch_size_per_image=4)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 64, 64)}
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [1.0, 2.0, 3.0, 4.0]])
    rois, labels, _, regression = heads.sample_rois([proposals], [empty])
    assert len(rois[0]) == 3 and (labels[0] == 0).all() and regression.shape == (3, 4)


def test_c4_heads_train_the_mask_head_on_res5_output_and_detect():
    torch.manual_seed(0)
    heads = c4_heads()
    assert heads.mask_pooler is None
    features = {"0": torch.randn(2, 64, 4, 4)}  # stride 16 of 64x64 images
    targets = [target([[8, 8, 40, 40]], [1]), target([[20, 4, 60, 30], [0, 30, 20, 60]], [2, 3])]
    proposals = [t["boxes"] + 1.0 for t in targets]
    heads.train()
    _, losses = heads(features, proposals, [(64, 64)] * 2, targets)
    assert set(losses) == {"fastrcnn_class_loss", "fastrcnn_bbox_loss", "maskrcnn_mask_loss"}
    losses["maskrcnn_mask_loss"].backward()
    # The mask loss reaches res5 (the box head) through the shared features: the C4 design.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.box_head.parameters())
    assert heads.box_predictor.cls_score.weight.grad is None

    heads.eval()
    heads.score_thresh = 0.0
    with torch.no_grad():
        detections, _ = heads(features, proposals, [(64, 64)] * 2)
    for d in detections:
        # res5 halves 14x14 RoIs to 7x7; the deconv doubles it: 14x14 masks.
        assert d["masks"].shape[1:] == (1, 14, 14) and len(d["masks"]) == len(d["boxes"])


def test_c4_heads_refuse_a_mask_resolution():
    with pytest.raises(ValueError, match="pools no mask features"):
        Res5RoIHeads(
            partial(RoIAlignPooler, ["0"]), 14, Res5BoxHead(depth=18, width=16, norm="gn"), BoxPredictor(128, 3),
            FCNMaskHead(128, 3, num_convs=0, conv_dim=8), SigmoidMaskLoss(), mask_resolution=14,
        )
