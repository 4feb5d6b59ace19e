"""Bad numbers in a config stop a run before anything is built, with a message that names the key."""

import os
import subprocess
import sys

import pytest
import torch

import mrcnn.config
from mrcnn.engine.config_checks import check_config, config_problems
from tests.helpers.config import ROOT, compose_config
from tests.helpers.runs import run_py


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["data=coco", "data.root=/coco"],
        ["trainer=ddp"],
        ["trainer=ddp_cpu", "trainer.num_nodes=2"],
        ["data=cityscapes", "data.root=/cs"],
        ["trainer.max_epochs=-1", "trainer.max_steps=100"],
        ["seed=null"],
        ["trainer.val_check_interval=0.5", "trainer.limit_val_batches=10", "checkpoint_every_n_steps=50"],
        # 0 switches validation off (Lightning's way); devices as a list of indices (a ListConfig).
        ["trainer.limit_val_batches=0", "trainer.devices=[0,1]"],
        # What the README offers: SyncBatchNorm in the backbone and the mask head, deterministic with warnings.
        ["model.norm=syncbn", "model.head_norm=syncbn"],
        ["model.norm=bn", "model.head_norm=bn"],
        ["trainer.deterministic=warn"],
        ["trainer.deterministic=true"],
    ],
)
def test_shipped_configs_and_good_values_pass(overrides):
    assert config_problems(compose_config(overrides)) == []


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.datamodule.batch_size=-2", "data.datamodule.batch_size=-2: must be a positive integer"),
        ("data.datamodule.batch_size=0", "data.datamodule.batch_size=0: must be a positive integer"),
        ("data.datamodule.batch_size=2.5", "data.datamodule.batch_size=2.5: must be a positive integer"),
        ("+data.datamodule.val_batch_size=0", "data.datamodule.val_batch_size=0: must be a positive integer, or null"),
        ("data.datamodule.num_workers=-1", "data.datamodule.num_workers=-1: must be an integer >= 0"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0: must be a positive integer"),
        ("trainer.max_epochs=-3", "trainer.max_epochs=-3: must be a positive integer"),
        ("trainer.max_epochs=-1", "trainer.max_epochs=-1: no epoch limit needs a positive trainer.max_steps"),
        ("trainer.max_steps=0", "trainer.max_steps=0: must be a positive integer, or -1 for no step limit"),
        ("trainer.max_steps=-5", "trainer.max_steps=-5: must be a positive integer, or -1 for no step limit"),
        ("trainer.devices=0", "trainer.devices=0: must be a positive integer"),
        ("trainer.num_nodes=0", "trainer.num_nodes=0: must be a positive integer"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be a positive integer"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: must be a positive integer"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0: must be a positive integer, or null"),
        ("trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5: must be a number of batches"),
        ("trainer.limit_train_batches=-1", "trainer.limit_train_batches=-1: must be a number of batches"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: must be a number >= 0, or null"),
        ("checkpoint_every_n_steps=0", "checkpoint_every_n_steps=0: must be a positive integer, or null"),
        ("base_lr=-0.02", "base_lr=-0.02: must be a positive number"),
        ("base_lr=0", "base_lr=0: must be a positive number"),
        ("module.base_batch_size=0", "module.base_batch_size=0: must be a positive integer"),
        ("data.num_train_images=0", "data.num_train_images=0: must be a positive integer"),
        ("data.image_size=7", "data.image_size=7: must be an integer >= 14 (shapes are 8 px or more)"),
        # Settings that pass their own rule and fail once the run has started (a helper's trial found each).
        ("trainer.precision=16-true", "trainer.precision=16-true: torchvision's nms has no CPU kernel for half"),
        ("trainer.precision=bf16-true", "trainer.precision=bf16-true: torchvision's nms has no CPU kernel for half"),
        ("trainer.strategy=ddp_spawn", "trainer.strategy=ddp_spawn: this project starts DDP processes as commands"),
        ("scheduler.warmup_steps=-1", "scheduler.warmup_steps=-1: must be an integer >= 0"),
        ("optimizer.weight_decay=-1e-4", "optimizer.weight_decay=-0.0001: must be a number >= 0"),
        ("trainer.deterministic=yes", "trainer.deterministic=yes: must be true, false or 'warn', or null"),
        ("model.head_norm=frozen_bn", "model.head_norm=frozen_bn: must be one of 'gn', 'bn', 'syncbn', or null"),
    ],
)
def test_a_bad_value_is_named_with_what_it_must_be(override, message):
    with pytest.raises(ValueError, match="invalid config values") as error:
        check_config(compose_config([override]))
    assert message in str(error.value)


def test_every_bad_value_is_listed_at_once():
    problems = config_problems(
        compose_config(["data.datamodule.batch_size=-2", "trainer.max_epochs=0", "data.datamodule.num_workers=-1"])
    )
    assert [p.split("=")[0] for p in problems] == [
        "data.datamodule.batch_size",
        "data.datamodule.num_workers",
        "trainer.max_epochs",
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        # An environment variable not set, or a key not there: named at the key that reads it, once (the keys
        # that repeat data.min_size, such as model.net.min_size, are not named again).
        (
            "data.min_size=${oc.env:MRCNN_TEST_UNSET}",
            "data.min_size=${oc.env:MRCNN_TEST_UNSET}: cannot be resolved (KeyError raised while resolving "
            "interpolation: \"Environment variable 'MRCNN_TEST_UNSET' not found\")",
        ),
        ("data.min_size=${data.min_sise}", "data.min_size=${data.min_sise}: cannot be resolved (there is no key"),
        ("logger.csv.name=${nope}", "logger.csv.name=${nope}: cannot be resolved (there is no key nope)"),
        # A value made at the key (here from the environment) is checked by the key's rule. oc.env gives a string,
        # which the data pipeline would take letter by letter.
        (
            "data.min_size=${oc.env:MRCNN_TEST_SIZE}",
            "data.min_size=${oc.env:MRCNN_TEST_SIZE}, which is '64': must be a positive integer or a non-empty list "
            "of them (a string, as oc.env gives: data.min_size='${oc.decode:${oc.env:MRCNN_TEST_SIZE}}' reads it",
        ),
        (
            "data.datamodule.batch_size=${oc.env:MRCNN_TEST_WORD}",
            "data.datamodule.batch_size=${oc.env:MRCNN_TEST_WORD}, which is 'eight': must be a positive integer",
        ),
        ("data.datamodule.batch_size=x${seed}", "data.datamodule.batch_size=x${seed}, which is 'x0': must be a"),
        # Another key's value is checked by this key's rule too.
        (
            "data.datamodule.batch_size=${data.classes}",
            "data.datamodule.batch_size=${data.classes}, which is ['circle', 'triangle', 'square', 'ring', "
            "'crescent', 'star']: must be a positive integer",
        ),
    ],
)
def test_a_value_that_an_interpolation_gives_is_checked_at_its_key(monkeypatch, override, message):
    monkeypatch.delenv("MRCNN_TEST_UNSET", raising=False)
    monkeypatch.setenv("MRCNN_TEST_SIZE", "64")
    monkeypatch.setenv("MRCNN_TEST_WORD", "eight")
    problems = config_problems(compose_config([override]))
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_interpolations_that_cannot_resolve_anywhere_in_the_config_are_named_not_raised(monkeypatch):
    monkeypatch.delenv("MRCNN_TEST_UNSET", raising=False)
    unset = (
        "cannot be resolved (KeyError raised while resolving interpolation: \"Environment variable 'MRCNN_TEST_UNSET'"
    )
    # In a list, and in the keys the combination checks read (the trainer's, the length of training, the model's).
    for override in (
        "data.classes=[circle,${oc.env:MRCNN_TEST_UNSET}]",
        "trainer.strategy=${oc.env:MRCNN_TEST_UNSET}",
        "trainer.max_steps=${oc.env:MRCNN_TEST_UNSET}",
        "model.anchor_sizes=${oc.env:MRCNN_TEST_UNSET}",
    ):
        problems = config_problems(compose_config([override]))
        key = override.split("=")[0]
        assert len(problems) == 1 and problems[0].startswith(f"{key}=") and unset in problems[0], problems
    # A job that runs on another machine (a SLURM sweep checked where it is submitted) reads that machine's
    # environment: not checked here.
    cfg = compose_config(["logger.csv.name=${oc.env:MRCNN_TEST_UNSET}", "data.min_size=${oc.env:MRCNN_TEST_UNSET}"])
    assert config_problems(cfg, on_this_machine=False) == []
    assert len(config_problems(cfg)) == 2
    # Composed outside a Hydra job (a notebook): the keys that read the run's folder (${hydra:...}, through run_dir)
    # cannot resolve, and are no mistake.
    assert config_problems(mrcnn.config.compose_config([])) == []


