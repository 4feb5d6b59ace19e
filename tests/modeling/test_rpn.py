"""The RPN directly: anchors per map, proposal counts per mode, and losses in train and eval mode alike."""

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from mrcnn.modeling.rpn import RPN


def inputs(levels=1):
    torch.manual_seed(0)
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (64, 48)])
    features = {str(i): torch.randn(2, 8, 16 // 2**i, 16 // 2**i) for i in range(levels)}
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, features, targets


def test_single_map_rpn_has_every_size_and_ratio_at_each_location():
    rpn = RPN(8, [[16, 32, 64]], pre_nms_top_n_test=50, post_nms_top_n_test=20)
    assert rpn.head.cls_logits.out_channels == 9  # 3 sizes x 3 ratios (C4 / C5)
    images, features, _ = inputs()
    rpn.eval()
    with torch.no_grad():
        proposals, losses = rpn(images, features)
    assert losses == {}
    for boxes, (h, w) in zip(proposals, images.image_sizes):
        assert boxes.shape[1] == 4 and 0 < len(boxes) <= 20
        # Clipped to each image's own (unpadded) size.
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()


def test_per_level_rpn_and_proposal_counts_follow_the_mode():
    rpn = RPN(8, [[16], [32]], pre_nms_top_n_train=100, post_nms_top_n_train=7, post_nms_top_n_test=3)
    assert rpn.head.cls_logits.out_channels == 3  # one size per level (FPN)
    images, features, targets = inputs(levels=2)
    rpn.train()
    proposals, _ = rpn(images, features, targets)
    assert all(len(p) <= 7 for p in proposals) and max(len(p) for p in proposals) == 7
    rpn.eval()
    with torch.no_grad():
        proposals, _ = rpn(images, features)
    assert max(len(p) for p in proposals) == 3


def test_losses_in_eval_mode_equal_train_mode_and_handle_an_empty_image():
    rpn = RPN(8, [[16, 32]])
    images, features, targets = inputs()
    rpn.train()
    torch.manual_seed(1)  # the anchor sampler draws at random
    train_losses = rpn(images, features, targets)[1]
    rpn.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        eval_losses = rpn(images, features, targets)[1]
    assert set(train_losses) == {"rpn_class_loss", "rpn_bbox_loss"}
    for key, value in train_losses.items():
        assert torch.isfinite(value) and value > 0
        torch.testing.assert_close(eval_losses[key], value.detach())


class FixedHead(torch.nn.Module):
    """An RPN head that returns the given objectness logits and box deltas (per level) whatever its input."""

    def __init__(self, objectness, deltas):
        super().__init__()
        self.objectness, self.deltas = objectness, deltas

    def forward(self, maps):
        return self.objectness, self.deltas


@pytest.mark.parametrize("batched_proposals", [False, True])
def test_under_bf16_autocast_confident_proposals_are_ranked_by_their_logits(batched_proposals):
    # Logits from 7 to 12 (bf16 holds them exactly) on two levels: a bf16 sigmoid rounds every one of them to 1.0, a
    # tie; the proposals kept must be those a float32 ranking keeps, in its order.
    generator = torch.Generator().manual_seed(0)
    sizes = (16, 8)
    count = sum(3 * s * s for s in sizes)
    logits = (7 + torch.randperm(count, generator=generator).float() / 160).to(torch.bfloat16).float()
    assert torch.sigmoid(logits.to(torch.bfloat16)).unique().tolist() == [1.0]
    logits = list(logits.split([3 * s * s for s in sizes]))
    logits = [level.reshape(1, 3, s, s) for level, s in zip(logits, sizes)]
    deltas = [torch.zeros(1, 12, s, s) for s in sizes]
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    features = {str(i): torch.zeros(1, 8, s, s) for i, s in enumerate(sizes)}
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        rpn = RPN(8, [[16], [32]], post_nms_top_n_test=20, batched_proposals=batched_proposals).eval()
        rpn.head = FixedHead([x.to(dtype) for x in logits], [x.to(dtype) for x in deltas])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            proposals, _ = rpn(images, features)
        results.append(proposals[0])
    assert len(results[0]) == 20 and torch.equal(results[1], results[0])
