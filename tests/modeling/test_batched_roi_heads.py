"""The RoI heads' batched sampling (issue 22): a fixed layout of RoI slots, the same losses and gradients as the sampled
RoIs alone, head shapes that repeat, and one host read per pooler."""

import collections

import pytest
import torch

from mrcnn.modeling.box_head import fast_rcnn_loss
from mrcnn.modeling.poolers import RoIAlignPooler, RoIPoolPooler
from mrcnn.modeling.roi_heads import bucket_size
from tests.helpers.host_syncs import count_host_syncs
from tests.modeling.test_roi_buckets import batches, build

# Every RoI sampled (no draw, so the per-image and the batched path see the same sample), RPN per image in both.
EVERY_ROI = [
    "model.rois_per_image=100000",
    "model.rpn_pre_nms_top_n_train=100",  # few enough for C4's res5 head on every one
    "model.rpn_post_nms_top_n_train=50",
    "model.net.rpn.batched_sampling=false",
]


def without_ground_truth(target):
    return {k: v[:0] if k in ("boxes", "labels", "masks") else v for k, v in target.items()}


def losses_and_grads(model, images, targets):
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    _, losses = model(images, targets)
    sum(losses.values()).backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model/backbone=c4"],
        ["model/mask_head=mlp2"],
        ["model/mask_loss=softmax"],
        ["model.batched_proposals=true"],
    ],
)
def test_the_fixed_layout_gives_the_losses_and_gradients_of_the_sampled_rois_alone(overrides):
    torch.manual_seed(0)
    plain = build([*overrides, *EVERY_ROI, "model.net.roi_heads.batched_sampling=false"]).train()
    batched = build([*overrides, *EVERY_ROI, "model.net.roi_heads.batched_sampling=true"]).train()
    assert batched.roi_heads.batched_sampling and not plain.roi_heads.batched_sampling
    batched.load_state_dict(plain.state_dict())
    for images, targets in batches(2):
        targets[1] = without_ground_truth(targets[1])
        expected, expected_grads = losses_and_grads(plain, images, targets)
        got, grads = losses_and_grads(batched, images, targets)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            # Masked sums add the same terms in another order: float32 rounding, against each gradient's norm.
            error = (grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
            assert error < 1e-5, (name, error)


def test_the_sample_has_torchvisions_counts_in_a_fixed_layout_with_positives_first():
    torch.manual_seed(0)
    heads = build(["model.net.roi_heads.batched_sampling=true"]).roi_heads
    sampler = heads.fg_bg_sampler
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0], [30.0, 5.0, 60.0, 30.0]])
    jitter = torch.rand(300, 4) * 6 - 3
    proposals = [
        torch.cat([gt[0] + jitter[:150], torch.rand(150, 4).sort(dim=1).values.mul(64)[:, [0, 1, 2, 3]]]),
        gt[1] + jitter[:40],  # fewer candidates than the sample size
    ]
    targets = [
        {"boxes": gt[:1], "labels": torch.tensor([2])},
        {"boxes": gt[1:], "labels": torch.tensor([1])},
    ]
    rois, labels, sampled, matched, regression_targets = heads.sample_rois_batched(proposals, targets)
    per_image = heads.sample_rois(proposals, targets)  # torchvision's sampler: its counts per image
    slots = min(sampler.batch_size_per_image, 301)  # the longer image's candidates set the common count
    assert rois.shape == (2, slots, 4) and labels.shape == sampled.shape == matched.shape == (2, slots)
    assert regression_targets.shape == (2 * slots, 4)
    for i in range(2):
        n_pos, n_sampled = int((labels[i] > 0).sum()), int(sampled[i].sum())
        assert n_sampled == len(per_image[1][i]) and n_pos == int((per_image[1][i] > 0).sum())
        assert n_pos <= int(sampler.batch_size_per_image * sampler.positive_fraction)
        # Positives first, then the sampled negatives, then the slots that count nowhere.
        assert (labels[i, :n_pos] == targets[i]["labels"]).all() and (labels[i, n_pos:] == 0).all()
        assert sampled[i, :n_sampled].all() and not sampled[i, n_sampled:].any()
    assert regression_targets.isfinite().all()


def test_an_image_without_ground_truth_gives_finite_losses_and_no_mask_weight():
    torch.manual_seed(0)
    model = build(["model.net.roi_heads.batched_sampling=true"]).train()
    ((images, targets),) = batches(1)
    targets = [without_ground_truth(t) for t in targets]
    _, losses = model(images, targets)
    assert all(v.isfinite() for v in losses.values()), losses
    assert losses["maskrcnn_mask_loss"] == 0 and losses["fastrcnn_bbox_loss"] == 0
    sum(losses.values()).backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("overrides", [[], ["model/backbone=c4"]])