@pytest.mark.parametrize(
    "override",
    [
        "data.min_size='${oc.decode:${oc.env:MRCNN_TEST_SIZE}}'",
        "data.datamodule.batch_size=${module.base_batch_size}",
        "logger.csv.name=run_${seed}",
    ],
)
def test_an_interpolation_that_gives_a_good_value_passes(monkeypatch, override):
    monkeypatch.setenv("MRCNN_TEST_SIZE", "64")
    assert config_problems(compose_config([override])) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model/backbone=fpn", "model/roi_heads=res5"],
            "model/roi_heads=res5 does not go with the resnet_fpn backbone",
        ),
        (["model/backbone=c5", "model/roi_heads=res5"], "model/roi_heads=res5 does not go with the resnet_c5 backbone"),
        (["model/backbone=c4", "model/roi_heads=standard"], "model/roi_heads=standard does not go with the resnet_c4"),
        (["model.anchor_sizes=[8,16,32]"], "FPN's RPN has 5 maps (P2-P6), one anchor size each: give 5 sizes"),
    ],
)
def test_switches_that_do_not_go_together_stop_before_a_shape_mismatch_deep_in_torch(overrides, message):
    # Each value passes its own rule; together they built a model whose first step failed (a shape mismatch).
    with pytest.raises(ValueError, match="invalid config values") as error:
        check_config(compose_config(overrides))
    assert message in str(error.value)
    # The pairs each backbone picks itself, and any number of anchor sizes on one map.
    for good in (["model/backbone=c4"], ["model/backbone=c5"], ["model/backbone=c4", "model.anchor_sizes=[8,16,32]"]):
        assert config_problems(compose_config(good)) == []


