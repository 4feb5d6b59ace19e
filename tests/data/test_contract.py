"""Every dataset class satisfies the dataset contract (mrcnn/data/contract.py), checked on real small instances
built by the data configs."""

import pytest
import torch
from hydra.utils import instantiate

from mrcnn.data.contract import (
    HasCategoryIds,
    HasCocoGroundTruth,
    HasImageSizes,
    InstanceDataset,
    ReportsReadSkips,
    check_sample,
)
from mrcnn.data.shapes import ShapesDataset
from tests.helpers.config import compose_config
from tests.helpers.data import coco_format_overrides, make_cityscapes, make_coco_split

OPTIONAL = (HasCategoryIds, HasCocoGroundTruth, HasImageSizes, ReportsReadSkips)
# What each data config's datasets provide beyond the required members.
PROVIDES = {
    "shapes": {HasImageSizes},
    "coco": {HasCategoryIds, HasCocoGroundTruth, HasImageSizes, ReportsReadSkips},
    "coco_format": {HasCategoryIds, HasCocoGroundTruth, HasImageSizes, ReportsReadSkips},
    "cityscapes": {HasCategoryIds, HasImageSizes, ReportsReadSkips},
}


def data_overrides(data: str, tmp_path) -> list[str]:
    """A small real dataset of each kind: generated shapes, and COCO / Cityscapes layouts written to ``tmp_path``."""
    if data == "shapes":
        return ["data.num_train_images=3", "data.num_val_images=2", "data.image_size=64"]
    if data == "coco":
        make_coco_split(tmp_path, split="train2017")
        make_coco_split(tmp_path, split="val2017", seed=1)
        return [f"data.root={tmp_path}", "data.classes=[person,car,dog,toothbrush]"]
    if data == "coco_format":
        train = make_coco_split(tmp_path / "mine", split="train")
        val = make_coco_split(tmp_path / "mine", split="val", seed=1)
        return coco_format_overrides(*train, *val)
    make_cityscapes(tmp_path)
    return [f"data.root={tmp_path}"]


@pytest.mark.parametrize("data", sorted(PROVIDES))
def test_every_dataset_class_satisfies_the_contract(data, tmp_path):
    cfg = compose_config([f"data={data}", *data_overrides(data, tmp_path), "data.datamodule.num_workers=0"])
    datamodule = instantiate(cfg.data.datamodule)
    for dataset in (datamodule.train_dataset, datamodule.val_dataset):
        assert isinstance(dataset, InstanceDataset), type(dataset)
        assert list(dataset.class_names) == list(cfg.data.classes)
        assert {p for p in OPTIONAL if isinstance(dataset, p)} == PROVIDES[data]
        for index in range(min(len(dataset), 3)):
            check_sample(dataset[index], len(dataset.class_names))
    # Validation items are read untransformed: their sizes are those the dataset gives without decoding.
    if isinstance(datamodule.val_dataset, HasImageSizes):
        sizes = datamodule.val_dataset.image_sizes
        assert len(sizes) == len(datamodule.val_dataset)
        assert tuple(sizes[0]) == tuple(datamodule.val_dataset[0][0].shape[-2:])
        if isinstance(dataset, HasCategoryIds):
            assert sorted(dataset.label_to_category_id) == list(range(1, len(dataset.class_names) + 1))


def test_the_contract_check_names_what_is_wrong():
    dataset = ShapesDataset(num_images=1, image_size=32)
    image, target = dataset[0]
    check_sample((image, target), len(dataset.class_names))
    assert not isinstance(object(), InstanceDataset)
    assert not isinstance(dataset, HasCategoryIds)
    bad = {**target, "masks": target["masks"].bool()}
    with pytest.raises(ValueError, match=r"'masks' must be torch.uint8 \[N, H, W\]"):
        check_sample((image, bad), len(dataset.class_names))
    with pytest.raises(ValueError, match=r"no tensor 'area'"):
        check_sample((image, {k: v for k, v in target.items() if k != "area"}), len(dataset.class_names))
    assert len(target["labels"]) > 0
    with pytest.raises(ValueError, match=r"'labels' must lie in 1\.\.6"):
        check_sample((image, {**target, "labels": torch.full_like(target["labels"], 7)}), 6)
    with pytest.raises(ValueError, match="image values must lie in 0..1"):
        check_sample((image * 255, target), len(dataset.class_names))
    with pytest.raises(ValueError, match="'image_id' must be an int"):
        check_sample((image, {**target, "image_id": torch.tensor(0)}), len(dataset.class_names))
    with pytest.raises(ValueError, match="'image_id' must be an int, got bool"):
        check_sample((image, {**target, "image_id": True}), len(dataset.class_names))
    with pytest.raises(ValueError, match=r"'labels' must be \[N\], one per instance, got shape \(\)"):
        check_sample((image, {**target, "labels": torch.tensor(1)}), len(dataset.class_names))
    with pytest.raises(ValueError, match="'masks' must hold 0 or 1, got values up to 255"):
        check_sample((image, {**target, "masks": target["masks"] * 255}), len(dataset.class_names))
    with pytest.raises(ValueError, match="'iscrowd' must hold 0 or 1, got values up to 2"):
        check_sample((image, {**target, "iscrowd": target["iscrowd"] + 2}), len(dataset.class_names))
