"""Box/mask heads and the Fast R-CNN and mask losses: shapes, hand-checked values, empty input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.roi_heads import fastrcnn_loss as tv_fastrcnn_loss
from torchvision.models.detection.roi_heads import maskrcnn_loss as tv_maskrcnn_loss

from mrcnn.modeling import mask_head
from mrcnn.modeling.box_head import (
    BoxPredictor,
    MLPBoxHead,
    Res5BoxHead,
    fast_rcnn_inference,
    fast_rcnn_loss,
)
from mrcnn.modeling.mask_head import (
    FCNMaskHead,
    MLPMaskHead,
    mask_inference_sigmoid,
    mask_inference_softmax,
    mask_loss_sigmoid,
    mask_loss_softmax,
    mask_targets,
    mask_targets_batched,
    stack_masks,
)
from tests.helpers.host_syncs import count_host_syncs


def test_fcn_head_shapes_fpn_c4_and_agnostic():
    assert FCNMaskHead(16, num_classes=5)(torch.randn(3, 16, 14, 14)).shape == (3, 6, 28, 28)
    # C4: no convs, deconv on the 7x7 res5 output -> 14x14.
    assert FCNMaskHead(32, num_classes=5, num_convs=0, conv_dim=8)(torch.randn(2, 32, 7, 7)).shape == (2, 6, 14, 14)
    assert FCNMaskHead(16, num_classes=5, class_agnostic=True)(torch.randn(3, 16, 14, 14)).shape == (3, 1, 28, 28)
    head = FCNMaskHead(16, num_classes=5, num_convs=4, conv_dim=8, norm="gn")
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in head.modules()) == 4
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head.modules()) == 5  # 4 convs + predictor


@pytest.mark.parametrize("hidden", [(64, 64), (64, 64, 64)])
def test_mlp_head_shapes_and_depth(hidden):
    head = MLPMaskHead(8, num_classes=3, resolution=14, hidden_dims=hidden, mask_resolution=28)
    assert head(torch.randn(5, 8, 14, 14)).shape == (5, 4, 28, 28)
    assert len(head.hidden) == len(hidden) and head.input_resolution == 14
    assert MLPMaskHead(8, 3, 14, hidden, 28, class_agnostic=True)(torch.randn(5, 8, 14, 14)).shape == (5, 1, 28, 28)


def test_box_heads_and_predictor_shapes():
    assert MLPBoxHead(8, 7, 32)(torch.randn(4, 8, 7, 7)).shape == (4, 32)
    res5 = Res5BoxHead(depth=18, norm="gn")
    out = res5(torch.randn(4, 256, 14, 14))
    assert out.shape == (4, 512, 7, 7) and res5.out_channels == 512
    scores, deltas = BoxPredictor(512, 5)(out)
    assert scores.shape == (4, 6) and deltas.shape == (4, 24)


def test_sigmoid_loss_hand_values_and_only_the_true_class_counts():
    labels = torch.tensor([1, 3])
    targets = torch.randint(0, 2, (2, 28, 28)).float()
    logits = torch.zeros(2, 4, 28, 28)
    # Zero logits: BCE is log(2) whatever the target.
    torch.testing.assert_close(mask_loss_sigmoid(logits, labels, targets), torch.tensor(math.log(2)))
    # Confident and right on the true channel -> ~0; the other channels do not matter.
    logits[0, 1] = 20 * (2 * targets[0] - 1)
    logits[1, 3] = 20 * (2 * targets[1] - 1)
    base = mask_loss_sigmoid(logits, labels, targets)
    assert base < 1e-6
    logits[:, 0] = 50.0
    logits[:, 2] = -50.0
    torch.testing.assert_close(mask_loss_sigmoid(logits, labels, targets), base)


def test_sigmoid_loss_equals_torchvision_maskrcnn_loss():
    g = torch.Generator().manual_seed(0)
    gt_masks = [(torch.rand(3, 40, 50, generator=g) > 0.5).to(torch.uint8)]
    gt_labels = [torch.tensor([1, 2, 3])]
    proposals = [
        torch.tensor([[1.0, 2.0, 30.0, 35.0], [5.0, 5.0, 45.0, 38.0], [0.0, 0.0, 20.0, 20.0], [3.0, 4.0, 25.0, 30.0]])
    ]
    matched = [torch.tensor([0, 1, 2, 1])]
    logits = torch.randn(4, 4, 28, 28, generator=g)
    expected = tv_maskrcnn_loss(logits, proposals, gt_masks, gt_labels, matched)
    targets = mask_targets(gt_masks[0], proposals[0], matched[0], 28)
    torch.testing.assert_close(mask_loss_sigmoid(logits, gt_labels[0][matched[0]], targets), expected)


def test_softmax_loss_hand_values_and_classes_compete():
    labels = torch.tensor([2])
    targets = torch.ones(1, 4, 4)
    logits = torch.zeros(1, 4, 4, 4)
    # Uniform logits over C = 4 channels: cross-entropy is log(4).
    torch.testing.assert_close(mask_loss_softmax(logits, labels, targets), torch.tensor(math.log(4)))
    # Unlike the sigmoid loss, raising another class's logit makes the loss worse.
    before = mask_loss_softmax(logits, labels, targets)
    logits[:, 3] = 5.0
    assert mask_loss_softmax(logits, labels, targets) > before + 1
    # Pixels outside the mask must be background (channel 0).
    targets = torch.zeros(1, 4, 4)
    logits = torch.zeros(1, 4, 4, 4)
    logits[:, 0] = 20.0
    assert mask_loss_softmax(logits, labels, targets) < 1e-6


def test_softmax_loss_on_binary_targets_is_cross_entropy_with_hard_pixel_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 6, 6, generator=g)
    labels = torch.tensor([1, 4, 2])
    targets = (torch.rand(3, 6, 6, generator=g) > 0.5).float()
    # The textbook multinomial loss: each pixel's class is the RoI's class inside the mask, background outside.
    hard = F.cross_entropy(logits, targets.long() * labels[:, None, None])
    torch.testing.assert_close(mask_loss_softmax(logits, labels, targets), hard)


def test_softmax_loss_on_soft_targets_splits_each_pixel_between_class_and_background():
    labels = torch.tensor([2])
    logits = torch.zeros(1, 4, 1, 1)
    logits[0, 2] = math.log(3.0)  # softmax: class 2 has 3/6, background and the other two 1/6 each
    targets = torch.full((1, 1, 1), 0.25)
    expected = -(0.25 * math.log(3 / 6) + 0.75 * math.log(1 / 6))
    torch.testing.assert_close(mask_loss_softmax(logits, labels, targets), torch.tensor(expected))
    # Cross-entropy against the distribution (background 0.75, class 2 0.25): the gradient is softmax minus it.
    logits = logits.clone().requires_grad_()
    mask_loss_softmax(logits, labels, targets).backward()
    torch.testing.assert_close(logits.grad.flatten(), torch.tensor([1 / 6 - 0.75, 1 / 6, 3 / 6 - 0.25, 1 / 6]))


def test_mask_inference_values():
    logits = torch.zeros(2, 4, 5, 5)
    logits[1, 2] = 100.0
    sig = mask_inference_sigmoid(logits, torch.tensor([1, 2]))
    assert sig.shape == (2, 1, 5, 5)
    torch.testing.assert_close(sig[0], torch.full((1, 5, 5), 0.5))
    torch.testing.assert_close(sig[1], torch.ones(1, 5, 5))
    soft = mask_inference_softmax(logits, torch.tensor([1, 2]))
    torch.testing.assert_close(soft[0], torch.full((1, 5, 5), 0.25))
    torch.testing.assert_close(soft[1], torch.ones(1, 5, 5))
    # Class-agnostic heads have one channel whatever the label.
    torch.testing.assert_close(
        mask_inference_sigmoid(torch.zeros(2, 1, 5, 5), torch.tensor([3, 1])), torch.full((2, 1, 5, 5), 0.5)
    )
    assert mask_inference_sigmoid(logits[:0], torch.zeros(0, dtype=torch.int64)).shape == (0, 1, 5, 5)
    assert mask_inference_softmax(logits[:0], torch.zeros(0, dtype=torch.int64)).shape == (0, 1, 5, 5)


@pytest.mark.parametrize("loss", [mask_loss_sigmoid, mask_loss_softmax])
def test_mask_losses_on_no_positives_are_zero_and_keep_the_graph(loss):
    head = FCNMaskHead(4, num_classes=3, num_convs=1, conv_dim=4)
    logits = head(torch.randn(0, 4, 14, 14))
    value = loss(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28))
    assert value.item() == 0.0
    value.backward()  # every parameter is reached (DDP with find_unused_parameters=False needs it)
    assert all(p.grad is not None for p in head.parameters())


def test_softmax_loss_rejects_class_agnostic_logits():
    with pytest.raises(ValueError, match="per-class"):
        mask_loss_softmax(torch.zeros(2, 1, 4, 4), torch.tensor([1, 2]), torch.ones(2, 4, 4))


def test_mask_targets_crop_and_resize_the_matched_mask():
    masks = torch.zeros(2, 20, 20, dtype=torch.uint8)
    masks[0, 5:15, 5:15] = 1  # a square
    masks[1] = 1
    proposals = torch.tensor([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0]])
    targets = mask_targets(masks, proposals, torch.tensor([0, 0, 1]), 8, aligned=True)
    assert targets.shape == (3, 8, 8)
    # The box is exactly the square: full inside, and bilinear blending at the border is the same on
    # every side (the target is symmetric), so the mask is centred where the square is.
    assert targets[0, 1:-1, 1:-1].min() > 0.99
    torch.testing.assert_close(targets[0], targets[0].flip(0).flip(1))
    assert targets[1, :3, :3].max() == 0 and targets[1, -2:, -2:].min() > 0.99  # square's corner
    assert targets[2].min() > 0.99
    # torchvision's unaligned sampling reads half a pixel right/down: the square's last row and column go soft.
    unaligned = mask_targets(masks, proposals, torch.tensor([0, 0, 1]), 8, aligned=False)
    assert unaligned[0, :-1, :-1].min() > 0.99 and unaligned[0, -1].max() < 0.7
    assert not torch.allclose(unaligned[0], unaligned[0].flip(0).flip(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mask_targets_of_half_precision_rois_read_the_matched_mask_past_256(dtype):
    # trainer.precision=bf16-true: the mask index rides in RoIAlign's box column, and bfloat16 rounds 301 to 300.
    masks = torch.zeros(302, 8, 8, dtype=torch.uint8)
    masks[301] = 1
    proposals = torch.tensor([[0.0, 0.0, 8.0, 8.0]], dtype=dtype)
    targets = mask_targets(masks, proposals, torch.tensor([301]), 4, aligned=True)
    assert targets.dtype == dtype and targets.min() == 1


def _images_of_masks(sizes, seed=0):
    """Per image uint8 masks [G_i, H_i, W_i] (random blobs, some touching the bottom-right edge) and RoIs in each
    image, among them boxes reaching its bottom and right edges exactly."""
    gen = torch.Generator().manual_seed(seed)
    masks, rois, images, matched = [], [], [], []
    for i, (count, h, w) in enumerate(sizes):
        m = (torch.rand(count, h, w, generator=gen) > 0.4).to(torch.uint8)
        masks.append(m)
        corners = torch.rand(6, 2, generator=gen) * torch.tensor([w / 2, h / 2])
        boxes = torch.cat([corners, corners + torch.rand(6, 2, generator=gen) * torch.tensor([w / 2, h / 2]) + 1], 1)
        boxes = torch.cat([boxes, torch.tensor([[w / 2, h / 2, w, h], [0.0, 0.0, w, h], [w - 1.3, h - 2.7, w, h]])])
        rois.append(boxes)
        images.append(torch.full((len(boxes),), i))
        matched.append(
            torch.randint(count, (len(boxes),), generator=gen) if count else torch.zeros(0, dtype=torch.long)
        )
    keep = [len(m) > 0 for m in masks]  # RoIs of images without ground truth are never positive
    rois = torch.cat([r for r, k in zip(rois, keep) if k])
    images = torch.cat([x for x, k in zip(images, keep) if k])
    matched = torch.cat([x for x, k in zip(matched, keep) if k])
    return masks, images, rois, matched


def _per_image_targets(masks, images, rois, matched, size, **kwargs):
    out = torch.zeros(len(rois), size, size)
    for i, m in enumerate(masks):
        rows = images == i
        if rows.any():
            out[rows] = mask_targets(m, rois[rows], matched[rows], size, **kwargs)
    return out


@pytest.mark.parametrize("aligned", [False, True])
def test_batched_mask_targets_equal_the_per_image_ones_bit_for_bit_on_images_of_one_size(aligned):
    masks, images, rois, matched = _images_of_masks([(3, 40, 56), (0, 40, 56), (5, 40, 56)])
    batched = mask_targets_batched(masks, images, rois, matched, 14, aligned=aligned)
    assert torch.equal(batched, _per_image_targets(masks, images, rois, matched, 14, aligned=aligned))


@pytest.mark.parametrize("form", ["soft", "binary"])
@pytest.mark.parametrize("aligned", [False, True])
def test_batched_mask_targets_equal_the_per_image_ones_on_images_of_other_sizes(aligned, form):
    # The first image is the smallest both ways: its RoIs at the bottom and right edges sample the stack's padding.
    sizes = [(3, 30, 41), (0, 64, 20), (4, 52, 77), (2, 64, 60)]
    masks, images, rois, matched = _images_of_masks(sizes)
    batched = mask_targets_batched(masks, images, rois, matched, 28, aligned=aligned, form=form)
    expected = _per_image_targets(masks, images, rois, matched, 28, aligned=aligned, form=form)
    if form == "soft":
        torch.testing.assert_close(batched, expected, rtol=0, atol=1e-6)
    else:  # thresholded: equal, barring a value within rounding of 0.5
        assert (batched != expected).float().mean() < 1e-3
    # With the padding zeros instead of the repeated edge, the edge RoIs' targets would differ.
    stacked = stack_masks(masks)
    assert stacked.shape == (9, 64, 77) and (stacked[:3, 30, :41] == masks[0][:, -1]).all()
    zero_padded = stacked.clone()
    zero_padded[:3, 30:] = 0
    zero_padded[:3, :, 41:] = 0
    firsts = torch.tensor([0, 3, 3, 7])
    wrong = mask_targets(zero_padded, rois, firsts[images] + matched, 28, aligned=aligned, form=form)
    assert (wrong - expected).abs().max() > 0.1


def test_stacked_masks_keep_every_image_and_pad_beyond_the_repeated_edge_with_zeros():
    masks = [
        torch.ones(2, 3, 4, dtype=torch.uint8),
        torch.zeros(0, 7, 7, dtype=torch.uint8),
        torch.ones(1, 6, 2, dtype=torch.uint8),
    ]
    stacked = stack_masks(masks)
    # The largest sizes of all images, those without masks too.
    assert stacked.shape == (3, 7, 7) and stacked.dtype == torch.uint8
    # 3 x 4 masks: the last row and column repeated once, then zeros.
    assert stacked[:2, :4, :5].all() and not stacked[:2, 4:].any() and not stacked[:2, :, 5:].any()
    assert stacked[2, :, :3].all() and not stacked[2, :, 3:].any()
    assert stack_masks([m[:0] for m in masks]).shape[0] == 0


def test_binary_mask_targets_are_the_soft_ones_thresholded_at_one_half():
    masks = torch.zeros(1, 20, 20, dtype=torch.uint8)
    masks[0, 3:13, 4:17] = 1
    proposals = torch.tensor([[2.3, 1.7, 15.2, 14.9], [0.0, 0.0, 20.0, 20.0]])
    soft = mask_targets(masks, proposals, torch.tensor([0, 0]), 14)
    binary = mask_targets(masks, proposals, torch.tensor([0, 0]), 14, form="binary")
    assert ((soft > 0) & (soft < 1)).any()  # the case is one where the two forms differ
    assert set(binary.unique().tolist()) == {0.0, 1.0} and binary.dtype == soft.dtype
    torch.testing.assert_close(binary, (soft >= 0.5).float())
    with pytest.raises(ValueError, match="mask target form"):
        mask_targets(masks, proposals, torch.tensor([0, 0]), 14, form="hard")


def test_fast_rcnn_loss_equals_torchvision_and_handles_no_positives():
    g = torch.Generator().manual_seed(0)
    logits, deltas = torch.randn(10, 4, generator=g), torch.randn(10, 16, generator=g)
    labels, reg_targets = torch.randint(0, 4, (10,), generator=g), torch.randn(10, 4, generator=g)
    expected = tv_fastrcnn_loss(logits, deltas, [labels], [reg_targets])
    for mine, ref in zip(fast_rcnn_loss(logits, deltas, labels, reg_targets), expected):
        torch.testing.assert_close(mine, ref)
    cls, box = fast_rcnn_loss(logits, deltas, torch.zeros(10, dtype=torch.int64), reg_targets)
    assert torch.isfinite(cls) and box.item() == 0.0


def test_fast_rcnn_inference_thresholds_nms_and_empty():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = [torch.tensor([[10.0, 10.0, 50.0, 50.0], [11.0, 11.0, 51.0, 51.0], [60.0, 60.0, 90.0, 90.0]])]
    logits = torch.tensor([[0.0, 10.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 10.0]])
    boxes, scores, labels = fast_rcnn_inference(logits, torch.zeros(3, 12), proposals, [(100, 100)], coder)
    # The two overlapping class-1 boxes collapse to one by NMS; the class-2 box survives.
    assert labels[0].tolist() == [1, 2]
    torch.testing.assert_close(boxes[0], proposals[0][[0, 2]])
    boxes, scores, labels = fast_rcnn_inference(
        logits, torch.zeros(3, 12), proposals, [(100, 100)], coder, score_thresh=1.0
    )
    assert boxes[0].shape == (0, 4) and scores[0].shape == (0,) and labels[0].shape == (0,)


@pytest.mark.parametrize("form", ["soft", "binary"])
@pytest.mark.parametrize("aligned", [False, True])
def test_mask_targets_read_float_masks_a_bounded_chunk_at_a_time_and_give_the_same_targets(aligned, form, monkeypatch):
    # Dense images: a float copy of every mask at once is GBs; chunks of at most chunk_bytes give the same targets.
    masks, images, rois, matched = _images_of_masks([(7, 40, 56), (0, 40, 56), (6, 40, 56)])
    whole = mask_targets_batched(masks, images, rois, matched, 14, aligned=aligned, form=form)

    read = []
    kernel = mask_head.roi_align_kernel

    def recording_kernel(features, *args):
        read.append(features.numel() * features.element_size())
        return kernel(features, *args)

    monkeypatch.setattr(mask_head, "roi_align_kernel", recording_kernel)
    per_mask = 40 * 56 * 4
    for chunk_bytes, passes in ((4 * per_mask, 4), (5 * per_mask + 3, 3), (per_mask, 13), (1, 13)):
        read.clear()
        chunked, counts = count_host_syncs(
            mask_targets_batched, masks, images, rois, matched, 14, aligned=aligned, form=form, chunk_bytes=chunk_bytes
        )
        assert torch.equal(chunked, whole), chunk_bytes
        assert len(read) == passes and max(read) <= max(chunk_bytes, per_mask), read
        assert sum(counts.values()) == 0, counts.report()  # the chunks come from shapes, not values


def test_both_mask_loss_arms_give_float32_probabilities_from_bf16_logits():
    # Under bf16 autocast the softmax is computed in float32; the sigmoid arm's probabilities must not be rounded to
    # bf16 before the 0.5 threshold either, or Table 2b's arms would be thresholded at different points.
    logits = torch.randn(3, 4, 28, 28).to(torch.bfloat16)
    labels = torch.tensor([1, 3, 2])
    sigmoid = mask_head.mask_inference_sigmoid(logits, labels)
    softmax = mask_head.mask_inference_softmax(logits.float(), labels)
    assert sigmoid.dtype == softmax.dtype == torch.float32 and sigmoid.shape == softmax.shape == (3, 1, 28, 28)
    expected = logits.float()[torch.arange(3), labels].sigmoid()[:, None]
    torch.testing.assert_close(sigmoid, expected, rtol=0, atol=0)
