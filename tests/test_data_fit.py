"""The model fits the data: model.num_classes follows the data or fails at build time; anchors vs object sizes."""

import logging

import pytest
import torch
from hydra.utils import instantiate

from mrcnn.engine.build import build
from mrcnn.engine.data_fit import box_size_warning, check_num_classes
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.data import coco_format_overrides, make_coco_split

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}, {"id": 17, "name": "fox"}]


@pytest.fixture(scope="module")
def coco_format(tmp_path_factory):
    """Overrides for ``data=coco_format`` on a generated json with 3 categories (ids 3, 8, 17), 40-160 px images."""
    root = tmp_path_factory.mktemp("coco")
    train_json, train_images = make_coco_split(root, "train", categories=CATEGORIES)
    val_json, val_images = make_coco_split(root, "val", seed=1, categories=CATEGORIES)
    return coco_format_overrides(train_json, train_images, val_json, val_images)


@pytest.mark.parametrize("data", ["shapes", "coco_format"])
def test_num_classes_follows_the_data(data, coco_format, tmp_path):
    overrides = ["model=tiny", *(coco_format if data == "coco_format" else [])]
    cfg = compose_config(overrides, run_dir=str(tmp_path))
    datamodule = instantiate(cfg.data.datamodule)
    assert cfg.model.num_classes == datamodule.num_classes == (3 if data == "coco_format" else 6)
    # An explicit number that disagrees stops when the run is built, naming both numbers.
    wrong = 2 if data == "coco_format" else 4
    with pytest.raises(
        ValueError, match=rf"model\.num_classes={wrong}, but the data has {datamodule.num_classes} classes"
    ):
        build(compose_config([*overrides, f"model.num_classes={wrong}"], run_dir=str(tmp_path)))


def test_cityscapes_and_coco_configs_derive_num_classes_from_their_classes():
    for data, count in (("cityscapes", 8), ("coco", 80)):
        cfg = compose_config([f"data={data}", "data.root=/nowhere"])
        assert cfg.model.num_classes == len(cfg.data.classes) == count
        subset = compose_config([f"data={data}", "data.root=/nowhere", "data.classes=[car,bus]"])
        assert subset.model.num_classes == 2


def test_check_num_classes_message_lists_the_classes():
    check_num_classes(2, ["a", "b"])
    with pytest.raises(ValueError, match=r"model\.num_classes=3, but the data has 2 classes \['a', 'b'\]"):
        check_num_classes(3, ["a", "b"])


def test_warns_when_boxes_are_far_from_the_anchors(coco_format, tmp_path, caplog):
    # The small model's anchors (8-128 px) at COCO's 800 / 1333 resizing of 40-160 px images: most boxes too large.
    cfg = compose_config(["model=tiny", *coco_format], run_dir=str(tmp_path))
    assert (cfg.data.min_size, cfg.data.max_size) == (800, 1333)
    with caplog.at_level(logging.WARNING, logger="mrcnn.engine.data_fit"):
        build(cfg)
    warnings = [r.getMessage() for r in caplog.records if "anchors' reach" in r.getMessage()]
    assert len(warnings) == 1
    assert "min_size=800, max_size=1333" in warnings[0] and "anchors 8-128 px" in warnings[0]
    assert "data.min_size=" in warnings[0] and "model.anchor_sizes" in warnings[0]

    # At their own size the boxes fit, and so they do on the built-in shapes.
    fitting = compose_config(["model=tiny", *coco_format, "data.min_size=64", "data.max_size=160"])
    datamodule = instantiate(fitting.data.datamodule)
    assert box_size_warning(instantiate(fitting.model.net), datamodule.val_dataset) is None
    shapes = compose_config(TINY_MODEL)
    assert box_size_warning(instantiate(shapes.model.net), instantiate(shapes.data.datamodule).val_dataset) is None


def test_boxes_without_area_neither_crash_the_check_nor_size_its_advice():
    # Mostly empty boxes (a box-only export with zero sizes) beside a few large ones: the median of all would be 0 px.
    class Boxes(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            boxes = torch.tensor([[5.0, 5.0, 5.0, 5.0]] * 3 + [[0.0, 0.0, 60.0, 60.0]])
            return torch.zeros(3, 64, 64), {"boxes": boxes, "labels": torch.ones(4, dtype=torch.int64)}

    model = instantiate(compose_config([*TINY_MODEL, "data.min_size=800", "data.max_size=1333"]).model.net)
    message = box_size_warning(model, Boxes())
    assert message is not None and "of 4 ground-truth boxes" in message and "median box side 750 px" in message