def test_resnet_152_builds_as_the_schema_says():
    from hydra.utils import instantiate

    for backbone in ("fpn", "c4"):
        cfg = compose_config(["model=tiny", "model.depth=152", "model.width=8", f"model/backbone={backbone}"])
        assert config_problems(cfg) == []
        net = instantiate(cfg.model.net)
        blocks = sum(1 for m in net.modules() if type(m).__name__ == "Bottleneck")
        assert blocks == 3 + 8 + 36 + 3, backbone  # res2-res5 (C4: res5 in the box head)


def test_a_validation_schedule_that_leaves_out_the_last_epochs_is_said():
    from mrcnn.engine.config_checks import validation_schedule_note

    assert validation_schedule_note(compose_config([])) is None  # 5 epochs, validated every 5
    note = validation_schedule_note(compose_config(["trainer.max_epochs=12"]))
    assert (
        "the last validation while training is at epoch 10, so the best checkpoint is chosen without epochs 11-12"
        in note
    )
    note = validation_schedule_note(compose_config(["trainer.max_epochs=3"]))
    assert "never validates while training, so no best checkpoint is written" in note
    assert (
        validation_schedule_note(compose_config(["trainer.max_epochs=12", "trainer.check_val_every_n_epoch=4"])) is None
    )
    assert validation_schedule_note(compose_config(["trainer.max_epochs=3", "trainer.max_steps=10"])) is None


