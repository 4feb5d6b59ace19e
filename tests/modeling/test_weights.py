"""Initial weights: torchvision detection files for other classes, our own checkpoints, ImageNet backbones."""

import logging

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torchvision.models import resnet18
from torchvision.ops import FrozenBatchNorm2d

from mrcnn.engine.build import build_module
from mrcnn.engine.checkpoints import check_checkpoint_fits
from mrcnn.errors import CommandError
from mrcnn.modeling.mask_rcnn import is_class_specific, load_torchvision_weights, torchvision_to_mrcnn_state_dict
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.runs import training_only_trainer
from tests.helpers.torchvision_models import torchvision_maskrcnn

# torchvision's layout at the tiny model's sizes (ResNet-18, narrow FPN and heads).
TINY_TORCHVISION = {"depth": 18, "fpn_channels": 16, "box_head_dim": 32, "mask_head_dim": 16}
# The torchvision preset at those sizes (model=tiny narrows model=small, whose GroupNorm heads torchvision lacks).
TINY_PRESET = [
    "model=torchvision_r50_fpn",
    *(f"model.{key}={value}" for key, value in TINY_TORCHVISION.items()),
    "model.rois_per_image=32",
    "data.image_size=64",
]
CLASS_LAYERS = [
    "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.mask_head.predictor.bias",
    "roi_heads.mask_head.predictor.weight",
]


def fresh_model(overrides):
    """The model the config builds, with the initialisation build_module gives it (seed 0)."""
    torch.manual_seed(0)
    return instantiate(compose_config(overrides).model.net)


def test_torchvision_weights_for_other_classes_load_all_but_the_class_layers(tmp_path, caplog):
    torch.manual_seed(1)
    coco = torchvision_maskrcnn(num_classes=91, **TINY_TORCHVISION)  # COCO's 90 classes + background
    path = tmp_path / "coco.pth"
    torch.save(coco.state_dict(), path)
    overrides = [*TINY_PRESET]  # the shapes data: 6 classes
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="mrcnn.engine.checkpoints"):
        module = build_module(compose_config([*overrides, f"weights={path}"]))

    loaded, file = module.model.state_dict(), torchvision_to_mrcnn_state_dict(coco.state_dict())
    initial = fresh_model(overrides).state_dict()
    assert sorted(k for k in file if is_class_specific(k)) == CLASS_LAYERS
    for key, value in file.items():
        if is_class_specific(key):
            # Re-initialised: the model's own initialisation for its 6 classes, not the file's 90.
            assert loaded[key].shape[0] in (7, 28) and value.shape[0] in (91, 364)
            assert torch.equal(loaded[key], initial[key]), key
        else:
            assert torch.equal(loaded[key], value), key
    lines = [r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage()]
    assert len(lines) == 1 and all(key in lines[0] for key in CLASS_LAYERS) and "6 classes" in lines[0]
    # torchvision's COCO builder sets FrozenBatchNorm eps to 0: so does loading its file.
    assert {m.eps for m in module.model.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}

    # Evaluated or predicted, random class layers would score random detections: refused, naming both counts.
    for mode in ("evaluate", "predict"):
        with pytest.raises(CommandError) as error:
            build_module(compose_config([*overrides, f"weights={path}", f"mode={mode}"]))
        assert (
            f"weights={path} was trained on 90 classes, and this run's model is built for 6 classes ['circle',"
            in str(error.value)
        )
    # Built for the file's classes, it loads every tensor.
    module = build_module(compose_config([*overrides, "model.num_classes=90", f"weights={path}", "mode=predict"]))
    assert all(torch.equal(module.model.state_dict()[key], value) for key, value in file.items())


def test_a_file_of_another_architecture_still_fails_clearly(tmp_path):
    other = torchvision_maskrcnn(num_classes=91, **{**TINY_TORCHVISION, "fpn_channels": 32})
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(CommandError, match=r"weights=.*other\.pth.*does not match the configured model.*fpn"):
        build_module(compose_config([*TINY_PRESET, f"weights={tmp_path / 'other.pth'}"]))


