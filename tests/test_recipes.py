"""The README's recipes ("Extending it"), each done as the README says: a new pooler, a new backbone, a new RoI-heads
variant, a new dataset and a new logger, each one file in a config folder of the test's own (Hydra's searchpath) plus
the class its ``_target_`` names (here, in this module)."""

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from mrcnn.data.contract import InstanceDataset, check_sample
from mrcnn.engine.build import build
from mrcnn.engine.loggers import ContinuedCSVLogger
from mrcnn.modeling.backbone import SingleMapBackbone, freeze_stages, resnet_body, stage_channels
from mrcnn.modeling.mask_rcnn import LOSS_KEYS
from mrcnn.modeling.poolers import RoIPooler
from mrcnn.modeling.roi_heads import RoIHeads
from tests.helpers.config import ROOT, TINY_MODEL, compose_config


def write_configs(root: Path, files: dict[str, str]) -> list[str]:
    """Writes ``{relative path: text}`` under ``root``; the override that adds ``root`` to Hydra's config search path."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return [f"hydra.searchpath=[file://{root}]"]


def train_once(net) -> dict[str, torch.Tensor]:
    """One training forward and backward on two generated images; the losses."""
    dataset = TwoBoxes(num_images=2)
    images, targets = zip(*(dataset[i] for i in range(2)))
    net.train()
    _, losses = net(list(images), list(targets))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    return losses


# ---- The README's example: add a pooler ---------------------------------------------------------------------------


class CentrePooler(RoIPooler):
    """RoIAlign with one bilinear sample at each bin's centre (``sampling_ratio=1``): ``[R, C, S, S]`` per level."""

    def pool_level(self, feature, rois, spatial_scale):
        from torchvision.ops import roi_align

        return roi_align(feature, rois, self.output_size, spatial_scale, sampling_ratio=1, aligned=True)


def readme_pooler_yaml(target: str) -> str:
    """The pooler file that README.md's "Extending it" shows, with its ``_target_`` replaced by ``target``."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n( *# @package model\.net\.roi_heads\n.*?)```", readme, re.DOTALL)
    assert block, "README.md's pooler recipe has no yaml block"
    text = textwrap.dedent(block.group(1))
    assert "_target_: mrcnn.modeling.poolers.MyPooler" in text
    return text.replace("mrcnn.modeling.poolers.MyPooler", target)


def test_recipe_add_a_pooler_as_the_readme_shows(tmp_path):
    text = readme_pooler_yaml("tests.test_recipes.CentrePooler")
    search = write_configs(tmp_path, {"model/pooler/centre.yaml": text})
    net = instantiate(compose_config([*search, *TINY_MODEL, "model/pooler=centre"]).model.net)
    poolers = [net.roi_heads.box_pooler, net.roi_heads.mask_pooler]
    assert all(isinstance(pooler, CentrePooler) for pooler in poolers)
    assert [pooler.output_size for pooler in poolers] == [7, 14]
    assert set(train_once(net)) == set(LOSS_KEYS)
    # The README says what happens without the file's first line.
    write_configs(tmp_path, {"model/pooler/centre.yaml": text.split("\n", 1)[1]})
    with pytest.raises(ValueError, match=r"leaves model\.net\.roi_heads\.pooler unset"):
        compose_config([*search, *TINY_MODEL, "model/pooler=centre"])


# ---- Recipe 1: add a backbone ------------------------------------------------------------------------------------


def resnet_c3(depth: int = 50, norm: str = "gn", trainable_layers: int = 5, width: int = 64) -> SingleMapBackbone:
    """ResNet-C3: res2-res3, one map of stride 8 (``{"0": [B, C3, H/8, W/8]}``)."""
    body = resnet_body(depth, norm, None, width)
    freeze_stages(body, trainable_layers)
    return SingleMapBackbone(body, "layer2", stage_channels(depth, 3, width))


BACKBONE_C3 = """\
# @package model
# ResNet-C3: one stride-8 map; the standard RoI heads pool 7x7 (box) and 14x14 (mask) RoIs from it.
defaults:
  - override /model/roi_heads@_global_.model.roi_heads: standard
  - _self_

featmap_names: ["0"]
feature_channels: ${mrcnn.stage_channels:${model.depth},3,${model.width}}
box_resolution: 7
mask_resolution: 14
mask_in_channels: ${model.feature_channels}
mask_head_convs: 4
box_head_channels: ${model.box_head_dim}
neck_rois_per_image: 512
neck_post_nms_top_n_test: 1000

net:
  backbone:
    _target_: tests.test_recipes.resnet_c3
    depth: ${model.depth}
    width: ${model.width}
    norm: ${model.norm}
    trainable_layers: ${model.trainable_layers}
  rpn:
    anchor_sizes: ${mrcnn.single_level:${model.anchor_sizes}}
