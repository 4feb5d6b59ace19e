"""Matching and sampling for all images at once (issue 22): torchvision's labels, the sampler's distribution, no sync."""

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_iou

from mrcnn.modeling import sampling
from tests.helpers.host_syncs import count_host_syncs
from tests.modeling.test_batched_proposals import rpn_pair
from tests.modeling.test_rpn import inputs


def random_boxes(n, size=64.0):
    xy = torch.rand(n, 2) * size * 0.7
    return torch.cat([xy, xy + 4 + torch.rand(n, 2) * size * 0.3], dim=1)


@pytest.mark.parametrize("low_quality", [False, True])
def test_matching_gives_torchvisions_labels_for_every_image(low_quality):
    torch.manual_seed(0)
    gts = [random_boxes(3), random_boxes(1), random_boxes(0), random_boxes(5)]
    predictions = torch.stack([random_boxes(200) for _ in gts])
    predictions[0, :3] = gts[0]  # exact matches and ties with the best IoU
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    padded, valid = sampling.pad_boxes(gts)
    matched, _ = sampling.match(sampling.batched_box_iou(padded, predictions), valid, 0.7, 0.3, low_quality)
    for i, gt in enumerate(gts):
        if len(gt) == 0:
            assert (matched[i] == sampling.BELOW_LOW_THRESHOLD).all()
            continue
        assert torch.equal(sampling.batched_box_iou(gt[None], predictions[i : i + 1])[0], box_iou(gt, predictions[i]))
        assert torch.equal(matched[i], matcher(box_iou(gt, predictions[i]))), i


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_boxes_match_as_torchvisions_do(dtype):
    # trainer.precision=16-true / bf16-true: boxes without autocast. torchvision computes IoU in float32; in float16 a
    # 512-px anchor's area is infinite, its IoU NaN, and a NaN IoU passes every threshold test in match.
    gt = torch.tensor([[[0.0, 0.0, 500.0, 500.0]]])
    anchors = torch.tensor([[[0.0, 0.0, 512.0, 512.0], [100.0, 100.0, 400.0, 420.0], [0.0, 0.0, 300.0, 280.0]]])
    iou = sampling.batched_box_iou(gt.to(dtype), anchors.to(dtype))
    assert iou.dtype == torch.float32
    torch.testing.assert_close(iou[0], box_iou(gt[0].to(dtype), anchors[0].to(dtype)), rtol=0, atol=0)
    matched, _ = sampling.match(iou, torch.ones(1, 1, dtype=torch.bool), 0.7, 0.3)
    assert matched[0].tolist() == Matcher(0.7, 0.3)(box_iou(gt[0], anchors[0])).tolist() == [0, -2, -2]


def test_sampling_draws_torchvisions_counts_uniformly():
    labels = torch.full((2, 40), -1)
    labels[0, :6], labels[0, 6:30] = 1, 0  # 6 positives (more than the 4 allowed), 24 negatives
    labels[1, :2], labels[1, 2:5] = 3, 0  # 2 positives, 3 negatives (fewer than asked)
    hits_pos, hits_neg, draws = torch.zeros(40), torch.zeros(40), 4000
    torch.manual_seed(0)
    for _ in range(draws):
        positive, negative = sampling.sample(labels, batch_size_per_image=16, positive_fraction=0.25)
        # torchvision's counts: min(#pos, 16 * 0.25), min(#neg, 16 - that).
        assert positive.sum(1).tolist() == [4, 2] and negative.sum(1).tolist() == [12, 3]
        assert (labels[positive] >= 1).all() and (labels[negative] == 0).all()
        hits_pos += positive[0]
        hits_neg += negative[0]
    # Uniform: each candidate drawn with probability count / candidates (4/6 and 12/24), within 4 standard errors.
    for hits, p, idx in ((hits_pos, 4 / 6, slice(0, 6)), (hits_neg, 12 / 24, slice(6, 30))):
        error = 4 * (p * (1 - p) / draws) ** 0.5
        assert ((hits[idx] / draws - p).abs() < error).all(), hits[idx] / draws
    assert hits_pos[6:].sum() == 0 and hits_neg[30:].sum() == 0


def test_rpn_losses_are_torchvisions_for_the_same_draw_with_one_host_sync():
    images, features, targets = inputs(levels=2)
    targets[1] = {
        "boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0], [30.0, 30.0, 60.0, 44.0]]),
        "labels": torch.tensor([1, 2]),
    }
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})  # no ground truth
    images.tensors = torch.zeros(3, 3, 64, 64)
    images.image_sizes.append((64, 64))
    features = {k: torch.cat([v, v[:1]]) for k, v in features.items()}
    plain, batched = rpn_pair([[16], [32]])
    batched.batched_sampling = True
    maps = list(features.values())
    objectness, deltas = batched.head(maps)
    anchors = batched.anchor_generator(images, maps)
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    torch.manual_seed(3)
    (class_loss, bbox_loss), syncs = count_host_syncs(batched.batched_losses, objectness, deltas, anchors, targets)
    assert sum(syncs.values()) == 0, syncs.report()

    labels, matched = plain.assign_targets_to_anchors(anchors, targets)
    torch.manual_seed(3)  # the same draw, handed to torchvision's loss
    positive, negative = sampling.sample(torch.stack(labels), 256, 0.5)
    plain.fg_bg_sampler = lambda _: (list(positive.to(torch.uint8)), list(negative.to(torch.uint8)))
    expected = plain.compute_loss(objectness, deltas, labels, plain.box_coder.encode(matched, anchors))
    torch.testing.assert_close(class_loss, expected[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(bbox_loss, expected[1], rtol=1e-6, atol=0)
    assert positive.any(dim=1)[:2].all() and not positive[2].any()
