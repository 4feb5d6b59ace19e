"""RPN proposals filtered for all images at once (issue 22): torchvision's proposals, no host sync on a GPU, padding
unused."""

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from mrcnn.modeling import box_head as box_head_module
from mrcnn.modeling import nms as nms_module
from mrcnn.modeling import rpn as rpn_module
from mrcnn.modeling.box_head import fast_rcnn_inference, fast_rcnn_inference_batched
from mrcnn.modeling.rpn import RPN
from mrcnn.modeling.transform import BoxCoder
from tests.helpers.host_syncs import count_host_syncs
from tests.helpers.triton_interpreter import require_interpreter
from tests.modeling.test_roi_buckets import batches, build


def rpn_pair(sizes, **kwargs):
    torch.manual_seed(0)
    plain = RPN(8, sizes, **kwargs).eval()
    for weight in plain.head.parameters():  # spread the scores and boxes (torchvision's init: all near 0.5)
        torch.nn.init.normal_(weight, std=0.3)
    batched = RPN(8, sizes, batched_proposals=True, **kwargs).eval()
    batched.load_state_dict(plain.state_dict())
    return plain, batched


def sorted_rows(boxes):
    """Rows in lexicographic order: the proposals as a set (NMS may order equal scores either way)."""
    for column in reversed(range(boxes.shape[1])):
        boxes = boxes[boxes[:, column].argsort(stable=True)]
    return boxes


@pytest.mark.parametrize("nms", ["triton", "torchvision"])
@pytest.mark.parametrize("sizes", [[[16, 32]], [[16], [32]]])
def test_batched_proposals_are_torchvisions_without_a_host_sync(sizes, nms, monkeypatch):
    if nms == "triton":
        require_interpreter()
    # The GPU's NMS (the Triton kernel, here in Triton's interpreter) or the CPU's (torchvision's nms per group).
    monkeypatch.setattr(rpn_module, "grouped_nms", getattr(nms_module, f"grouped_nms_{nms}"))
    plain, batched = rpn_pair(sizes, pre_nms_top_n_test=200, post_nms_top_n_test=60, score_thresh=0.7)
    torch.manual_seed(1)
    features = {str(i): 3 * torch.randn(2, 8, 16 // 2**i, 16 // 2**i) for i in range(len(sizes))}
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (40, 48)])
    with torch.no_grad():
        expected, _ = plain(images, features)
        (proposals, valid, _), syncs = count_host_syncs(batched.propose, images, features)
    if nms == "triton":  # on the CPU the per-group nms reads its output's length, which costs nothing there
        assert sum(syncs.values()) == 0, syncs.report()
    assert any(len(e) < 60 for e in expected), "the score threshold should leave fewer than post_nms_top_n"
    for boxes, keep, want in zip(proposals, valid, expected):
        assert boxes.shape == (60, 4) and keep.shape == (60,)
        assert keep.sum() == len(want) and keep[: len(want)].all()  # real proposals first, padding after
        assert torch.equal(sorted_rows(boxes[keep]), sorted_rows(want))
    # forward() returns the real ones only, as torchvision does.
    with torch.no_grad():
        assert [len(p) for p in batched(images, features)[0]] == [len(e) for e in expected]


def test_padding_proposals_are_never_sampled_nor_detected():
    model = build(["model.batched_proposals=true"]).train()
    gt = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    target = {"boxes": gt, "labels": torch.tensor([2]), "masks": torch.ones(1, 64, 64, dtype=torch.uint8)}
    # Padding rows exactly on the ground-truth box: IoU 1, so they would be positives if they were sampled.
    proposals = [torch.cat([torch.tensor([[0.0, 0.0, 60.0, 60.0]]), gt.repeat(5, 1)])]
    valid = [torch.tensor([True] + [False] * 5)]
    rois, labels, _, _ = model.roi_heads.sample_rois(proposals, [target], valid)
    assert len(rois[0]) == 2 and labels[0].tolist() == [0, 2]  # the real proposal (background) and the gt box

    logits = torch.tensor([[-5.0, 5.0, 0.0]]).repeat(6, 1)  # every RoI confidently class 1
    boxes, scores, _ = fast_rcnn_inference_batched(
        logits, torch.zeros(6, 12), proposals[0][None], valid[0][None], [(64, 64)], BoxCoder((10.0, 10.0, 5.0, 5.0))
    )
    assert len(boxes[0]) == 1 and torch.equal(boxes[0], proposals[0][:1])


