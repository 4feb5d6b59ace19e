"""Behaviour of the detection collate function and the LightningDataModule."""

import pytest
import torch

from mrcnn.data.datamodule import InstanceDataModule, collate_detection
from mrcnn.data.shapes import ShapesDataset
from mrcnn.data.transforms import train_transforms


def _datamodule(num_workers=0, **kwargs):
    return InstanceDataModule(
        train_dataset=ShapesDataset(num_images=10, image_size=64, seed=0, split="train"),
        val_dataset=ShapesDataset(num_images=7, image_size=64, seed=0, split="val"),
        test_dataset=ShapesDataset(num_images=5, image_size=64, seed=0, split="test"),
        batch_size=4,
        num_workers=num_workers,
        **kwargs,
    )


def test_collate_keeps_samples_unstacked():
    dataset = ShapesDataset(num_images=3, image_size=32)
    images, targets = collate_detection([dataset[i] for i in range(3)])
    assert isinstance(images, tuple) and isinstance(targets, tuple)
    assert len(images) == len(targets) == 3
    assert all(image.shape == (3, 32, 32) for image in images)
    assert [t["image_id"] for t in targets] == [1, 2, 3]


def test_class_names_and_num_classes():
    dm = _datamodule()
    assert dm.class_names == ["circle", "triangle", "square", "ring", "crescent", "star"]
    assert dm.num_classes == 6


def test_batch_sizes():
    dm = _datamodule(val_batch_size=3)
    train = list(dm.train_dataloader())
    # 10 images at batch 4: the incomplete last batch is dropped in training.
    assert [len(images) for images, _ in train] == [4, 4]
    assert all(len(images) == len(targets) for images, targets in train)
    val = list(dm.val_dataloader())
    assert [len(images) for images, _ in val] == [3, 3, 1]
    assert [len(images) for images, _ in dm.test_dataloader()] == [3, 2]
    # Training shuffles, evaluation keeps the dataset order.
    val_ids = [t["image_id"] for _, targets in val for t in targets]
    assert val_ids == list(range(1, 8))


def test_missing_test_dataset_raises():
    dm = InstanceDataModule(ShapesDataset(num_images=2), ShapesDataset(num_images=2, split="val"))
    assert dm.val_batch_size == dm.batch_size
    with pytest.raises(ValueError, match="test_dataset"):
        dm.test_dataloader()


def test_workers_give_the_same_content():
    in_process = list(_datamodule(num_workers=0).val_dataloader())
    dm = _datamodule(num_workers=2, persistent_workers=True)
    with_workers = list(dm.val_dataloader())
    assert len(in_process) == len(with_workers)
    for (images_a, targets_a), (images_b, targets_b) in zip(in_process, with_workers):
        assert all(torch.equal(a, b) for a, b in zip(images_a, images_b))
        for a, b in zip(targets_a, targets_b):
            assert a["image_id"] == b["image_id"]
            assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["boxes"], b["boxes"])
            assert torch.equal(a["labels"], b["labels"])
    # Workers also serve training batches of the right size.
    train = list(dm.train_dataloader())
    assert [len(images) for images, _ in train] == [4, 4]


def test_persistent_workers_only_with_workers():
    assert _datamodule(num_workers=0, persistent_workers=True).train_dataloader().persistent_workers is False


def test_workers_draw_different_augmentations():
    # Forked workers start from copies of one albumentations random state; each
    # must re-seed, or worker 0 and worker 1 would flip exactly the same positions.
    plain = ShapesDataset(num_images=40, image_size=32)
    augmented = ShapesDataset(num_images=40, image_size=32, transforms=train_transforms(hflip_prob=0.5))
    loader = torch.utils.data.DataLoader(augmented, batch_size=1, num_workers=2, collate_fn=collate_detection)
    flipped = [not torch.equal(images[0], plain[i][0]) for i, (images, _) in enumerate(loader)]
    # Batches alternate between the two workers.
    assert flipped[0::2] != flipped[1::2]
    assert 0 < sum(flipped) < len(flipped)