def test_an_imagenet_file_of_another_depth_names_the_depth_it_holds(tmp_path):
    # torch's load_state_dict said "size mismatch for ..." once per tensor (a traceback through Hydra's instantiate).
    from hydra.errors import InstantiationException
    from torchvision.models import resnet50

    from mrcnn.errors import command_error_of
    from mrcnn.modeling.backbone import resnet_body

    small, large = tmp_path / "resnet18.pth", tmp_path / "resnet50.pth"
    torch.save(resnet18(weights=None).state_dict(), small)
    torch.save(resnet50(weights=None).state_dict(), large)
    with pytest.raises(
        CommandError,
        match=rf"^model\.backbone_weights={small} holds a ResNet-18, and this model is a ResNet-50 \(model\.depth=50\): "
        r"set model\.depth=18, or give a ResNet-50 file",
    ):
        resnet_body(50, "frozen_bn", str(small))
    with pytest.raises(CommandError, match=r"holds a ResNet-50, and this model is a ResNet-34 \(model\.depth=34\)"):
        resnet_body(34, "frozen_bn", str(large))
    # Built from the config, Hydra wraps it; run.py finds it there and prints its message alone.
    overrides = ["model=mask_rcnn", "model.depth=34", "model.norm=frozen_bn", f"model.backbone_weights={small}"]
    with pytest.raises(InstantiationException) as error:
        build_module(compose_config([*overrides, "model.fpn_channels=16", "data.image_size=64"]))
    assert "holds a ResNet-18, and this model is a ResNet-34" in str(command_error_of(error.value))


def test_eps_follows_the_files_naming():
    """torchvision's naming means torchvision's builder (eps 0 for its COCO weights); our own naming keeps eps."""
    model = fresh_model(TINY_PRESET)
    torchvision_file = torchvision_maskrcnn(num_classes=7, **TINY_TORCHVISION).state_dict()
    load_torchvision_weights(model, torchvision_file, frozen_bn_eps=None)
    assert {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)} == {1e-5}
    load_torchvision_weights(model, torchvision_file)
    assert {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}
    other = fresh_model(TINY_PRESET)
    assert load_torchvision_weights(other, model.state_dict()) == []  # our naming, the same classes: everything
    assert {m.eps for m in other.modules() if isinstance(m, FrozenBatchNorm2d)} == {1e-5}
    # The same number of classes but other classes: new_classes keeps the model's class layers.
    assert sorted(load_torchvision_weights(other, model.state_dict(), new_classes=True)) == CLASS_LAYERS


def train_checkpoint(tmp_path, overrides, steps=2):
    """A Lightning checkpoint after ``steps`` steps of the tiny model on shapes (``overrides`` added).

    Returns:
        (checkpoint path, the trained module, its trainer)
    """
    cfg = compose_config([*TINY_MODEL, "data.num_train_images=8", "data.datamodule.batch_size=2", *overrides])
    L.seed_everything(0)
    module = instantiate(cfg.module)
    trainer = training_only_trainer(max_steps=steps)
    trainer.fit(module, datamodule=instantiate(cfg.data.datamodule))
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)
    return path, module, trainer


def test_lightning_checkpoint_as_weights_fine_tunes_from_a_fresh_start(tmp_path, caplog):
    path, trained, _ = train_checkpoint(tmp_path, [])
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["mrcnn_model"]["class_names"] == list(trained.class_names)

    # Two of the six classes: everything but the class layers comes from the checkpoint.
    overrides = [*TINY_MODEL, "data.classes=[circle,square]", "data.num_train_images=4", "data.datamodule.batch_size=2"]
    with caplog.at_level(logging.INFO, logger="mrcnn.engine.checkpoints"):
        module = build_module(compose_config([*overrides, f"weights={path}"]))
    assert module.class_names == ["circle", "square"]
    expected = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items()}
    for key, value in module.model.state_dict().items():
        if is_class_specific(key):
            assert value.shape[0] in (3, 12), key
        else:
            assert torch.equal(value, expected[key]), key
    assert any("re-initialised" in r.getMessage() and "2 classes" in r.getMessage() for r in caplog.records)
    with pytest.raises(
        CommandError, match=r"was trained on 6 classes \['circle', .*built for 2 classes \['circle', 'sq"
    ):
        build_module(compose_config([*overrides, f"weights={path}", "mode=evaluate"]))
    # Other classes, as many: their layers fit, and would score the wrong classes. The way out names data.classes.
    with pytest.raises(CommandError, match=r"layers would be mismatched.*Use data of its classes \(data\.classes\)"):
        build_module(
            compose_config(
                [
                    *TINY_MODEL,
                    "data.classes=[star,ring,crescent,square,triangle,circle]",
                    f"weights={path}",
                    "mode=predict",
                ]
            )
        )
    # With a checkpoint to evaluate (a fine-tuned run's own overrides keep its weights=), the checkpoint's weights
    # replace the file's: nothing is refused.
    build_module(compose_config([*overrides, f"weights={path}", "mode=evaluate", f"ckpt_path={path}"]))

    # Optimizer, step and schedule start fresh: a 1-step run ends at step 1 with the warmup's first lr.
    cfg = compose_config(overrides)
    trainer = training_only_trainer(max_steps=1)
    trainer.fit(module, datamodule=instantiate(cfg.data.datamodule))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == 1 and scheduler.last_epoch == 1
    assert scheduler.base_lrs[0] == pytest.approx(cfg.base_lr * 2 / 16)

    # The same classes: every tensor loads.
    same = build_module(compose_config([*TINY_MODEL, f"weights={path}"]))
    for key, value in same.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_checkpoint_restores_frozen_bn_eps(tmp_path):
    """A model fine-tuned from torchvision weights (eps 0) gets eps 0 back from its checkpoint, as weights or to resume."""
    overrides = [*TINY_MODEL, "model.norm=frozen_bn"]
    _, trained, trainer = train_checkpoint(tmp_path, ["model.norm=frozen_bn"], steps=1)
    for m in trained.model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = 0.0
    path = tmp_path / "eps0.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["mrcnn_model"]["frozen_bn_eps"].values()) == {0.0}

    as_weights = build_module(compose_config([*overrides, f"weights={path}"]))
    assert {m.eps for m in as_weights.model.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}
    resumed = build_module(compose_config(overrides))
    assert {m.eps for m in resumed.model.modules() if isinstance(m, FrozenBatchNorm2d)} == {1e-5}
    resumed.on_load_checkpoint(checkpoint)  # what Lightning calls with ckpt_path=
    assert {m.eps for m in resumed.model.modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}