def test_a_target_that_names_nothing_is_named_before_anything_is_built():
    from mrcnn.engine.target_source import target_problem

    # In this package: the module's source is read (not imported), with the name or module meant. (The typos are
    # made from the real names: tests/test_doc_names.py checks every name written out.)
    pooler = "mrcnn.modeling.poolers.RoIAlignPooler"
    assert target_problem(pooler.replace("Pooler", "Poolr")) == (
        f"mrcnn/modeling/poolers.py defines no RoIAlignPoolr (did you mean {pooler}?)"
    )
    typo = pooler.replace("poolers", "poolr")
    assert target_problem(typo) == f"no module {typo.rpartition('.')[0]} (did you mean mrcnn.modeling.poolers?)"
    typo = pooler.replace("modeling", "modelling")
    assert target_problem(typo) == f"no module {typo.split('.poolers')[0]} (did you mean mrcnn.modeling?)"
    # What the module defines, imports or assigns, and attributes of a class, pass.
    for good in (
        "mrcnn.modeling.poolers.RoIAlignPooler",
        "mrcnn.lit_module.warmup_multistep_schedule",
        "mrcnn.modeling.roi_heads.RoIHeads.forward",
        "mrcnn.engine.config_checks.SCHEMA",
        "mrcnn.engine.config_checks.Path",
    ):
        assert target_problem(good) is None, good
    assert target_problem("mrcnn.modeling") is None  # a module itself: Hydra says what it makes of it
    # Elsewhere: only whether the top-level package is there (installed, or on PYTHONPATH).
    assert target_problem("lightning.Trainer") is None and target_problem("torch.optim.Nope") is None
    assert "no module named 'my_extension' here: install it, or add its folder to PYTHONPATH" in target_problem(
        "my_extension.poolers.CentrePooler"
    )
    # Through run.py, before torch loads: tests/e2e/test_run.py. A path through a module that imports torch reads
    # its source only, in a new process without torch:
    code = (
        "import sys; from mrcnn.engine.target_source import target_problem; "
        "print(target_problem('mrcnn.data.datamodule.InstanceDataModule.setup'), 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split() == ["None", "False"]


def test_a_modules_names_are_read_from_its_source_or_not_at_all_where_it_cannot_tell(tmp_path):
    from mrcnn.engine.target_source import _top_level_names

    def names(source: str):
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.py"
        path.write_text(source)
        return _top_level_names(str(path), path.stat().st_mtime)

    assert names(
        "import os.path\nfrom a import b as c\nX, (Y, Z) = 1, (2, 3)\nif X:\n    def f(): pass\nelse:\n"
        "    class K: pass\ntry:\n    from d import e\nexcept ImportError:\n    e = None\n"
    ) == {"os", "c", "X", "Y", "Z", "f", "K", "e"}
    assert names("from a import *\n") is None
    assert names("def __getattr__(name): ...\n") is None


def test_run_py_stops_on_a_negative_batch_size_naming_the_key(tmp_path):
    # Before the check, this ended in torch's "Invalid learning rate: -0.0025" (the lr scales with the batch).
    result = run_py(
        ["data.datamodule.batch_size=-2", "trainer.max_epochs=0", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert result.returncode != 0
    assert "data.datamodule.batch_size=-2: must be a positive integer" in result.stderr
    assert "trainer.max_epochs=0: must be a positive integer" in result.stderr
    assert "Invalid learning rate" not in result.stderr


@pytest.mark.parametrize("trainer", ["trainer=gpu", "trainer=ddp", "setting=gpu"])
def test_a_gpu_trainer_without_a_gpu_says_so_and_how_to_train_on_the_cpu(monkeypatch, trainer):
    cfg = compose_config([trainer])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError) as error:
        check_config(cfg)
    assert "trainer.accelerator=gpu (trainer=gpu or trainer=ddp; setting=gpu and setting=paper choose them) needs" in (
        str(error.value)
    )
    assert "Leave trainer= and setting= out to train on the CPU" in str(error.value)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    check_config(cfg)  # Apple's GPU: Lightning's "gpu" takes it
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_config(cfg)  # with one, nothing to say


def test_a_job_that_runs_on_another_machine_has_only_its_values_checked(monkeypatch):
    # A SLURM sweep is checked on the machine that submits it: its data and GPUs are the cluster's.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = compose_config(["trainer=ddp", "data=coco", "data.root=/cluster/scratch/coco"])
    with pytest.raises(FileNotFoundError, match="data.root=/cluster/scratch/coco: no such folder"):
        check_config(cfg)
    check_config(cfg, on_this_machine=False)
    cfg.data.datamodule.batch_size = -2
    with pytest.raises(ValueError, match="data.datamodule.batch_size=-2: must be a positive integer"):
        check_config(cfg, on_this_machine=False)


@pytest.mark.parametrize("value, sets", [("true", True), ("warn", True), ("false", False), ("null", False)])
def test_deterministic_runs_set_cublas_before_cuda_starts(monkeypatch, value, sets):
    from mrcnn.engine.train import prepare_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    prepare_determinism(compose_config([f"trainer.deterministic={value}"]))
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") is sets


def test_ddp_on_the_cpu_with_devices_left_to_lightning_is_named():
    # Lightning's "auto" on the CPU is one process (a helper's trial: "process 0 of 1", no word of it).
    problems = config_problems(compose_config(["trainer=ddp_cpu", "trainer.devices=auto"]))
    assert problems == [
        "trainer.devices=auto: on the CPU Lightning takes it for one process, and DDP would have nothing to share: "
        "give the number of processes (trainer=ddp_cpu trainer.devices=<n>)"
    ]
    assert config_problems(compose_config(["trainer=ddp_cpu", "trainer.devices=3"])) == []
    assert config_problems(compose_config(["trainer.devices=auto"])) == []  # one process asked for: one process


def test_a_folder_where_a_file_belongs_is_said_to_be_one(tmp_path):
    # data.train_json=train/ (the images' folder for the json) said "COCO json not found"; each path setting that
    # reads a file says it was given a folder, and what it needs, before anything is built.
    from mrcnn.data.resolvers import coco_classes
    from tests.helpers.data import make_coco_split

    train_json, images = make_coco_split(tmp_path / "mine", split="train")
    data = [
        "data=coco_format",
        f"data.train_images={images}",
        f"data.val_json={train_json}",
        f"data.val_images={images}",
    ]
    cases = [
        (
            [f"data.train_json={images}"],
            f"data.datamodule.train_dataset.ann_file={images} (${{data.train_json}}) is a folder; it must be a COCO "
            "json file",
        ),
        (
            [f"data.train_json={train_json}", f"data.val_json={images}"],
            f"data.datamodule.val_dataset.ann_file={images} (${{data.val_json}}) is a folder",
        ),
        (
            [f"data.train_json={train_json}", f"data.train_images={train_json}"],
            f"data.datamodule.train_dataset.image_dir={train_json} (${{data.train_images}}) is a file; it must be a "
            "folder",
        ),
        ([f"data.train_json={train_json}", f"weights={images}"], f"weights={images} is a folder; it must be a file"),
        (
            [f"data.train_json={train_json}", "model=mask_rcnn", f"model.backbone_weights={images}"],
            f"model.backbone_weights={images} is a folder; it must be a file: an ImageNet ResNet-50 state dict",
        ),
        ([f"data.train_json={train_json}", f"ckpt_path={images}"], f"ckpt_path file {images} is a folder"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError if "ckpt_path" in message else FileNotFoundError) as error:
            check_config(compose_config([*data, *overrides]))
        assert message in str(error.value), overrides
    with pytest.raises(IsADirectoryError, match=r"COCO json .* is a folder; give the json file"):
        coco_classes(str(images))
