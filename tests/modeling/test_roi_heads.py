"""RoIHeads directly: RoI sampling, the pooler built once per branch, and the C4 design (Res5RoIHeads)."""

from functools import partial

import pytest
import torch

from mrcnn.modeling.box_head import BoxPredictor, MLPBoxHead, Res5BoxHead
from mrcnn.modeling.mask_head import (
    FCNMaskHead,
    MLPMaskHead,
    SigmoidMaskLoss,
    SoftmaxMaskLoss,
)
from mrcnn.modeling.poolers import RoIAlignPooler, RoIPoolPooler
from mrcnn.modeling.roi_heads import Res5RoIHeads, RoIHeads


def fpn_heads(batch_size_per_image=8, positive_fraction=0.25, pooler=None, mask_loss=None, **kwargs):
    return RoIHeads(
        pooler=pooler or partial(RoIAlignPooler, ["0"], sampling_ratio=2),
        box_resolution=7,
        box_head=MLPBoxHead(4, 7, 16),
        box_predictor=BoxPredictor(16, num_classes=3),
        mask_head=FCNMaskHead(4, 3, num_convs=1, conv_dim=4),
        mask_loss=mask_loss or SigmoidMaskLoss(),
        mask_resolution=14,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
        **kwargs,
    )


def c4_heads(mask_head=None):
    # res5 of a quarter-width ResNet-18: 64 input channels (res4), 128 out.
    return Res5RoIHeads(
        pooler=partial(RoIAlignPooler, ["0"], sampling_ratio=2),
        box_resolution=14,
        box_head=Res5BoxHead(depth=18, width=16, norm="gn"),
        box_predictor=BoxPredictor(128, num_classes=3),
        mask_head=mask_head or FCNMaskHead(128, 3, num_convs=0, conv_dim=8),
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
            partial(RoIAlignPooler, ["0"]),
            14,
            Res5BoxHead(depth=18, width=16, norm="gn"),
            BoxPredictor(128, 3),
            FCNMaskHead(128, 3, num_convs=0, conv_dim=8),
            SigmoidMaskLoss(),
            mask_resolution=14,
        )


class Recording:
    """Test-only: wraps a mask loss and keeps the target tensor each call receives."""

    def __init__(self, loss):
        self.inner, self.per_class_only, self.targets = loss, loss.per_class_only, []

    def loss(self, mask_logits, labels, targets):
        self.targets.append(targets.clone())
        return self.inner.loss(mask_logits, labels, targets)

    def inference(self, mask_logits, labels):
        return self.inner.inference(mask_logits, labels)


@pytest.mark.parametrize("form", ["soft", "binary"])
def test_every_mask_loss_receives_the_same_targets(form):
    """Table 2b changes the loss and nothing else: swapping it leaves the targets it trains on unchanged."""
    # Boxes off the 64-pixel grid of the masks, so the soft targets have fractional edges.
    targets = [target([[8, 8, 40, 40], [20, 4, 60, 30]], [1, 3])]
    proposals = [torch.tensor([[9.3, 8.6, 39.2, 41.1], [21.7, 4.4, 58.9, 30.6], [0.0, 40.0, 12.0, 60.0]])]
    features = {"0": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))}
    received = {}
    for loss in (SigmoidMaskLoss(), SoftmaxMaskLoss()):
        torch.manual_seed(0)  # the same RoI sample for both
        recording = Recording(loss)
        heads = fpn_heads(batch_size_per_image=16, positive_fraction=0.5, mask_loss=recording, mask_target_form=form)
        heads.train()
        heads(features, proposals, [(64, 64)], targets)
        (received[type(loss).__name__],) = recording.targets
    sigmoid, softmax = received["SigmoidMaskLoss"], received["SoftmaxMaskLoss"]
    assert len(sigmoid) >= 4
    assert torch.equal(sigmoid, softmax)
    # Every positive RoI overlaps its object by IoU >= 0.5, so each target holds a piece of a mask.
    assert (sigmoid.amax(dim=(1, 2)) > 0.5).all()
    if form == "binary":
        assert set(sigmoid.unique().tolist()) == {0.0, 1.0}
    else:
        assert ((sigmoid > 0) & (sigmoid < 1)).any()


def test_the_mask_target_form_is_checked_when_the_heads_are_built():
    with pytest.raises(ValueError, match="mask_target_form"):
        fpn_heads(mask_target_form="hard")
    assert fpn_heads().mask_target_form == "soft"  # torchvision's targets, the parity default


def test_c4_with_an_mlp_mask_head_sized_for_res5_output_trains():
    """C4's mask head reads res5's 7x7 output; an MLP sized for it trains and predicts 14x14 masks like the FCN."""
    torch.manual_seed(0)
    heads = c4_heads(MLPMaskHead(128, 3, resolution=7, hidden_dims=(16, 16), mask_resolution=14))
    features = {"0": torch.randn(2, 64, 4, 4)}
    targets = [target([[8, 8, 40, 40]], [1]), target([[20, 4, 60, 30]], [2])]
    heads.train()
    _, losses = heads(features, [t["boxes"] + 1.0 for t in targets], [(64, 64)] * 2, targets)
    losses["maskrcnn_mask_loss"].backward()
    assert torch.isfinite(losses["maskrcnn_mask_loss"])
    assert heads.mask_head.hidden[0].weight.grad.abs().sum() > 0


def test_an_mlp_mask_head_sized_for_other_features_is_refused_when_built():
    # C4 feeds 7x7 res5 features: an MLP sized for 14x14 (the FPN/C5 pooled side) would fail at the first step.
    with pytest.raises(ValueError, match="sized for 14x14 inputs, but Res5RoIHeads feeds its mask head 7x7"):
        c4_heads(MLPMaskHead(128, 3, resolution=14, hidden_dims=(16, 16), mask_resolution=28))
    with pytest.raises(ValueError, match="sized for 7x7 inputs, but RoIHeads feeds its mask head 14x14"):
        RoIHeads(
            partial(RoIAlignPooler, ["0"]),
            7,
            MLPBoxHead(4, 7, 16),
            BoxPredictor(16, 3),
            MLPMaskHead(4, 3, resolution=7, hidden_dims=(8,), mask_resolution=14),
            SigmoidMaskLoss(),
            mask_resolution=14,
        )
