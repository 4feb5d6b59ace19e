"""data=coco / coco_format / cityscapes and data/augmentation=... compose, instantiate and serve batches."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue
from torchvision.models.detection.transform import GeneralizedRCNNTransform

import mrcnn.data.resolvers  # noqa: F401  (registers ${mrcnn.coco_classes:...})
from mrcnn.data.cityscapes import CityscapesDataset
from mrcnn.data.coco import CocoDataset
from mrcnn.data.transforms import InstanceTransform
from tests.helpers.config import CONFIG_DIR, compose_config
from tests.helpers.data import make_cityscapes, make_coco_split

# Keep the loaders in this process and the test quick.
FAST = ["data.datamodule.num_workers=0", "data.datamodule.persistent_workers=false", "data.datamodule.pin_memory=false"]


def _first_batch(cfg):
    datamodule = instantiate(cfg.data.datamodule)
    assert datamodule.num_classes == cfg.data.num_classes == cfg.model.num_classes
    assert datamodule.class_names == list(cfg.data.classes)
    images, targets = next(iter(datamodule.train_dataloader()))
    assert len(images) == len(targets) == cfg.data.datamodule.batch_size
    for image, target in zip(images, targets):
        assert image.dtype == torch.float32 and image.dim() == 3
        assert target["masks"].shape[1:] == image.shape[1:]
        assert (target["iscrowd"] == 0).all()  # training targets never hold crowd regions
    val_images, val_targets = next(iter(datamodule.val_dataloader()))
    assert len(val_images) == len(val_targets) >= 1
    return datamodule


def test_coco_format(tmp_path):
    train_json, train_images = make_coco_split(tmp_path / "mine", split="train")
    val_json, val_images = make_coco_split(tmp_path / "mine", split="val", seed=1)
    cfg = compose_config(
        [
            "data=coco_format",
            f"data.train_json={train_json}",
            f"data.train_images={train_images}",
            f"data.val_json={val_json}",
            f"data.val_images={val_images}",
            *FAST,
        ]
    )
    # Classes (and the model's number of classes) come from the json, in category-id order.
    assert list(cfg.data.classes) == ["person", "car", "dog", "toothbrush"] and cfg.model.num_classes == 4
    datamodule = _first_batch(cfg)
    assert isinstance(datamodule.train_dataset, CocoDataset)
    kwargs = datamodule.evaluator_kwargs()
    assert kwargs["label_to_category_id"] == {1: 1, 2: 3, 3: 18, 4: 90} and "coco_gt" in kwargs
    assert isinstance(datamodule.train_dataset.transforms, InstanceTransform)
    assert datamodule.val_dataset.transforms is None
    assert (cfg.data.min_size, cfg.data.max_size) == (800, 1333)


def test_coco_format_needs_its_json(tmp_path):
    cfg = compose_config(["data=coco_format"])
    with pytest.raises((MissingMandatoryValue, InterpolationResolutionError), match="train_json"):
        _ = cfg.data.num_classes  # resolving it reads the json
    cfg = compose_config(["data=coco_format", f"data.train_json={tmp_path}/absent.json"])
    with pytest.raises(InterpolationResolutionError, match=r"COCO json not found: .*absent\.json"):
        _ = cfg.model.num_classes


def test_coco(tmp_path):
    make_coco_split(tmp_path, split="train2017")
    make_coco_split(tmp_path, split="val2017", seed=1)
    cfg = compose_config(["data=coco", f"data.root={tmp_path}", *FAST])
    assert cfg.data.num_classes == 80 and cfg.data.classes[0] == "person" and cfg.data.classes[-1] == "toothbrush"
    assert (cfg.data.min_size, cfg.data.max_size) == (800, 1333)
    # The generated json has 4 of COCO's categories: use those (a subset of the 80 names).
    cfg = compose_config(["data=coco", f"data.root={tmp_path}", "data.classes=[person,car,dog,toothbrush]", *FAST])
    datamodule = _first_batch(cfg)
    assert datamodule.aspect_ratio_grouping
    assert datamodule.train_dataset.ann_file == tmp_path / "annotations" / "instances_train2017.json"
    # Training leaves out the image without annotations; validation keeps every image.
    assert len(datamodule.train_dataset) == 6 and len(datamodule.val_dataset) == 7
    # Aspect-ratio grouping: every training batch is landscape-or-square only, or portrait only.
    for images, _ in datamodule.train_dataloader():
        assert len({image.shape[2] >= image.shape[1] for image in images}) == 1


def test_cityscapes(tmp_path):
    make_cityscapes(tmp_path)
    cfg = compose_config(["data=cityscapes", f"data.root={tmp_path}", *FAST])
    assert list(cfg.data.classes) == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    datamodule = _first_batch(cfg)
    assert isinstance(datamodule.val_dataset, CityscapesDataset) and datamodule.val_dataset.include_crowd
    assert datamodule.evaluator_kwargs()["label_to_category_id"][3] == 26


def test_cityscapes_sizes_train_800_to_1024_and_test_1024():
    cfg = compose_config(["data=cityscapes", "data.root=/nowhere"])
    min_size = tuple(cfg.data.min_size)
    assert min_size == tuple(range(800, 1025, 32))
    # The model builds GeneralizedRCNNTransform(min_size, max_size): test uses min_size[-1].
    transform = GeneralizedRCNNTransform(min_size, cfg.data.max_size, [0.0] * 3, [1.0] * 3, size_divisible=1)
    image = torch.zeros(3, 1024, 2048)
    transform.eval()
    assert transform([image])[0].image_sizes == [(1024, 2048)]
    transform.train()
    torch.manual_seed(0)
    half = torch.zeros(3, 512, 1024)  # same aspect ratio, cheaper to resize
    heights = {transform([half])[0].image_sizes[0][0] for _ in range(30)}
    assert heights <= set(min_size) and len(heights) > 3


def _augmentation_options():
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "data" / "augmentation").glob("*.yaml"))


@pytest.mark.parametrize("option", _augmentation_options())
def test_every_augmentation_option_builds_and_keeps_instances_in_step(option):
    cfg = compose_config([f"data/augmentation={option}", "data.num_train_images=3", "data.image_size=64"])
    datamodule = instantiate(cfg.data.datamodule)
    dataset = datamodule.train_dataset
    assert isinstance(dataset.transforms, InstanceTransform)
    for index in range(len(dataset)):
        _, target = dataset[index]
        n = len(target["labels"])
        assert target["masks"].shape[0] == target["boxes"].shape[0] == target["iscrowd"].shape[0] == n
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()


def test_shapes_default_is_still_hflip_half():
    cfg = compose_config([])
    transforms = OmegaConf.to_container(cfg.data.datamodule.train_dataset.transforms, resolve=True)
    assert transforms == {"_target_": "mrcnn.data.transforms.train_transforms", "hflip_prob": 0.5}
    assert "transforms" not in cfg.data.datamodule.val_dataset
    assert [type(t).__name__ for t in instantiate(cfg.data.augmentation).compose.transforms] == ["HorizontalFlip"]


@pytest.mark.parametrize("data", sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml")))
def test_aspect_ratio_grouping_is_a_switch_of_every_data_config(data):
    # The README's data.datamodule.aspect_ratio_grouping=true must compose with every data config, not only COCO's.
    cfg = compose_config([f"data={data}", "data.datamodule.aspect_ratio_grouping=true", *FAST])
    assert cfg.data.datamodule.aspect_ratio_grouping is True
    if data == "shapes":  # no files needed: the grouped loader gives its batches
        assert _first_batch(cfg).aspect_ratio_grouping
