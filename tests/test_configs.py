"""Every config file in every group composes and instantiates; bad choices fail clearly."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mrcnn.data.shapes import ShapesDataset
from mrcnn.engine.build import instantiate_callbacks
from mrcnn.modeling.mask_rcnn import LOSS_KEYS
from tests.helpers.config import CONFIG_DIR, TINY_MODEL, compose_config

ROOT = Path(__file__).resolve().parents[1]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def forward_once(net):
    ds = ShapesDataset(num_images=1, image_size=64, seed=1)
    image, target = ds[0]
    net.train()
    _, losses = net([image], [target])
    assert set(losses) == set(LOSS_KEYS) and all(torch.isfinite(v) for v in losses.values())


MODEL_SWITCHES = [
    (group, option)
    for group in ("model/backbone", "model/pooler", "model/mask_head", "model/mask_loss")
    for option in options(group)
]


@pytest.mark.parametrize("group,option", MODEL_SWITCHES, ids=[f"{g}={o}" for g, o in MODEL_SWITCHES])
def test_every_model_switch_builds_and_trains(group, option):
    overrides = [*TINY_MODEL, f"{group}={option}"]
    if option == "mlp3" or option == "mlp2":
        overrides.append("model.fpn_channels=4")  # keep the fc layers small in the test
    cfg = compose_config(overrides)
    forward_once(instantiate(cfg.model.net))


@pytest.mark.parametrize("model", options("model"))
def test_every_model_preset_instantiates(model):
    cfg = compose_config([f"model={model}"])
    net = instantiate(cfg.model.net)
    assert net.roi_heads.box_predictor.cls_score.out_features == cfg.data.num_classes + 1


def test_sigmoid_and_softmax_build_the_matching_loss():
    for loss, name in (("sigmoid", "SigmoidMaskLoss"), ("softmax", "SoftmaxMaskLoss")):
        net = instantiate(compose_config([*TINY_MODEL, f"model/mask_loss={loss}"]).model.net)
        assert type(net.roi_heads.mask_loss).__name__ == name


def test_softmax_with_class_agnostic_masks_is_a_clear_error():
    cfg = compose_config([*TINY_MODEL, "model/mask_loss=softmax", "model/mask_head=fcn_agnostic"])
    with pytest.raises(InstantiationException, match="class_agnostic"):
        instantiate(cfg.model.net)


def test_num_classes_comes_from_the_data_config():
    cfg = compose_config(["data.classes=[circle,ring]"])
    assert cfg.model.num_classes == 2
    net = instantiate(compose_config([*TINY_MODEL, "data.classes=[circle,ring]"]).model.net)
    assert net.roi_heads.mask_head.predictor.out_channels == 3


@pytest.mark.parametrize("group", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_configs_instantiate(group):
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        params = [torch.nn.Parameter(torch.zeros(2))]
        optimizer = instantiate(cfg.optimizer)(params, lr=0.1)
        if group == "scheduler":
            instantiate(cfg.scheduler)(optimizer, total_steps=100)


def test_shapes_data_config_instantiates():
    # The file-based data configs (coco, coco_format, cityscapes) are instantiated on generated
    # datasets in tests/data/test_data_configs.py.
    for option in ["shapes"]:
        cfg = compose_config(
            [f"data={option}", "data.num_train_images=4", "data.num_val_images=2", "data.datamodule.batch_size=2"]
        )
        datamodule = instantiate(cfg.data.datamodule)
        assert datamodule.num_classes == cfg.data.num_classes
        images, targets = next(iter(datamodule.train_dataloader()))
        assert len(images) == cfg.data.datamodule.batch_size


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_configs_compose(trainer):
    cfg = compose_config([f"trainer={trainer}"])
    assert cfg.trainer._target_ == "lightning.Trainer"
    if trainer == "cpu":
        instantiate(cfg.trainer, logger=False)


def test_logger_and_callback_configs_instantiate(tmp_path):
    for option in options("logger"):
        for logger in compose_config([f"logger={option}"], run_dir=str(tmp_path)).logger.values():
            instantiate(logger)
    for option in options("callbacks"):
        for callback in compose_config([f"callbacks={option}"], run_dir=str(tmp_path)).callbacks.values():
            instantiate(callback)


def test_loggers_and_callbacks_are_named_entries(tmp_path):
    cfg = compose_config(["logger=wandb", "~callbacks.throughput"], run_dir=str(tmp_path))
    # logger=wandb adds W&B beside the CSV log, which is defined once (logger/csv.yaml).
    assert list(cfg.logger) == ["csv", "wandb"]
    assert cfg.logger.csv == compose_config([], run_dir=str(tmp_path)).logger.csv
    callbacks = [type(c).__name__ for c in instantiate_callbacks(cfg)]
    assert "Throughput" not in callbacks and "LastCheckpoint" in callbacks


def test_module_config_instantiates():
    cfg = compose_config(TINY_MODEL)
    module = instantiate(cfg.module)
    assert module.class_names == list(cfg.data.classes)


def test_speed_switches_keep_the_model_and_its_checkpoint_keys(tmp_path):
    """channels_last, torch.compile, cuDNN autotuning, pinned memory and persistent workers are config
    switches; with them on, a training step gives the same losses and the state dict the same keys."""
    overrides = [*TINY_MODEL, "data.datamodule.num_workers=1"]
    fast = [
        "module.channels_last=true",
        "module.compile=true",
        # aot_eager traces exactly what inductor would get (our modules under dynamo, forward and
        # backward graphs) without a minute of C++ compilation in the test.
        "+module.compile_kwargs.backend=aot_eager",
        "trainer.benchmark=true",
        "data.datamodule.pin_memory=true",
        "data.datamodule.persistent_workers=true",
    ]
    plain_cfg, fast_cfg = compose_config(overrides), compose_config([*overrides, *fast])
    assert fast_cfg.trainer.benchmark is True
    datamodule = instantiate(fast_cfg.data.datamodule)
    assert datamodule.pin_memory and datamodule.persistent_workers

    torch.manual_seed(0)
    plain = instantiate(plain_cfg.module)
    torch.manual_seed(0)
    fast_module = instantiate(fast_cfg.module)
    conv = fast_module.model.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast_module.state_dict().keys() == plain.state_dict().keys()
    compiled = [fast_module.model.backbone, fast_module.model.roi_heads.box_head, fast_module.model.roi_heads.mask_head]
    assert all(m._compiled_call_impl is not None for m in compiled)
    assert plain.model.backbone._compiled_call_impl is None

    images, targets = zip(*(ShapesDataset(num_images=2, image_size=64, seed=1)[i] for i in range(2)))
    losses = []
    for module in (plain, fast_module):
        module.train()
        torch.manual_seed(1)
        _, step_losses = module(list(images), list(targets))
        sum(step_losses.values()).backward()
        losses.append(step_losses)
    for key in LOSS_KEYS:
        torch.testing.assert_close(losses[1][key], losses[0][key], rtol=1e-4, atol=1e-5)
    grad = fast_module.model.backbone.body.conv1.weight.grad
    torch.testing.assert_close(grad, plain.model.backbone.body.conv1.weight.grad, rtol=1e-3, atol=1e-5)


def test_unknown_variant_is_hydras_clear_error():
    with pytest.raises((MissingConfigException, ConfigCompositionException), match="roi_magic"):
        compose_config(["model/pooler=roi_magic"])
    result = subprocess.run(
        [sys.executable, "run.py", "model/pooler=roi_magic"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "Could not find 'model/pooler/roi_magic'" in result.stderr
    assert "Available options" in result.stderr and "roi_align" in result.stderr


def test_lightning_limits_are_plain_overrides(tmp_path):
    limits = [
        "trainer.max_steps=20",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=0.5",
        "trainer.val_check_interval=2",
        "trainer.accumulate_grad_batches=2",
    ]
    for trainer_option in options("trainer"):
        cfg = compose_config([f"trainer={trainer_option}", *limits], run_dir=str(tmp_path))
        assert cfg.trainer.max_steps == 20 and cfg.trainer.accumulate_grad_batches == 2
    trainer = instantiate(compose_config(limits, run_dir=str(tmp_path)).trainer, logger=False)
    assert (trainer.max_steps, trainer.limit_train_batches, trainer.limit_val_batches) == (20, 3, 0.5)
    assert (trainer.val_check_interval, trainer.accumulate_grad_batches) == (2, 2)


def test_an_added_key_that_nothing_reads_is_an_error_that_names_what_was_meant():
    from mrcnn.config import check_added_keys

    def check(*overrides, group_options=None):
        check_added_keys(compose_config(list(overrides)), list(overrides), group_options=group_options)

    # A config group's option picked as a key (Hydra's own hint for model.pooler=roi_pool).
    with pytest.raises(ValueError, match=r"nothing reads model\.pooler.*model/pooler=roi_pool \(options: a, b\)"):
        check("+model.pooler=roi_pool", group_options=lambda group: ["a", "b"])
    # A mistyped key, anywhere (Hydra's hint for data.min_sise=64), with the keys it may have meant.
    with pytest.raises(ValueError, match=r"^\+data\.min_sise=64: nothing reads data\.min_sise.*data\.min_size=64 \(no"):
        check("+data.min_sise=64")
    with pytest.raises(
        ValueError, match=r"^\+\+model\.note=x: nothing reads model\.note, so it would change nothing\.$"
    ):
        check("++model.note=x")
    with pytest.raises(ValueError, match=r"nothing reads predict\.scor_threshold.*predict\.score_threshold=0\.2"):
        check("+predict.scor_threshold=0.2")
    with pytest.raises(ValueError, match=r"nothing reads new_top_level"):
        check("+new_top_level.x=1")
    # A key of another option of its group (data=coco_format's), given without choosing that option.
    data_options = lambda group: ["cityscapes", "coco", "coco_format", "shapes"] * (group == "data")  # noqa: E731
    cfg = compose_config(["+data.train_json=train.json"], return_hydra_config=True)
    with pytest.raises(
        ValueError, match=r"data\.train_json is a key of data=coco_format, not of data=shapes: choose it, and give"
    ):
        check_added_keys(cfg, ["+data.train_json=train.json"], data_options, cfg.hydra.runtime.choices)
    cfg = compose_config(["data=coco_format", "++data.train_json=train.json"], return_hydra_config=True)
    check_added_keys(cfg, ["++data.train_json=train.json"], data_options, cfg.hydra.runtime.choices)
    # A key another option sets, under a _target_ here too: an argument of what it builds.
    cfg = compose_config(["++data.datamodule.val_batch_size=1"], return_hydra_config=True)
    check_added_keys(cfg, ["++data.datamodule.val_batch_size=1"], data_options, cfg.hydra.runtime.choices)
    # Callbacks and loggers, read entry by entry: one added whole, or switched off.
    for added in (
        "+callbacks.early={_target_:lightning.pytorch.callbacks.EarlyStopping,monitor:val/segm_AP}",
        "++callbacks.progress_bar=null",
        "++logger.csv=null",
    ):
        check(added)
    # A key that only Hydra's own settings read (run.py passes them apart: a job's config has no hydra node).
    overrides = ["+tag=baseline", "hydra.run.dir=/tmp/runs/${tag}"]
    hydra_cfg = compose_config(overrides, return_hydra_config=True).hydra
    with pytest.raises(ValueError, match="nothing reads tag"):
        check_added_keys(compose_config(overrides), overrides)
    check_added_keys(compose_config(overrides), overrides, hydra_cfg=hydra_cfg)
    # ++ of a key the chosen option has by inheritance (model=small composes model=mask_rcnn): composed without the
    # override, the key is there, so nothing is added.
    overrides = ["model=small", "model/mask_head=mlp2", "++model.mask_head_convs=2"]
    cfg = compose_config(overrides, return_hydra_config=True)
    model_options = lambda group: ["mask_rcnn", "small", "tiny"] * (group == "model")  # noqa: E731
    with pytest.raises(ValueError, match="nothing reads model.mask_head_convs"):
        check_added_keys(cfg, overrides, model_options, cfg.hydra.runtime.choices)
    check_added_keys(cfg, overrides, model_options, cfg.hydra.runtime.choices, recompose=compose_config)
    # Read: keys with a rule (given again with ++), arguments of what a _target_ builds (the trainer, a callback
    # added whole, the model's modules), keys an interpolation reads, plain (not added) overrides, Hydra's own
    # keys, and config groups added with + (no key of that name in the config).
    check(
        "model.width=32",
        "++model.width=32",
        "++data.min_size=96",
        "+trainer.profiler=simple",
        "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping",
        "+callbacks.stop.monitor=val/segm_AP",
        "++model.net.roi_heads.detections_per_img=50",
        "+module.compile_kwargs.backend=eager",
        "++data.datamodule.val_batch_size=1",
        group_options=lambda group: [],
    )
    # A config group's option added with + (its keys land elsewhere: no key of the group's name).
    check_added_keys(compose_config(["debug=fast"]), ["+debug=fast"], group_options=lambda group: ["fast"])
    cfg = compose_config(["+data.extra=1"])
    cfg.model.width = "${data.extra}"  # read by an interpolation
    check_added_keys(cfg, ["+data.extra=1"])
    cfg = compose_config(["+data.extra.a=1"])
    cfg.model.width = "${data.extra}"  # reads the mapping as a whole, and so its keys
    check_added_keys(cfg, ["+data.extra.a=1"])
    with pytest.raises(ValueError, match=r"nothing reads data\.extra\.a"):
        check_added_keys(compose_config(["+data.extra.a=1"]), ["+data.extra.a=1"])


def test_an_instantiation_error_names_the_key_and_the_group_option_that_wrote_it():
    from hydra.errors import InstantiationException

    from mrcnn.config import config_key, where_built

    cfg = compose_config(
        [*TINY_MODEL, "model/pooler=roi_pool", "+model.net.roi_heads.pooler.align=1"], return_hydra_config=True
    )
    choices = dict(cfg.hydra.runtime.choices)
    with pytest.raises(InstantiationException) as error:
        instantiate(cfg.module)
    message = where_built(str(error.value), cfg, choices)
    assert "unexpected keyword argument 'align'" in message
    assert (
        "full_key: module.model.roi_heads (written as model.net.roi_heads, chosen by model/roi_heads=standard)"
        in message
    )
    # Through the interpolation module.model: ${model.net}, to the most specific group named in the key.
    assert config_key(cfg, "module.model.roi_heads.pooler") == "model.net.roi_heads.pooler"
    assert "(written as model.net.roi_heads.pooler, chosen by model/pooler=roi_pool)" in where_built(
        "Error locating target 'x.Y'\nfull_key: module.model.roi_heads.pooler", cfg, choices
    )
    assert "full_key: trainer (chosen by trainer=cpu)" in where_built("full_key: trainer", cfg, choices)
    # Nothing to add: a key that is not there, or no full_key.
    assert where_built("full_key: no.such.key", cfg, choices) == "full_key: no.such.key"
    assert where_built("Error locating target 'x.Y'", cfg, choices) == "Error locating target 'x.Y'"


def test_a_group_option_picked_with_a_dot_is_an_error_that_names_the_slash():
    from mrcnn.config import check_group_overrides

    # Every config group (nested ones too), with one of its options and a sweep over all of them.
    groups = sorted({str(p.parent.relative_to(CONFIG_DIR)) for p in Path(CONFIG_DIR).rglob("*.yaml")})
    groups = [group for group in groups if "/" in group]  # a top-level group's name has no dot to mistake
    assert {"model/backbone", "data/augmentation", "setting/experiment/cpu"} <= set(groups)
    for group in groups:
        option, every = options(group)[0], ",".join(options(group))
        for value in (option, every):
            dotted = f"{group.replace('/', '.')}={value}"
            with pytest.raises(ValueError, match=rf"^{re.escape(dotted)}: {group} is a config group; .* {group}="):
                check_group_overrides(["-m", "seed=0", dotted])
    # Added with + or ++ as well: ++data.augmentation=photometric would replace the mapping with a string.
    for added in ("+model.backbone=c4", "++data.augmentation=photometric"):
        with pytest.raises(ValueError, match=rf"^{re.escape(added)}: .* is a config group; choose its option with "):
            check_group_overrides([added])
    # The slash, keys that are no group, values that are no option (data.augmentation=null sets a key), flags and
    # deletions pass.
    check_group_overrides(
        ["model/backbone=c4", "model.depth=50", "model.backbone=c9", "data.augmentation=null", "model.backbone=c4,c9"]
    )
    check_group_overrides(["--multirun", "--config-name", "train", "+model.backbone=c9", "~model.pooler"])


def test_a_config_group_that_does_not_exist_is_named_with_the_one_meant():
    # Hydra's advice for it ("To append to your config use +ablation/mask_los=softmax") adds a key nothing reads: a
    # sweep over it trained every job, each variant twice.
    from mrcnn.config import check_group_overrides

    for typo in ("ablation/mask_los=softmax", "+ablation/mask_los=softmax,sigmoid", "++ablation/mask_los=softmax"):
        with pytest.raises(ValueError, match=r"no config group ablation/mask_los; did you mean ablation/mask_loss \("):
            check_group_overrides(["-m", typo])
    with pytest.raises(ValueError, match=r"^\+foo/bar=1: there is no config group foo/bar \(the groups: ablation, "):
        check_group_overrides(["+foo/bar=1"])
    # Real groups, Hydra's own, a package, and groups of another config folder (hydra.searchpath) pass.
    check_group_overrides(["model/pooler=roi_pool", "hydra/launcher=basic", "model/pooler@model.x=roi_pool"])
    check_group_overrides(["hydra.searchpath=[file:///my/configs]", "+mine/extra=x"])
    check_group_overrides(["--config-dir=/my/configs", "+mine/extra=x"])
    check_group_overrides(["-cd", "/my/configs", "+mine/extra=x"])


def test_each_backbone_selects_its_roi_heads_and_the_command_line_wins():
    chosen = {}
    for backbone in options("model/backbone"):
        cfg = compose_config([f"model/backbone={backbone}"], return_hydra_config=True)
        chosen[backbone] = cfg.hydra.runtime.choices["model/roi_heads"]
    assert chosen == {"c4": "res5", "c5": "standard", "fpn": "standard"}
    # Every RoI-heads option is built by test_every_model_switch_builds_and_trains through its backbone.
    assert set(chosen.values()) == set(options("model/roi_heads"))
    cfg = compose_config(["model/backbone=c4", "model/roi_heads=standard"], return_hydra_config=True)
    assert cfg.model.net.roi_heads._target_ == "mrcnn.modeling.roi_heads.RoIHeads"


def test_a_backbone_file_that_leaves_a_declared_key_unset_fails_at_compose_naming_it(tmp_path):
    """configs/model/mask_rcnn.yaml declares what a backbone file must fill (???); compose names what is left."""
    declared = OmegaConf.load(Path(CONFIG_DIR) / "model" / "mask_rcnn.yaml")
    contract = [key for key in declared if OmegaConf.is_missing(declared, key)]
    assert len(contract) == 9 and "featmap_names" in contract and "neck_post_nms_top_n_test" in contract
    fpn = OmegaConf.load(Path(CONFIG_DIR) / "model" / "backbone" / "fpn.yaml")
    for key in contract:
        # The FPN file without `key`, under another name in a config dir of the test's own.
        partial = OmegaConf.masked_copy(fpn, [k for k in fpn if k != key])
        (tmp_path / "model" / "backbone").mkdir(parents=True, exist_ok=True)
        (tmp_path / "model" / "backbone" / "partial.yaml").write_text("# @package model\n" + OmegaConf.to_yaml(partial))
        with pytest.raises(ValueError, match=rf"leaves model\.{key} unset"):
            compose_config([f"hydra.searchpath=[file://{tmp_path}]", "model/backbone=partial"])
    # The same file with every key composes.
    (tmp_path / "model" / "backbone" / "partial.yaml").write_text("# @package model\n" + OmegaConf.to_yaml(fpn))
    compose_config([f"hydra.searchpath=[file://{tmp_path}]", "model/backbone=partial"])


@pytest.mark.parametrize(
    "overrides, workers, persistent",
    [
        ([], 0, False),  # the CPU: generating in the main process beats handing images over from workers
        (["trainer=ddp_cpu"], 0, False),
        (["trainer=gpu"], 4, True),  # a GPU: the main process's time bounds the step
        (["trainer=ddp"], 4, True),
        (["trainer=gpu", "data.datamodule.num_workers=0"], 0, False),  # no workers to keep
    ],
)
def test_the_shapes_loader_workers_follow_where_training_runs(overrides, workers, persistent):
    cfg = compose_config(overrides)
    datamodule = instantiate(cfg.data.datamodule)
    assert (datamodule.num_workers, datamodule.persistent_workers) == (workers, persistent)
    assert cfg.data.datamodule.pin_memory is (cfg.trainer.accelerator != "cpu")  # pinned for a GPU only


def test_an_added_argument_that_what_is_built_does_not_take_is_an_error_before_anything_is_imported():
    from mrcnn.config import check_added_keys

    def check(*overrides):
        check_added_keys(compose_config(list(overrides)), list(overrides))

    # Read from the sources (Lightning's Trainer through its re-exports), not imported: Python would refuse them only
    # once torch and Lightning have loaded, and in a sweep every job would start and fail.
    for override, message in (
        (
            "+trainer.max_step=3",
            r"lightning\.Trainer takes no argument max_step.*Did you mean trainer\.max_steps=3 \(no",
        ),
        ("+data.datamodule.num_worker=1", r"InstanceDataModule takes no argument num_worker.*num_workers=1 \(no \+\)"),
        ("+optimizer.nesterv=true", r"SGD takes no argument nesterv.*Did you mean \+optimizer\.nesterov=true\?"),
    ):
        with pytest.raises(ValueError, match=rf"^\{override[0]}{re.escape(override[1:])}: .*{message}"):
            check(override)
    # RoIPool's pooler inherits its __init__ from the class beside it, which has no backward (RoIAlign's has).
    with pytest.raises(ValueError, match=r"RoIPoolPooler takes no argument backward"):
        check("model/pooler=roi_pool", "+model.net.roi_heads.pooler.backward=sparse")
    check("+model.net.roi_heads.pooler.backward=sparse")  # the default RoIAlign pooler
    check("+trainer.profiler=simple", "+optimizer.nesterov=true", "++logger.csv.flush_logs_every_n_steps=50")
    check("+module.compile_kwargs.mode=max-autotune")  # a mapping the module takes whole
    # Arguments inherited from a base defined elsewhere: C4's RoI heads hand their **kwargs to RoIHeads, the CSV
    # logger to Lightning's CSVLogger.
    with pytest.raises(ValueError, match=r"Res5RoIHeads takes no argument scor_thresh.*Did you mean"):
        check("model/backbone=c4", "+model.net.roi_heads.scor_thresh=0.1")
    check("model/backbone=c4", "+model.net.roi_heads.nms_thresh=0.6")  # RoIHeads' argument
    with pytest.raises(ValueError, match=r"ContinuedCSVLogger takes no argument flush_log_every_n_steps.*Did you"):
        check("+logger.csv.flush_log_every_n_steps=5")


def test_the_arguments_of_a_target_are_read_from_its_source_or_not_at_all():
    from mrcnn.engine.target_source import target_parameters

    assert {"max_steps", "devices", "precision"} <= target_parameters("lightning.pytorch.Trainer")
    assert target_parameters("mrcnn.modeling.poolers.RoIPoolPooler") == {
        "featmap_names",
        "output_size",
        "canonical_scale",
        "canonical_level",
    }
    # Where the source cannot tell: **kwargs, a name it cannot follow, a module that is not there.
    assert target_parameters("lightning.pytorch.loggers.WandbLogger") is None
    assert target_parameters("mrcnn.modeling.poolers.MyPooler") is None
    assert target_parameters("no_such_package.Thing") is None


def test_every_shipped_target_has_its_arguments_read_from_source_as_python_sees_them():
    # What the added-key check reads without importing equals what Python's signature says, for every _target_ the
    # configs name; a **kwargs handed to the base class counts the base's arguments. Only WandbLogger's **kwargs
    # (for wandb.init) cannot be told.
    import inspect

    from hydra.utils import get_object

    from mrcnn.engine.target_source import target_parameters

    targets = {
        match.group(1)
        for path in Path(CONFIG_DIR).rglob("*.yaml")
        for match in re.finditer(r"_target_:\s*([\w.]+)", path.read_text())
    }
    assert len(targets) > 40
    unread = set()
    for target in sorted(targets):
        read = target_parameters(target)
        if read is None:
            unread.add(target)
            continue
        signature = inspect.signature(get_object(target)).parameters.values()
        named = {p.name for p in signature if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if any(p.kind == p.VAR_KEYWORD for p in signature):
            assert named < read, target  # its own, and its base's
        else:
            assert read == named, target
    assert unread == {"lightning.pytorch.loggers.WandbLogger"}
    assert {"score_thresh", "pooler", "box_resolution"} <= target_parameters("mrcnn.modeling.roi_heads.Res5RoIHeads")
    assert target_parameters("mrcnn.data.images.ImageLimits") == {
        "max_pixels",
        "max_aspect_ratio",
        "min_size",
        "max_size",
    }


def test_target_arguments_of_dataclasses_bases_and_kwargs_read_from_source(tmp_path, monkeypatch):
    package = tmp_path / "somepkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .things import Child\n")
    (package / "base.py").write_text(
        "class Base:\n    def __init__(self, a, *, b=1):\n        pass\n\n\nclass Plain:\n    pass\n"
    )
    (package / "things.py").write_text(
        "import dataclasses\n"
        "import typing\n"
        "from typing import ClassVar\n"
        "import somepkg.base as base_module\n"
        "from .base import Base, Plain\n\n\n"
        "class Child(Base):\n    def __init__(self, c, **kwargs):\n        super().__init__(1, **kwargs)\n\n\n"
        "class Grandchild(Child):\n    pass\n\n\n"
        "class ByModule(base_module.Base):\n    pass\n\n\n"
        "class Empty(Plain):\n    pass\n\n\n"
        "class KeepsKwargs(Base):\n    def __init__(self, c, **options):\n        self.options = options\n\n\n"
        "class Meta(Base, metaclass=type):\n    pass\n\n\n"
        "class Two(Base, Plain):\n    pass\n\n\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class Fields:\n    x: int\n    y: float = 1.0\n    z: ClassVar[int] = 3\n"
        "    w: list = dataclasses.field(default_factory=list)\n    v: int = dataclasses.field(init=False, default=0)\n"
        "\n\n@dataclasses.dataclass(init=False)\nclass OwnInit:\n    x: int\n\n\n"
        "@some_decorator\nclass Decorated:\n    pass\n\n\n"
        # Where the source's plain reading would refuse what Python takes (a reviewer's cases): unknown, or read as
        # Python reads it.
        "class Pops(Base):\n    def __init__(self, c, **kwargs):\n        self.foo = kwargs.pop('foo', None)\n"
        "        super().__init__(**kwargs)\n\n\n"
        "class New:\n    def __new__(cls, x):\n        return super().__new__(cls)\n\n\n"
        "class Cond:\n    if True:\n        def __init__(self, x):\n            pass\n\n\n"
        "class Assigned:\n    __init__ = Base.__init__\n\n\n"
        "class Twice:\n    def __init__(self, a):\n        pass\n\n\n"
        "class Twice:\n    def __init__(self, a, z):\n        pass\n\n\n"
        "class Overloaded:\n    @typing.overload\n    def __init__(self, a: int) -> None: ...\n"
        "    def __init__(self, a=None, b=None):\n        pass\n\n\n"
        "def wrapped(a):\n    pass\n\n\nwrapped = lambda a, extra=1: None\n\n\n"
        "@dataclasses.dataclass\nclass InitTrue:\n    x: int\n    y: int = dataclasses.field(default=1, init=True)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from mrcnn.engine.target_source import target_parameters

    assert target_parameters("somepkg.Child") == {"a", "b", "c"}  # re-exported; **kwargs handed to super()
    assert target_parameters("somepkg.things.Grandchild") == {"a", "b", "c"}
    assert target_parameters("somepkg.things.ByModule") == {"a", "b"}  # a base named through its module
    assert target_parameters("somepkg.things.Empty") == frozenset()  # object's __init__ takes nothing
    assert target_parameters("somepkg.things.Fields") == {"x", "y", "w"}
    assert target_parameters("somepkg.things.Twice") == {"a", "z"}  # the definitions Python keeps: the last
    assert target_parameters("somepkg.things.Overloaded") == {"a", "b"}
    assert target_parameters("somepkg.things.InitTrue") == {"x", "y"}
    for unknown in ("KeepsKwargs", "Meta", "Two", "OwnInit", "Decorated", "Pops", "New", "Cond", "Assigned", "wrapped"):
        assert target_parameters(f"somepkg.things.{unknown}") is None, unknown
