"""RCNNTransform gives torchvision's GeneralizedRCNNTransform's outputs bit for bit, and skips its copies of images
already at their size (a resize by a factor of 1, a batch that needs no padding)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from mrcnn.modeling.transform import RCNNTransform

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _sample(height, width, seed):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=gen)
    masks = (torch.rand(3, height, width, generator=gen) > 0.5).to(torch.uint8)
    corner = torch.rand(3, 2, generator=gen) * torch.tensor([width / 2, height / 2])
    boxes = torch.cat([corner, corner + 1 + torch.rand(3, 2, generator=gen) * torch.tensor([width / 2, height / 2])], 1)
    return image, {"boxes": boxes, "labels": torch.tensor([1, 2, 1]), "masks": masks}


class _Ops(TorchDispatchMode):
    """The names of the operators dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "sizes, min_size, max_size",
    [
        ([(64, 64), (64, 64), (64, 64)], (64,), 64),  # at their size, divisible by 32: no resize, one stack
        ([(72, 72), (72, 72)], (72,), 72),  # at their size, padded to 96
        ([(64, 48), (48, 80), (64, 64)], (64,), 100),  # resized, padded
        ([(64, 64), (64, 64)], (48, 64, 80), 120),  # a size drawn per image in training
    ],
)
def test_the_transform_gives_torchvisions_outputs_bit_for_bit(sizes, min_size, max_size, training):
    samples = [_sample(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    outputs = []
    for transform in (
        GeneralizedRCNNTransform(min_size, max_size, MEAN, STD),
        RCNNTransform(min_size, max_size, MEAN, STD),
    ):
        transform.train(training)
        torch.manual_seed(0)  # the training size's draw
        images = [image.clone() for image, _ in samples]
        targets = [{k: v.clone() for k, v in target.items()} for _, target in samples]
        outputs.append(transform(images, targets))
    (expected, expected_targets), (got, got_targets) = outputs
    assert torch.equal(got.tensors, expected.tensors) and got.image_sizes == expected.image_sizes
    for g, e in zip(got_targets, expected_targets):
        assert g.keys() == e.keys() and all(torch.equal(g[k], e[k]) and g[k].dtype == e[k].dtype for k in g)


def test_images_at_their_size_are_neither_resized_nor_padded_one_by_one():
    samples = [_sample(64, 64, seed) for seed in range(4)]
    transform = RCNNTransform((64,), 64, MEAN, STD).train()
    with _Ops() as ops:
        transform([image for image, _ in samples], [target for _, target in samples])
    assert not [name for name in ops.names if "upsample" in name or name == "interpolate"], ops.names
    assert ops.names.count("stack") == 1 and "copy_" not in ops.names, ops.names