def test_padding_proposals_are_never_sampled_by_the_batched_sampler_either():
    heads = build(["model.batched_proposals=true", "model.batched_sampling=true"]).roi_heads
    gt = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    targets = [{"boxes": gt, "labels": torch.tensor([2])}, {"boxes": gt + 4, "labels": torch.tensor([1])}]
    # Two images with the batched RPN's fixed count of proposals; padding rows exactly on the ground truth.
    proposals = [torch.cat([torch.tensor([[0.0, 0.0, 60.0, 60.0]]), g.repeat(5, 1)]) for g in (gt, gt + 4)]
    valid = [torch.tensor([True] + [False] * 5), torch.tensor([True, True] + [False] * 4)]
    torch.manual_seed(0)
    rois, labels, sampled, _, _ = heads.sample_rois_batched(proposals, targets, valid)
    # Image 0: its real proposal (background) and its gt box; image 1: two real proposals (the second on the gt box)
    # and the gt box. No padding row among them.
    assert sampled.sum(dim=1).tolist() == [2, 3]
    assert sorted(labels[0][sampled[0]].tolist()) == [0, 2] and sorted(labels[1][sampled[1]].tolist()) == [0, 1, 1]


def test_the_model_computes_the_same_losses_and_detections_either_way():
    # Sample every RoI (no random subset): the losses then depend only on the proposals, which must be the same.
    overrides = ["model.rois_per_image=100000"]
    torch.manual_seed(0)
    plain = build([*overrides, "model.batched_proposals=false"])
    batched = build([*overrides, "model.batched_proposals=true"])
    batched.load_state_dict(plain.state_dict())
    assert batched.rpn.batched_proposals and not plain.rpn.batched_proposals
    for images, targets in batches(2):
        for mode in ("train", "eval"):
            plain.train(mode == "train")
            batched.train(mode == "train")
            torch.manual_seed(0)  # the RPN's anchor sampler
            expected_detections, expected = plain(images, targets)
            torch.manual_seed(0)
            detections, losses = batched(images, targets)
            assert losses.keys() == expected.keys()
            # Bit-equal here; in general equal up to the NMS offsets' float rounding and the order of equal scores.
            for key in expected:
                assert torch.equal(losses[key], expected[key]), (mode, key, losses[key], expected[key])
            assert len(detections) == len(expected_detections)
            for got, want in zip(detections, expected_detections):
                for key in ("boxes", "scores", "labels", "masks"):
                    assert torch.equal(got[key], want[key]), ("detection", key)


@pytest.mark.parametrize("nms", ["triton", "torchvision"])
@pytest.mark.parametrize(("detections_per_img", "nan_rows"), [(10, False), (100, False), (100, True)])
def test_batched_detections_are_torchvisions_with_one_host_read(nms, detections_per_img, nan_rows, monkeypatch):
    if nms == "triton":
        require_interpreter()
    monkeypatch.setattr(box_head_module, "grouped_nms", getattr(nms_module, f"grouped_nms_{nms}"))
    generator = torch.Generator().manual_seed(0)
    num_images, num_proposals, num_classes = 2, 40, 4
    corners = torch.rand(num_images, num_proposals, 2, generator=generator) * 40
    proposals = torch.cat(
        [corners, corners + 4 + torch.rand(num_images, num_proposals, 2, generator=generator) * 20], -1
    )
    valid = torch.rand(num_images, num_proposals, generator=generator) > 0.2
    logits = torch.randn(num_images * num_proposals, num_classes, generator=generator) * 2
    deltas = torch.randn(num_images * num_proposals, num_classes * 4, generator=generator) * 0.3
    if nan_rows:
        # A diverged head's NaN logits: never detected, as per image. Sorted first, they once pushed boxes above the
        # threshold past the kernel's scan of each group, which then kept them without NMS (a reviewer found it).
        logits[::3] = float("nan")
    image_shapes, coder = [(64, 64), (48, 56)], BoxCoder((10.0, 10.0, 5.0, 5.0))
    settings = (coder, 0.05, 0.5, detections_per_img)
    (boxes, scores, labels), syncs = count_host_syncs(
        fast_rcnn_inference_batched, logits, deltas, proposals, valid, image_shapes, *settings
    )
    if nms == "triton":
        assert sum(syncs.values()) == 1, syncs.report()  # how many detections each image has
    rows = valid.flatten()
    for i in range(num_images):
        # torchvision's per-image inference on the image's real proposals alone.
        mine = rows.view(num_images, -1).clone()
        mine[torch.arange(num_images) != i] = False
        (want_boxes,), (want_scores,), (want_labels,) = fast_rcnn_inference(
            logits[mine.flatten()], deltas[mine.flatten()], [proposals[i][valid[i]]], [image_shapes[i]], *settings
        )
        assert 0 < len(want_boxes) <= detections_per_img
        assert torch.equal(boxes[i], want_boxes) and torch.equal(scores[i], want_scores)
        assert torch.equal(labels[i], want_labels)
