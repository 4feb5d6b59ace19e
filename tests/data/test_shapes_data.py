"""Behaviour of the synthetic shapes dataset and the instance transforms."""

import albumentations as A
import numpy as np
import pytest
import torch

from mrcnn.data.shapes import SHAPE_CLASSES, ShapesDataset
from mrcnn.data.transforms import InstanceTransform, identity_transforms, masks_to_boxes, train_transforms


def _same_sample(a, b):
    image_a, target_a = a
    image_b, target_b = b
    if not torch.equal(image_a, image_b) or target_a.keys() != target_b.keys():
        return False
    for key, value in target_a.items():
        same = torch.equal(value, target_b[key]) if torch.is_tensor(value) else value == target_b[key]
        if not same:
            return False
    return True


def _extent(mask):
    """xyxy extent of a [H, W] mask, computed independently of the code under test."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.fixture(scope="module")
def samples():
    dataset = ShapesDataset(num_images=60, seed=3)
    return dataset, [dataset[i] for i in range(len(dataset))]


def test_determinism_and_splits():
    a = ShapesDataset(num_images=10, seed=7, split="train")
    b = ShapesDataset(num_images=10, seed=7, split="train")
    # Access order must not matter: read b backwards after touching other items.
    forward = [a[i] for i in range(10)]
    backward = [b[i] for i in reversed(range(10))][::-1]
    assert all(_same_sample(x, y) for x, y in zip(forward, backward))

    val = ShapesDataset(num_images=10, seed=7, split="val")
    test = ShapesDataset(num_images=10, seed=7, split="test")
    other_seed = ShapesDataset(num_images=10, seed=8, split="train")
    for i in range(3):
        assert not torch.equal(a[i][0], val[i][0])
        assert not torch.equal(val[i][0], test[i][0])
        assert not torch.equal(a[i][0], other_seed[i][0])
    # Different items of one split differ too.
    assert not torch.equal(a[0][0], a[1][0])


def test_contract(samples):
    dataset, items = samples
    assert dataset.num_classes == len(SHAPE_CLASSES) == len(dataset.class_names)
    assert list(dataset.class_names) == list(SHAPE_CLASSES)
    image_ids = []
    for image, target in items:
        assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
        assert image.min() >= 0 and image.max() <= 1
        n = len(target["labels"])
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
        assert target["labels"].dtype == torch.int64
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, 128, 128)
        assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].shape == (n,)
        assert target["area"].dtype == torch.float32 and target["area"].shape == (n,)
        assert isinstance(target["image_id"], int)
        assert ((target["labels"] >= 1) & (target["labels"] <= dataset.num_classes)).all()
        assert set(target["masks"].unique().tolist()) <= {0, 1}
        assert (target["iscrowd"] == 0).all()
        assert torch.equal(target["area"], target["masks"].flatten(1).sum(1).float())
        image_ids.append(target["image_id"])
    assert image_ids == list(range(1, len(items) + 1))


def test_masks_boxes_and_occlusion(samples):
    dataset, items = samples
    for _, target in items:
        masks, boxes = target["masks"], target["boxes"]
        # Every instance survives with a non-trivial visible area ...
        assert (target["area"] >= dataset.min_area).all()
        # ... no pixel belongs to two instances (occlusion applied) ...
        assert masks.sum(0).max() <= 1
        # ... and boxes are positive and tight around the visible mask.
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        for mask, box in zip(masks, boxes):
            assert box.tolist() == _extent(mask)


def test_later_instances_occlude_earlier_ones():
    # Circles only: an unoccluded circle away from the border fills pi/4 (0.785)
    # of its box; a circle that lost pixels to a later instance fills less.
    dataset = ShapesDataset(num_images=30, classes=["circle"], min_objects=6, max_objects=6, min_size=20, seed=1)
    bitten = 0
    for i in range(len(dataset)):
        _, target = dataset[i]
        boxes, area = target["boxes"], target["area"]
        inside = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < 128) & (boxes[:, 3] < 128)
        fill = area / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        bitten += int(((fill < 0.65) & inside).sum())
        # Instances are listed in painting order: the last one is on top, never bitten.
        if len(fill) and inside[-1]:
            assert fill[-1] > 0.74
        # Dense images still keep most of the requested instances.
        assert len(target["labels"]) >= 3
    assert bitten >= 5


def test_class_and_size_coverage(samples):
    _, items = samples
    labels = torch.cat([t["labels"] for _, t in items])
    assert set(labels.tolist()) == set(range(1, len(SHAPE_CLASSES) + 1))
    boxes = torch.cat([t["boxes"] for _, t in items])
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert (side < 24).sum() >= 10
    assert (side > 48).sum() >= 10


def test_empty_images_and_configurable_classes():
    dataset = ShapesDataset(num_images=40, min_objects=0, max_objects=2, classes=["ring", "star"], seed=2)
    assert dataset.class_names == ["ring", "star"] and dataset.num_classes == 2
    counts = []
    for i in range(len(dataset)):
        _, target = dataset[i]
        counts.append(len(target["labels"]))
        assert set(target["labels"].tolist()) <= {1, 2}
        if counts[-1] == 0:
            assert target["boxes"].shape == (0, 4)
            assert target["masks"].shape == (0, 128, 128)
            assert target["area"].shape == (0,)
    assert 0 in counts and max(counts) > 0


def test_non_square_image_size():
    image, target = ShapesDataset(num_images=2, image_size=(64, 96))[0]
    assert image.shape == (3, 64, 96) and target["masks"].shape[1:] == (64, 96)


def test_unknown_class_raises():
    with pytest.raises(ValueError, match="hexagon.*circle"):
        ShapesDataset(num_images=1, classes=("circle", "hexagon"))
    with pytest.raises(ValueError):
        ShapesDataset(num_images=1, split="training")


def test_hflip_keeps_image_masks_boxes_in_step():
    plain = ShapesDataset(num_images=5, seed=4)
    flipped = ShapesDataset(num_images=5, seed=4, transforms=train_transforms(hflip_prob=1.0))
    for i in range(len(plain)):
        image, target = plain[i]
        image_f, target_f = flipped[i]
        assert torch.equal(image_f, image.flip(-1))
        assert torch.equal(target_f["masks"], target["masks"].flip(-1))
        assert torch.equal(target_f["labels"], target["labels"])
        width = image.shape[-1]
        expected = torch.stack(
            [
                width - target["boxes"][:, 2],
                target["boxes"][:, 1],
                width - target["boxes"][:, 0],
                target["boxes"][:, 3],
            ],
            dim=1,
        )
        assert torch.equal(target_f["boxes"], expected)
        for mask, box in zip(target_f["masks"], target_f["boxes"]):
            assert box.tolist() == _extent(mask)


def test_identity_transform_matches_no_transform():
    plain = ShapesDataset(num_images=3, seed=5)
    identity = ShapesDataset(num_images=3, seed=5, transforms=identity_transforms())
    for i in range(3):
        assert _same_sample(plain[i], identity[i])


def test_crop_drops_emptied_instance_with_its_label():
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    masks = np.zeros((3, 40, 60), dtype=np.uint8)
    masks[0, 5:15, 5:20] = 1  # inside the crop
    masks[1, 10:30, 45:58] = 1  # entirely outside the crop
    masks[2, 20:35, 25:40] = 1  # cut by the crop's right edge
    labels = np.array([3, 1, 2], dtype=np.int64)
    transform = InstanceTransform([A.Crop(x_min=0, y_min=0, x_max=30, y_max=40)])
    out_image, out_masks, out_boxes, out_labels = transform(image, masks, labels)
    assert out_image.shape == (40, 30, 3)
    assert out_masks.shape == (2, 40, 30) and out_masks.dtype == np.uint8
    assert out_labels.tolist() == [3, 2]
    assert out_boxes.dtype == np.float32
    assert out_boxes.tolist() == [[5, 5, 20, 15], [25, 20, 30, 35]]


def test_transform_handles_no_instances():
    image = np.full((20, 30, 3), 7, dtype=np.uint8)
    transform = train_transforms(hflip_prob=1.0)
    out_image, masks, boxes, labels = transform(image, np.zeros((0, 20, 30), np.uint8), np.zeros(0, np.int64))
    assert out_image.shape == (20, 30, 3)
    assert masks.shape == (0, 20, 30) and boxes.shape == (0, 4) and labels.shape == (0,)


def test_masks_to_boxes_single_pixel():
    masks = np.zeros((1, 8, 8), dtype=np.uint8)
    masks[0, 3, 5] = 1
    assert masks_to_boxes(masks).tolist() == [[5, 3, 6, 4]]
