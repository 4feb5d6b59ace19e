"""Cityscapes gtFine instanceIds: 16-bit reading, the 8 classes, crowd regions, evaluation ids (bad files: test_bad_input)."""

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn.data.cityscapes import CITYSCAPES_CLASSES, CityscapesDataset, read_instance_ids
from mrcnn.data.datamodule import InstanceDataModule
from mrcnn.data.transforms import drop_crowd
from mrcnn.evaluation import CocoEvaluator
from tests.helpers.data import CITYSCAPES_HEIGHT, CITYSCAPES_WIDTH, cityscapes_instance_ids, make_cityscapes


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    return make_cityscapes(tmp_path_factory.mktemp("cityscapes"))


def test_16bit_png_round_trip(tmp_path):
    ids = cityscapes_instance_ids(0)
    path = tmp_path / "x_gtFine_instanceIds.png"
    Image.fromarray(ids.astype(np.uint16)).save(path)
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")  # 16-bit on disk, whichever mode PIL reports
    read = read_instance_ids(path)
    assert read.dtype == np.int32 and np.array_equal(read, ids)
    assert read.max() == 33001


def test_classes_and_label_ids(cityscapes_root):
    dataset = CityscapesDataset(cityscapes_root, split="train")
    assert (
        dataset.class_names
        == list(CITYSCAPES_CLASSES)
        == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    )
    # Labels 1..8 map back to the Cityscapes labelIds (24..33 without caravan 29 and trailer 30).
    assert dataset.label_to_category_id == {1: 24, 2: 25, 3: 26, 4: 27, 5: 28, 6: 31, 7: 32, 8: 33}
    assert len(dataset) == 4 and dataset.image_ids == [1, 2, 3, 4]
    assert dataset.image_sizes == [(CITYSCAPES_HEIGHT, CITYSCAPES_WIDTH)] * 4
    assert [p.parent.name for p in dataset.image_files] == ["aachen", "aachen", "bremen", "bremen"]


def test_targets_instances_and_crowd(cityscapes_root):
    train = CityscapesDataset(cityscapes_root, split="train")
    image, target = train[0]
    ids = cityscapes_instance_ids(0)
    assert image.shape == (3, CITYSCAPES_HEIGHT, CITYSCAPES_WIDTH)
    # Instances in increasing id order: person 24000, car 26001, car 26003, bicycle 33001; no caravan, no group.
    assert target["labels"].tolist() == [1, 3, 3, 8]
    assert (target["iscrowd"] == 0).all()
    for mask, value in zip(target["masks"], (24000, 26001, 26003, 33001)):
        assert np.array_equal(mask.numpy(), (ids == value).astype(np.uint8))
    assert target["boxes"][1].tolist() == [2, 5, 12, 15]
    assert target["area"].tolist() == [56, 100, 60, float((ids == 33001).sum())]

    val = CityscapesDataset(cityscapes_root, split="val", include_crowd=True)
    _, target = val[0]
    # The car group (value 26) comes last as a crowd region of class car.
    assert target["labels"].tolist() == [1, 3, 3, 8, 3]
    assert target["iscrowd"].tolist() == [0, 0, 0, 0, 1]
    assert np.array_equal(target["masks"][-1].numpy(), (ids == 26).astype(np.uint8))
    # What the model sees: the crowd region dropped with all its per-instance entries.
    model_target = drop_crowd(target)
    assert model_target["labels"].tolist() == [1, 3, 3, 8]
    assert model_target["masks"].shape[0] == model_target["boxes"].shape[0] == 4


def test_class_subset(cityscapes_root):
    dataset = CityscapesDataset(cityscapes_root, split="train", classes=["car", "person"])
    assert dataset.label_to_category_id == {1: 26, 2: 24}
    _, target = dataset[0]
    assert target["labels"].tolist() == [2, 1, 1]
    with pytest.raises(ValueError, match="caravan"):
        CityscapesDataset(cityscapes_root, split="train", classes=["car", "caravan"])


def test_evaluation_uses_label_ids_and_ignores_crowd(cityscapes_root):
    val = CityscapesDataset(cityscapes_root, split="val", include_crowd=True)
    datamodule = InstanceDataModule(train_dataset=val, val_dataset=val, batch_size=2)
    kwargs = datamodule.evaluator_kwargs()
    assert kwargs["label_to_category_id"] == val.label_to_category_id and "coco_gt" not in kwargs
    evaluator = CocoEvaluator(**kwargs)
    for _, targets in datamodule.val_dataloader():
        predictions = []
        for target in targets:
            keep = target["iscrowd"] == 0
            # Perfect detections of the instances, plus one detection on the crowd region.
            masks = torch.cat([target["masks"][keep], target["masks"][~keep]])
            predictions.append(
                {
                    "boxes": torch.cat([target["boxes"][keep], target["boxes"][~keep]]),
                    "labels": torch.cat([target["labels"][keep], target["labels"][~keep]]),
                    "scores": torch.linspace(0.9, 0.5, len(masks)),
                    "masks": masks,
                }
            )
        evaluator.update(predictions, list(targets))
    metrics = evaluator.compute()
    # The crowd hit is ignored, not a false positive: every AP is perfect.
    assert metrics["segm_AP"] == pytest.approx(1.0) and metrics["bbox_AP"] == pytest.approx(1.0)
    assert {r["category_id"] for r in evaluator.results_json()} == {24, 26, 33}
