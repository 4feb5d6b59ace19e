"""evaluate / predict build the model a checkpoint was trained as (mrcnn.engine.checkpoint_model)."""

import logging
import re
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mrcnn.engine.checkpoint_model import MODEL_GROUPS, chooses_model_by_group, use_checkpoint_model
from mrcnn.engine.checkpoints import RUN_RECORD_KEY, check_checkpoint_fits
from mrcnn.engine.launch import DDP_JOB_DIR_ENV
from mrcnn.modeling.mask_head import SigmoidMaskLoss, SoftmaxMaskLoss
from mrcnn.modeling.poolers import RoIAlignPooler, RoIPoolPooler
from tests.helpers.config import ROOT, TINY_MODEL, compose_config

# A model whose switches without weights (pooler, mask loss) differ from the default's: its weights load into the
# default model without a complaint.
TRAINED = [*TINY_MODEL, "model/pooler=roi_pool", "model/mask_loss=softmax"]


def save_checkpoint(path: Path, overrides, **config_changes):
    """A Lightning-style checkpoint of a freshly built model of ``overrides``, recording its resolved config."""
    cfg = compose_config(overrides)
    torch.manual_seed(0)
    module = instantiate(cfg.module)
    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in config_changes.items():
        OmegaConf.update(config, key, value, merge=False)
    config = OmegaConf.to_container(config)
    record = {"config": config, "overrides": overrides}
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": "2.6.6", RUN_RECORD_KEY: record}, path)
    return module


def detections(module, image):
    module.eval()
    with torch.no_grad():
        return module.model([image])[0][0]


def test_without_model_overrides_the_checkpoints_model_is_built_and_scores_as_trained(tmp_path, caplog):
    # The weights were trained (here: drawn) on model/pooler=roi_pool, model/mask_loss=softmax, and an ImageNet
    # file on another machine; this run composes the tiny model with the defaults, at another input size.
    trained = save_checkpoint(
        tmp_path / "a.ckpt",
        TRAINED,
        **{"model.backbone_weights": "/elsewhere/r18.pth", "model.net.backbone.weights_path": "/elsewhere/r18.pth"},
    )
    trained.model.roi_heads.score_thresh = 0.0
    cfg = compose_config([*TINY_MODEL, "data.min_size=72", "model.box_score_thresh=0.0"])
    composed = compose_config([*TINY_MODEL, "data.min_size=72", "model.box_score_thresh=0.0"])
    assert check_checkpoint_fits(instantiate(composed.module), str(tmp_path / "a.ckpt"), composed) is None  # fits

    with caplog.at_level(logging.INFO):
        use_checkpoint_model(cfg, str(tmp_path / "a.ckpt"), ["model.box_score_thresh=0.0", "data.min_size=72"])
    assert "model.net.roi_heads.pooler._target_" in caplog.text  # says what it changed
    module = instantiate(cfg.module)
    heads = module.model.roi_heads
    assert isinstance(heads.box_pooler, RoIPoolPooler) and isinstance(heads.mask_loss, SoftmaxMaskLoss)
    # The command line's model key applies on top, through the config's interpolation; the data's size is this run's;
    # the ImageNet file is not read (the checkpoint's weights replace it).
    assert heads.score_thresh == 0.0 and list(module.model.transform.min_size) == [72]
    assert cfg.model.backbone_weights is None and cfg.model.net.backbone.weights_path is None

    module.load_state_dict(trained.state_dict())
    module.model.transform.min_size = trained.model.transform.min_size
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected, got = detections(trained, image), detections(module, image)
    assert len(expected["scores"]) > 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    # The run's own composed model, with the same weights, would have scored another model.
    composed = instantiate(compose_config([*TINY_MODEL, "model.box_score_thresh=0.0"]).module)
    composed.load_state_dict(trained.state_dict())
    assert isinstance(composed.model.roi_heads.box_pooler, RoIAlignPooler)
    assert not torch.equal(detections(composed, image)["scores"], expected["scores"])


def test_a_model_key_deleted_on_the_command_line_is_deleted_from_the_checkpoints_model(tmp_path):
    save_checkpoint(tmp_path / "a.ckpt", [*TRAINED, "model.detections_per_img=7"])
    cfg = compose_config([*TINY_MODEL, "~model.net.roi_heads.detections_per_img"])
    use_checkpoint_model(cfg, str(tmp_path / "a.ckpt"), ["~model.net.roi_heads.detections_per_img"])
    assert "detections_per_img" not in cfg.model.net.roi_heads
    assert cfg.model.detections_per_img == 7
    assert isinstance(instantiate(cfg.module).model.roi_heads.box_pooler, RoIPoolPooler)