"""


def test_recipe_add_a_backbone(tmp_path):
    search = write_configs(tmp_path, {"model/backbone/c3.yaml": BACKBONE_C3})
    cfg = compose_config([*search, *TINY_MODEL, "model/backbone=c3"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices["model/roi_heads"] == "standard"
    net = instantiate(cfg.model.net)
    features = net.backbone(torch.zeros(1, 3, 64, 64))
    assert list(features) == ["0"] and features["0"].shape == (1, net.backbone.out_channels, 8, 8)
    assert set(train_once(net)) == set(LOSS_KEYS)


# ---- Recipe 2: add an RoI-heads variant --------------------------------------------------------------------------


class PenalizedRoIHeads(RoIHeads):
    """The standard RoI heads plus a loss of their own: an L2 penalty on the box regressor's weights, which the
    module adds to the total like the five others."""

    def __init__(self, *args, penalty: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        self.penalty = penalty

    def _losses(self, *args, **kwargs):
        losses = super()._losses(*args, **kwargs)
        losses["bbox_weight_penalty"] = self.penalty * self.box_predictor.bbox_pred.weight.pow(2).sum()
        return losses


ROI_HEADS_PENALIZED = """\
# @package model.net.roi_heads
# The standard RoI heads with an L2 penalty on the box regressor (tests/test_recipes.py).
defaults:
  - standard
  - _self_

_target_: tests.test_recipes.PenalizedRoIHeads
penalty: 0.5
"""


def test_recipe_add_an_roi_heads_variant(tmp_path):
    search = write_configs(tmp_path, {"model/roi_heads/penalized.yaml": ROI_HEADS_PENALIZED})
    cfg = compose_config([*search, *TINY_MODEL, "model/roi_heads=penalized"])
    net = instantiate(cfg.model.net)
    assert isinstance(net.roi_heads, PenalizedRoIHeads) and net.roi_heads.penalty == 0.5
    losses = train_once(net)
    assert set(losses) == {*LOSS_KEYS, "bbox_weight_penalty"} and losses["bbox_weight_penalty"] > 0


# ---- Recipe 3: add a dataset -------------------------------------------------------------------------------------


class TwoBoxes(torch.utils.data.Dataset):
    """Grey 64x64 images, each with a bright square (label 1) and a dark one (label 2) at random places.

    Follows the dataset contract (``mrcnn/data/contract.py``): ``class_names`` and ``(image, target)`` items.
    """

    class_names = ["bright", "dark"]

    def __init__(self, num_images: int = 8, size: int = 64, seed: int = 0):
        self.num_images, self.size, self.seed = num_images, size, seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        image = torch.full((3, self.size, self.size), 0.5)
        masks = torch.zeros(2, self.size, self.size, dtype=torch.uint8)
        boxes = []
        half = self.size // 2
        for i, value in enumerate((1.0, 0.0)):  # the bright square in the left half, the dark one in the right
            side = int(torch.randint(8, half - 4, (), generator=generator))
            x = i * half + int(torch.randint(0, half - side, (), generator=generator))
            y = int(torch.randint(0, self.size - side, (), generator=generator))
            image[:, y : y + side, x : x + side] = value
            masks[i, y : y + side, x : x + side] = 1
            boxes.append([x, y, x + side, y + side])
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor([1, 2]),
            "masks": masks,
            "iscrowd": torch.zeros(2, dtype=torch.int64),
            "area": masks.flatten(1).sum(1).float(),
            "image_id": index,
        }
        return image, target


DATA_TWO_BOXES = """\
# Two squares per image (tests/test_recipes.py).
classes: [bright, dark]
num_classes: ${mrcnn.len:${data.classes}}
min_size: 64
max_size: 64

datamodule:
  _target_: mrcnn.data.datamodule.InstanceDataModule
  batch_size: 2
  train_dataset:
    _target_: tests.test_recipes.TwoBoxes
    num_images: 4
    seed: ${seed}
  val_dataset:
    _target_: tests.test_recipes.TwoBoxes
    num_images: 2
    seed: 1000
"""


def test_recipe_add_a_dataset(tmp_path):
    search = write_configs(tmp_path, {"data/two_boxes.yaml": DATA_TWO_BOXES})
    cfg = compose_config([*search, "data=two_boxes", "debug=fast", "trainer.max_steps=2"], run_dir=str(tmp_path))
    datamodule, module, trainer = build(cfg)
    for dataset in (datamodule.train_dataset, datamodule.val_dataset):
        assert isinstance(dataset, InstanceDataset)
        for index in range(len(dataset)):
            check_sample(dataset[index], len(dataset.class_names))
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2 and module.class_names == ["bright", "dark"]
    assert "val/segm_AP" in trainer.callback_metrics


# ---- Recipe 4: add a logger --------------------------------------------------------------------------------------


class JsonLinesLogger(Logger):
    """Every logged row as one JSON line of ``<save_dir>/metrics.jsonl``."""

    def __init__(self, save_dir: str):
        super().__init__()
        self.path = Path(save_dir) / "metrics.jsonl"

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")


LOGGER_JSONL = """\
# The CSV log and a JSON-lines log beside it (tests/test_recipes.py).
defaults:
  - csv
  - _self_

jsonl:
  _target_: tests.test_recipes.JsonLinesLogger
  save_dir: ${run_dir}
"""


def test_recipe_add_a_logger(tmp_path):
    search = write_configs(tmp_path / "configs", {"logger/jsonl.yaml": LOGGER_JSONL})
    cfg = compose_config([*search, "logger=jsonl", "debug=fast", "data.num_train_images=4"], run_dir=str(tmp_path))
    datamodule, module, trainer = build(cfg)
    assert [type(logger) for logger in trainer.loggers] == [ContinuedCSVLogger, JsonLinesLogger]
    trainer.fit(module, datamodule=datamodule)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == [0, 1]
    assert any("val/segm_AP" in row for row in rows)