def test_head_shapes_repeat_and_the_heads_read_the_host_once_per_pooler(overrides):
    torch.manual_seed(0)
    model = build([*overrides, "model.net.roi_heads.batched_sampling=true"]).train()
    heads = model.roi_heads
    shapes = collections.defaultdict(set)
    for name, head in (("box", heads.box_head), ("mask", heads.mask_head)):
        head.register_forward_pre_hook(lambda m, args, name=name: shapes[name].add(tuple(args[0].shape)))
    calls = []
    original = heads._batched_losses

    def counted(*args):
        result, counts = count_host_syncs(lambda: original(*args))
        calls.append(counts)
        return result

    heads._batched_losses = counted
    positives = []
    loss = heads.mask_loss.loss
    heads.mask_loss.loss = lambda logits, labels, *args: positives.append(len(labels)) or loss(logits, labels, *args)
    for images, targets in batches(4, seed=11):
        _, losses = model(images, targets)
        sum(losses.values()).backward()
    per_image = heads.fg_bg_sampler.batch_size_per_image
    box_rows = {s[0] for s in shapes["box"]}
    # C4's box head is res5 on pooled features; FPN's is the MLP. Either way one row per RoI slot.
    assert box_rows == {2 * per_image}, shapes
    # The mask head runs on the positives alone (a varying count), padded to the RoI buckets.
    assert len(set(positives)) > 1, positives
    assert {s[0] for s in shapes["mask"]} == {bucket_size(p, heads.roi_buckets) for p in positives}, (shapes, positives)
    # One read per pooler: the box pooler's level sizes (FPN only) and the positives' count (C4: the only one).
    # The CPU's own RoIAlign backward reads its sizes on the host; a GPU runs torchvision's kernel instead.
    expected = 1 if overrides else 2
    assert all(sum(n for (_, place), n in c.where.items() if "roi_align.py" not in place) == expected for c in calls), [
        c.report() for c in calls
    ]


@pytest.mark.parametrize("levels", [1, 4])
@pytest.mark.parametrize("pooler", [RoIAlignPooler, RoIPoolPooler])
def test_pooling_the_valid_rois_equals_pooling_them_alone_with_one_host_read(pooler, levels):
    torch.manual_seed(0)
    features = {str(i): torch.randn(2, 3, 64 >> i, 64 >> i, requires_grad=True) for i in range(levels)}
    boxes = [(torch.rand(20, 4).sort(dim=1).values * 256)[:, [0, 1, 2, 3]] for _ in range(2)]
    valid = torch.rand(40) < 0.4
    pool = pooler(featmap_names=list(features), output_size=5)
    expected = pool(features, [b[v] for b, v in zip(boxes, valid.view(2, 20))], [(256, 256)] * 2)
    got, counts = count_host_syncs(lambda: pool(features, boxes, [(256, 256)] * 2, valid=valid))
    assert sum(n for (_, place), n in counts.where.items() if "roi_align.py" not in place) == 1, counts.report()
    assert got.shape == (int(valid.sum()), 3, 5, 5)
    assert torch.equal(got, expected)
    grads = [
        torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), list(features.values()))
        for out in (got, expected)
    ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-4)
    assert pool(features, boxes, [(256, 256)] * 2, valid=torch.zeros(40, dtype=torch.bool)).shape == (0, 3, 5, 5)


def test_masked_losses_equal_the_losses_of_the_rows_that_count():
    torch.manual_seed(0)
    logits, deltas = torch.randn(12, 4), torch.randn(12, 16)
    labels = torch.tensor([1, 3, 0, 2, 0, 0, 1, 0, 0, 0, 2, 0])
    targets = torch.randn(12, 4)
    sampled = torch.tensor([1, 1, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    targets[~sampled] = float("inf")  # rows that do not count may hold anything
    expected = fast_rcnn_loss(logits[sampled], deltas[sampled], labels[sampled], targets[sampled])
    got = fast_rcnn_loss(logits, deltas, labels, targets, sampled)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_heads_with_batchnorm_keep_the_per_image_path():
    with pytest.warns(UserWarning, match="batched_sampling are off"):
        model = build(["model.net.roi_heads.batched_sampling=true", "model.head_norm=bn"])
    assert not model.roi_heads.batched_sampling