def test_a_model_chosen_by_group_is_kept_with_a_warning_naming_the_differences(tmp_path, caplog):
    save_checkpoint(tmp_path / "a.ckpt", TRAINED)
    cfg = compose_config([*TINY_MODEL, "model/pooler=roi_align"])
    before = OmegaConf.to_container(cfg, resolve=False)
    with caplog.at_level(logging.WARNING):
        use_checkpoint_model(cfg, str(tmp_path / "a.ckpt"), ["model=tiny", "model/pooler=roi_align"])
    assert OmegaConf.to_container(cfg, resolve=False) == before
    assert (
        "model.net.roi_heads.pooler._target_: 'mrcnn.modeling.poolers.RoIPoolPooler' in the checkpoint" in caplog.text
    )
    assert "model.net.roi_heads.mask_loss._target_" in caplog.text
    assert isinstance(instantiate(cfg.module).model.roi_heads.mask_loss, SigmoidMaskLoss)


def test_the_same_model_by_group_gives_no_warning_and_an_old_checkpoint_changes_nothing(tmp_path, caplog):
    save_checkpoint(tmp_path / "a.ckpt", TRAINED)
    cfg = compose_config([*TRAINED, "data.min_size=72"])
    with caplog.at_level(logging.WARNING):
        use_checkpoint_model(cfg, str(tmp_path / "a.ckpt"), [*TRAINED, "data.min_size=72"])
    assert caplog.text == ""  # the input size is the data's (warned about separately, when it differs)

    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")
    cfg = compose_config(TINY_MODEL)
    before = OmegaConf.to_container(cfg, resolve=False)
    use_checkpoint_model(cfg, str(tmp_path / "old.ckpt"), [])
    assert OmegaConf.to_container(cfg, resolve=False) == before


@pytest.mark.parametrize(
    "override, by_group",
    [
        ("model=small", True),
        ("model/pooler=roi_pool", True),
        ("+model/mask_head@model.net.roi_heads.mask_head=mlp", True),
        ("experiment=ablation_roialign", True),
        ("ablation/mask_loss=softmax", True),
        ("setting=paper", True),
        ("debug=fast", True),
        ("model.box_score_thresh=0.1", False),
        ("~model.net.roi_heads.detections_per_img", False),
        ("seed=1", False),
        ("data=coco", False),
        ("trainer=gpu", False),
    ],
)
def test_which_overrides_choose_the_model_by_group(override, by_group):
    assert chooses_model_by_group(override) is by_group


def test_every_config_group_that_sets_model_keys_is_a_model_group():
    # A new group whose options set model keys, or choose model/ options, must join MODEL_GROUPS: else evaluate would
    # replace the model its option chose with the checkpoint's without a word.
    setting_model = set()
    for path in (ROOT / "configs").rglob("*.yaml"):
        group = path.relative_to(ROOT / "configs").parts
        if len(group) < 2:
            continue  # train.yaml
        text = path.read_text()
        config = yaml.safe_load(text) or {}
        defaults = [str(d) for d in config.get("defaults", [])] if isinstance(config, dict) else []
        global_package = "@package _global_" in text
        sets_model = isinstance(config, dict) and (
            (global_package and "model" in config) or any("/model" in d or "model/" in d for d in defaults)
        )
        if sets_model or group[0] == "model":
            setting_model.add(group[0])
    assert setting_model and setting_model <= set(MODEL_GROUPS), setting_model - set(MODEL_GROUPS)