def test_imagenet_backbone_with_frozen_bn(tmp_path, caplog):
    """``model=mask_rcnn model.norm=frozen_bn model.backbone_weights=<torchvision ResNet file>``."""
    torch.manual_seed(2)
    imagenet = resnet18(weights=None)
    with torch.no_grad():
        for m in imagenet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-default statistics, as a trained file has
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    overrides = [
        "model=mask_rcnn",
        "model.depth=18",
        "model.norm=frozen_bn",
        f"model.backbone_weights={path}",
        "model.trainable_layers=3",
        "model.fpn_channels=16",
        "model.box_head_dim=32",
        "model.mask_head_dim=16",
        "data.image_size=64",
    ]
    with caplog.at_level(logging.INFO, logger="mrcnn.modeling.backbone"):
        module = build_module(compose_config(overrides))
    # One line says the file was loaded, as weights= does: its 122 tensors but fc's 2 and the 20 BatchNorm step counts.
    assert f"model.backbone_weights={path}: loaded 100 tensors of a ResNet-18 into the backbone" in caplog.text
    body = module.model.backbone.body
    for key, value in imagenet.state_dict().items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(body.state_dict()[key], value), key
    norms = [m for m in body.modules() if isinstance(m, FrozenBatchNorm2d)]
    # torchvision's detection builder leaves eps at 1e-5 for an ImageNet backbone (0 only for its COCO weights).
    assert len(norms) == 20 and {m.eps for m in norms} == {1e-5}
    trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    # It trains: one step's losses are finite.
    module.model.train()
    image = torch.rand(3, 64, 64)
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:50] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks}
    _, losses = module.model([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())


def test_checkpoint_of_other_classes_stops_with_both_lists(tmp_path, caplog):
    """What Lightning calls for ckpt_path= (evaluate, resume): other classes stop before any tensor loads, with a
    CommandError, which run.py prints alone: the message says all there is to change."""
    path, trained, _ = train_checkpoint(tmp_path, [], steps=1)
    checkpoint = torch.load(path, weights_only=True)
    other_cfg = compose_config([*TINY_MODEL, "data.classes=[circle,square]"])
    other = build_module(other_cfg)
    with pytest.raises(
        CommandError, match=r"trained on 6 classes \['circle', .*'star'\], but this run's data has 2 classes"
    ):
        other.on_load_checkpoint(checkpoint)
    # evaluate and predict check the tensors' shapes first, which the number of classes changes: the classes are
    # named there too, not the shapes.
    with pytest.raises(CommandError, match=rf"^ckpt_path={path} was trained on 6 classes .* has 2 classes \['circle'"):
        check_checkpoint_fits(other, str(path), other_cfg)
    # The same classes at another input size load, with a warning naming both sizes.
    resized = build_module(compose_config([*TINY_MODEL, "data.min_size=96", "data.max_size=96"]))
    with caplog.at_level(logging.WARNING, logger="mrcnn.engine.model_record"):
        resized.on_load_checkpoint(checkpoint)
    assert (
        "trained at min_size=[64], max_size=64, but this run resizes images to min_size=[96], max_size=96"
        in caplog.text
    )
