"""configs/setting/: every experiment composes at every setting, setting=paper is the paper's recipe key by key, and
a missing data root or weights file stops a run before anything is built."""

import pytest
from hydra.utils import instantiate

import mrcnn.engine.train
from mrcnn.engine.config_checks import check_config
from tests.helpers.config import compose_config

EXPERIMENTS = [None, "ablation_backbone", "ablation_mask_head", "ablation_mask_loss", "ablation_roialign"]
SETTINGS = ["cpu", "gpu", "paper", "paper_1x"]
# What setting=paper needs from the user (the values are only paths here).
PAPER_INPUT = ["data.root=/data/coco", "model.backbone_weights=/models/resnet50.pth"]


def _compose(experiment, setting, *overrides):
    extra = PAPER_INPUT if setting.startswith("paper") else []
    experiment = [f"experiment={experiment}"] if experiment else []
    return compose_config([*experiment, f"setting={setting}", *extra, *overrides], return_hydra_config=True)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_at_every_setting(experiment, setting):
    cfg = _compose(experiment, setting)
    assert cfg.setting_name == setting
    # The config resolves (every interpolation has a value) but for the run folder Hydra fills in a job.
    for key in ("data", "model", "trainer", "scheduler", "optimizer", "callbacks", "module"):
        assert cfg[key] is not None
        dict(cfg[key])
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg.model, resolve=True)
    OmegaConf.to_container(cfg.data, resolve=True)


# He et al. 2017, Sec. 3.1 and Table 2: each value of the paper, by the key that sets it.
PAPER = {
    "data.min_size": 800,
    "data.max_size": 1333,
    "data.datamodule.batch_size": 2,  # per GPU, x 8 GPUs
    "data.augmentation._target_": "mrcnn.data.transforms.train_transforms",  # a horizontal flip only
    "data.augmentation.hflip_prob": 0.5,
    "model.depth": 50,
    "model.width": 64,
    "model.norm": "frozen_bn",
    "model.backbone_weights": "/models/resnet50.pth",
    "model.anchor_sizes": [32, 64, 128, 256, 512],
    "model.net.rpn.aspect_ratios": [0.5, 1.0, 2.0],
    "model.net.roi_heads.positive_fraction": 0.25,
    "model.mask_target_form": "binary",
    "optimizer.momentum": 0.9,
    "optimizer.weight_decay": 1.0e-4,
    "trainer.max_steps": 160_000,
    "scheduler.milestone_steps": [120_000],
    "scheduler.gamma": 0.1,
}
# Per backbone: sampled RoIs per image (training) and proposals per image (testing).
PER_BACKBONE = {"c4": (64, 300), "fpn": (512, 1000)}


@pytest.mark.parametrize("backbone", ["c4", "fpn"])
def test_setting_paper_is_the_papers_recipe_key_by_key(backbone):
    from omegaconf import OmegaConf

    cfg = _compose("ablation_backbone", "paper", f"model/backbone={backbone}")
    for key, value in PAPER.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.data.datamodule.train_dataset._target_ == "mrcnn.data.coco.CocoDataset"
    assert cfg.data.datamodule.train_dataset.ann_file == "/data/coco/annotations/instances_train2017.json"
    assert cfg.data.datamodule.val_dataset.ann_file == "/data/coco/annotations/instances_val2017.json"
    # lr 0.02 at the paper's global batch of 16 (2 per GPU x 8 GPUs), as the module scales it.
    global_batch = cfg.data.datamodule.batch_size * 8
    assert global_batch == 16 and cfg.base_lr * global_batch / cfg.module.base_batch_size == 0.02
    rois, proposals = PER_BACKBONE[backbone]
    assert cfg.model.net.roi_heads.batch_size_per_image == rois
    assert cfg.model.net.rpn.post_nms_top_n_test == proposals
    # Every variant of every ablation at setting=paper trains with the same recipe.
    for experiment in EXPERIMENTS[1:]:
        other = _compose(experiment, "paper", f"model/backbone={backbone}")
        for key, value in PAPER.items():
            assert OmegaConf.select(other, key) == value, (experiment, key)


def test_setting_paper_schedule_divides_lr_by_10_at_120k_after_a_warmup():
    import torch

    cfg = _compose(None, "paper")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.02)
    schedule = instantiate(cfg.scheduler)(optimizer, total_steps=cfg.trainer.max_steps)
    factor = schedule.lr_lambdas[0]
    assert factor(0) == pytest.approx(0.001) and factor(500) == pytest.approx(0.5005)
    assert factor(1000) == 1.0 and factor(119_999) == 1.0
    assert factor(120_000) == pytest.approx(0.1) and factor(159_999) == pytest.approx(0.1)


def test_setting_paper_1x_is_90k_with_drops_at_60k_and_80k():
    cfg = _compose("ablation_roialign", "paper_1x")
    assert cfg.trainer.max_steps == 90_000 and list(cfg.scheduler.milestone_steps) == [60_000, 80_000]
    assert cfg.base_lr == 0.02 and cfg.model.norm == "frozen_bn"


def test_setting_paper_runs_table_2b_on_c4_as_the_paper():
    cfg = _compose("ablation_mask_loss", "paper")
    assert cfg.hydra.sweeper.params["model/backbone"] == "c4"
    assert _compose("ablation_mask_loss", "cpu").hydra.sweeper.params.get("model/backbone") is None


def test_setting_gpu_is_full_width_resnet50_on_a_gpu():
    cfg = _compose("ablation_roialign", "gpu")
    assert (cfg.model.depth, cfg.model.width, cfg.data.image_size) == (50, 64, 256)
    assert cfg.trainer.accelerator == "gpu" and cfg.callbacks.cost_estimate.step_time_s > 0


def test_milestones_are_fractions_or_steps_not_both():
    import torch

    from mrcnn.lit_module import warmup_multistep_schedule

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.02)
    with pytest.raises(ValueError, match="not both"):
        warmup_multistep_schedule(optimizer, 100, milestones=(0.5,), milestone_steps=(50,))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            [],
            r"data\.root is not set: give data\.root=<folder> holding annotations/instances_train2017\.json, "
            r"annotations/instances_val2017\.json, train2017, val2017",
        ),
        (["data.root={tmp}/nowhere"], r"data\.root=.*nowhere: no such folder; it must hold annotations/"),
        (["data.root={tmp}"], r"data\.root=.* lacks train2017, annotations/instances_train2017\.json"),
        (
            ["data.root={tmp}", "model.backbone_weights={tmp}/r50.pth"],
            r"model\.backbone_weights=.*r50\.pth: no such "
            r"file; it must be an ImageNet ResNet-50 state dict saved with torch\.save",
        ),
    ],
)
def test_a_missing_data_root_or_weights_file_stops_before_anything_is_built(overrides, message, tmp_path, monkeypatch):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    weights = [] if any("backbone_weights" in o for o in overrides) else ["model.backbone_weights=???"]
    cfg = compose_config(["experiment=ablation_backbone", "setting=paper", *overrides, *weights])

    def built(*args, **kwargs):
        raise AssertionError("something was built")

    monkeypatch.setattr(mrcnn.engine.train, "build", built)
    with pytest.raises(FileNotFoundError, match=message):
        mrcnn.engine.train.train(cfg)
    # The weights key is named too, when it is not set.
    if weights:
        with pytest.raises(FileNotFoundError, match=r"model\.backbone_weights is not set: give"):
            check_config(cfg)
