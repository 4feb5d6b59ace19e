"""RoI buckets (issue 22): the heads see a few repeating input shapes, with the same losses and gradients."""

import collections

import pytest
import torch
from hydra.utils import instantiate

from mrcnn.data.shapes import ShapesDataset
from mrcnn.modeling.roi_heads import bucket_size, pad_to_bucket
from tests.helpers.config import TINY_MODEL, compose_config

POWERS_OF_TWO = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def test_bucket_size_is_the_next_bucket_then_multiples_of_the_largest():
    assert [bucket_size(n, [16, 32, 64]) for n in (0, 1, 16, 17, 33, 64, 65, 129)] == [16, 16, 16, 32, 64, 64, 128, 192]
    x = torch.randn(5, 3)
    padded = pad_to_bucket(x, [8])
    assert padded.shape == (8, 3) and torch.equal(padded[:5], x) and not padded[5:].any()


def build(overrides=()):
    return instantiate(compose_config([*TINY_MODEL, *overrides]).model.net)


def batches(n, size=64, seed=5):
    ds = ShapesDataset(num_images=2 * n, image_size=size, seed=seed)
    samples = [ds[i] for i in range(2 * n)]
    return [tuple(list(x) for x in zip(*samples[2 * i : 2 * i + 2])) for i in range(n)]


def losses_and_grads(model, images, targets):
    torch.manual_seed(0)  # the same RoI sampling draws in both models
    model.zero_grad(set_to_none=True)
    _, losses = model(images, targets)
    sum(losses.values()).backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "overrides",
    # C4 (its res5 head padded) is slow in float64, about 16 s: it runs with the slow tests, as in CI; the default
    # suite pads C4's heads in float32 for their shapes (tests/modeling/test_batched_roi_heads.py).
    [[], pytest.param(["model/backbone=c4"], marks=pytest.mark.slow), ["model/mask_head=mlp2"]],
)
def test_padded_heads_give_the_unpadded_losses_and_gradients(overrides):
    torch.manual_seed(0)
    plain = build([*overrides, "model.roi_buckets=null"]).train()
    padded = build([*overrides, f"model.roi_buckets=[{','.join(map(str, POWERS_OF_TWO))}]"]).train()
    padded.load_state_dict(plain.state_dict())
    # In float64: zero rows add exact zeros to the heads' sums over rows, but a matrix product over more rows may
    # pick another kernel and group its sums differently. The MLP mask head's fc layers do on some CPUs (MKL on an
    # AMD EPYC: a row's output differs in its last bits between 5 and 16 rows), so its loss, not only its gradients,
    # is compared within rounding. In float32 that rounding, where a gradient's terms cancel (GroupNorm's), reached
    # 8e-5 of the gradient's norm; in float64 it is 1e-12, so a real difference (a padded row's loss or gradient
    # leaking in, 1e-2 and more) cannot hide under the tolerance.
    plain, padded = plain.double(), padded.double()
    linear_mask_head = any(isinstance(m, torch.nn.Linear) for m in padded.roi_heads.mask_head.modules())
    seen = []
    padded.roi_heads.mask_head.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    for images, targets in batches(2):
        images = [image.double() for image in images]
        targets = [{**target, "boxes": target["boxes"].double()} for target in targets]
        expected, expected_grads = losses_and_grads(plain, images, targets)
        got, grads = losses_and_grads(padded, images, targets)
        for key in expected:
            if linear_mask_head and key == "maskrcnn_mask_loss":
                assert torch.allclose(got[key], expected[key], rtol=1e-12, atol=0), (key, got[key], expected[key])
            else:
                assert torch.equal(got[key], expected[key]), (key, got[key], expected[key])
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            error = (grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
            assert error < 1e-9, (name, error)
    assert all(n in POWERS_OF_TWO for n in seen), seen


def distinct_head_shapes(roi_buckets, steps=6):
    torch.manual_seed(0)
    model = build([f"model.roi_buckets={roi_buckets}"]).train()
    shapes = collections.defaultdict(set)
    for name, head in (("box", model.roi_heads.box_head), ("mask", model.roi_heads.mask_head)):
        first = next(m for m in head.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
        first.register_forward_pre_hook(lambda m, args, name=name: shapes[name].add(tuple(args[0].shape)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for images, targets in batches(steps, seed=11):
        _, losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return {k: len(v) for k, v in shapes.items()}


def test_buckets_make_the_head_input_shapes_repeat():
    unpadded = distinct_head_shapes("null")
    padded = distinct_head_shapes(f"[{','.join(map(str, POWERS_OF_TWO))}]")
    assert unpadded["mask"] >= 3, unpadded  # a new count of positives at almost every step
    assert padded["mask"] <= 2 and padded["box"] <= 2, padded