def test_a_ddp_child_keeps_the_config_its_jobs_main_process_wrote(tmp_path, monkeypatch):
    # Lightning's DDP children read the job's resolved.yaml (swapped already, overrides applied) with no overrides of
    # their own: swapping again would give them the checkpoint's raw model, not rank zero's.
    save_checkpoint(tmp_path / "a.ckpt", TRAINED)
    monkeypatch.setenv(DDP_JOB_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = compose_config(TINY_MODEL)
    before = OmegaConf.to_container(cfg, resolve=False)
    use_checkpoint_model(cfg, str(tmp_path / "a.ckpt"), [])
    assert OmegaConf.to_container(cfg, resolve=False) == before


def test_the_class_count_follows_the_data_in_every_layer_that_reads_it(tmp_path):
    # Trained on two of the shapes; this run's data has all six. The heads read model.num_classes, which reads the
    # data's: each layer gets six (and then fails to fit, or re-initialises under weights=), never a mix of two and six.
    save_checkpoint(tmp_path / "a.ckpt", [*TRAINED, "data.classes=[circle,square]"])
    cfg = compose_config(TINY_MODEL)
    use_checkpoint_model(cfg, str(tmp_path / "a.ckpt"), [])
    assert isinstance(instantiate(cfg.module).model.roi_heads.box_pooler, RoIPoolPooler)
    assert cfg.model.num_classes == cfg.model.net.roi_heads.box_predictor.num_classes == 6
    assert cfg.model.net.roi_heads.mask_head.num_classes == 6


def test_a_model_key_the_checkpoints_network_does_not_read_is_named(tmp_path, caplog):
    # A C4 model derives its one anchor map's sizes from model.anchor_sizes another way than this run's FPN config:
    # the override cannot reach them, and says so instead of changing nothing without a word.
    save_checkpoint(tmp_path / "a.ckpt", [*TINY_MODEL, "model/backbone=c4", "model.anchor_sizes=[8,16,32]"])
    cfg = compose_config([*TINY_MODEL, "model.anchor_sizes=[4,8,16,32,64]", "model.box_score_thresh=0.2"])
    with caplog.at_level(logging.WARNING):
        use_checkpoint_model(
            cfg, str(tmp_path / "a.ckpt"), ["model.anchor_sizes=[4,8,16,32,64]", "model.box_score_thresh=0.2"]
        )
    assert "model.anchor_sizes=[4, 8, 16, 32, 64] changes nothing in the model" in caplog.text
    assert "box_score_thresh" not in caplog.text and cfg.model.net.roi_heads.score_thresh == 0.2


def test_evaluate_with_weights_from_a_checkpoint_of_this_project_builds_its_model(tmp_path, caplog):
    from mrcnn.engine.train import evaluate

    # Trained with another score threshold too: a knob above model.net (model.box_score_thresh) and what it derives.
    save_checkpoint(tmp_path / "a.ckpt", [*TRAINED, "model.box_score_thresh=0.3"])
    data = ["data.num_val_images=2", "data.datamodule.num_workers=0", "trainer.limit_val_batches=1"]
    cfg = compose_config(
        [*TINY_MODEL, *data, "mode=evaluate", f"weights={tmp_path / 'a.ckpt'}"], run_dir=str(tmp_path / "eval")
    )
    with caplog.at_level(logging.INFO):
        evaluate(cfg)
    assert f"the model is built from the config {tmp_path / 'a.ckpt'} was trained with" in caplog.text
    assert "model.net.roi_heads.pooler._target_" in caplog.text
    # The count of what is listed is the count of the list: the model.net keys, the first 8 shown.
    counts = re.search(
        r"composed model in (\d+) keys, (\d+) of them under model\.net: (.*?)(?: and (\d+) more)? \(a", caplog.text
    )
    assert counts, caplog.text
    listed = counts.group(3).split(", ")
    assert all(key.startswith("model.net.") for key in listed)
    assert int(counts.group(2)) == len(listed) + int(counts.group(4) or 0) < int(counts.group(1))


def test_a_checkpoint_with_batchnorm_where_this_model_freezes_it_fits_and_loads(tmp_path):
    # Saved with BatchNorm in every stage (or before frozen stages' BatchNorm was frozen): its step counts have no
    # place in a FrozenBatchNorm2d, which drops them on load.
    trained_cfg = compose_config([*TINY_MODEL, "model.norm=bn", "model.trainable_layers=5"])
    trained = instantiate(trained_cfg.module)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "bn.ckpt")
    cfg = compose_config([*TINY_MODEL, "model.norm=bn", "model.trainable_layers=3"])
    module = instantiate(cfg.module)
    check_checkpoint_fits(module, str(tmp_path / "bn.ckpt"), cfg)
    module.load_state_dict(trained.state_dict())  # strict, as Lightning loads it
    frozen = module.model.backbone.body.layer1[0].bn1
    assert type(frozen).__name__ == "FrozenBatchNorm2d"
    assert torch.equal(frozen.running_var, trained.model.backbone.body.layer1[0].bn1.running_var)
