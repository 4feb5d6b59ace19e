"""A resumed run checks its config against the one recorded in the checkpoint, and reads what the checkpoint says."""

import logging

import pytest
import torch
from omegaconf import OmegaConf

from mrcnn.engine.checkpoints import RUN_RECORD_KEY, check_resume_config, config_changes, read_resumed_run
from mrcnn.errors import CommandError
from tests.helpers.config import TINY_MODEL, compose_config

# What marks a file as a Lightning checkpoint (read_resumed_run refuses a plain state dict).
LIGHTNING = {"pytorch-lightning_version": "2.6.6"}
TINY = [*TINY_MODEL, "data.num_train_images=12", "data.datamodule.batch_size=2", "trainer.max_epochs=2"]


def saved_run(tmp_path, overrides=TINY, run_dir=None, wandb_run_id=None):
    """A checkpoint file as a run with ``overrides`` saves it (``mrcnn.engine.callbacks.RunRecord``'s record, no tensors)."""
    run_dir = run_dir or tmp_path / "run"
    config = OmegaConf.to_container(compose_config(overrides, run_dir=str(run_dir)), resolve=True)
    path = run_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    record = {"config": config, "overrides": list(overrides), "wandb_run_id": wandb_run_id}
    torch.save({"global_step": 7, "state_dict": {"w": torch.zeros(2)}, RUN_RECORD_KEY: record, **LIGHTNING}, path)
    return read_resumed_run(path)


def test_the_checkpoint_tells_the_step_config_overrides_and_wandb_run(tmp_path):
    resumed = saved_run(tmp_path, wandb_run_id="abc123")
    assert resumed.global_step == 7 and resumed.wandb_run_id == "abc123" and resumed.overrides == TINY
    assert resumed.run_dir == tmp_path / "run" and resumed.config["data"]["datamodule"]["batch_size"] == 2


@pytest.mark.parametrize(
    "changes",
    [
        [],
        ["trainer.max_epochs=5"],
        ["++trainer.max_steps=100"],
        ["data.datamodule.num_workers=2", "logger=wandb"],
        ["checkpoint_every_n_steps=10", "trainer.log_every_n_steps=1", "callbacks.throughput.window=5"],
        ["module.compile=true", "trainer.check_val_every_n_epoch=1", "experiment_name=x"],
        ["model.frozen_bn_keeps_dtype=true"],
    ],
    ids=["same", "longer", "max-steps", "workers-logger", "logging", "speed-validation", "frozen-bn-dtype"],
)
def test_the_length_of_training_and_runtime_keys_may_change(tmp_path, changes):
    resumed = saved_run(tmp_path)
    # Resumed into a new folder: the paths inside each run's own folder differ, but not what they are.
    cfg = compose_config([*TINY, *changes, f"resume={tmp_path / 'run'}"], run_dir=str(tmp_path / "resumed"))
    check_resume_config(cfg, resumed)
    assert config_changes(resumed.config, OmegaConf.to_container(cfg, resolve=True), resumed.run_dir, cfg.run_dir) == []


def test_a_run_saved_before_a_speed_switch_existed_resumes(tmp_path):
    # model.frozen_bn_keeps_dtype came later: a checkpoint's config without it resumes (the default changes nothing).
    resumed = saved_run(tmp_path)
    for node in (resumed.config["model"], resumed.config["model"]["net"], resumed.config["module"]["model"]):
        del node["frozen_bn_keeps_dtype"]
    cfg = compose_config([*TINY, f"resume={tmp_path / 'run'}"], run_dir=str(tmp_path / "resumed"))
    check_resume_config(cfg, resumed)


def test_resuming_without_the_runs_overrides_stops_and_lists_what_differs(tmp_path):
    # The issue: resume=<tiny run> without its overrides silently trained 250-step epochs of the default model.
    resumed = saved_run(tmp_path)
    cfg = compose_config([f"resume={tmp_path / 'run'}"], run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError) as error:
        check_resume_config(cfg, resumed)
    message = str(error.value)
    assert message.startswith(f"resume={tmp_path / 'run'}: the config differs")
    for line in (
        "data.num_train_images: 12 -> 2000",
        "data.datamodule.batch_size: 2 -> 8",
        "data.image_size: 64 -> 128",
        "model.fpn_channels: 16 -> ",
    ):
        assert line in message, line
    assert "trainer.max_epochs: " not in message  # the length of training may change
    # The command to use instead: the run's overrides, in its folder.
    assert f"\n  python run.py {' '.join(TINY)} resume={tmp_path / 'run'} hydra.run.dir={tmp_path / 'run'}\n" in message
    # Each change once, where it is written: not again at keys that repeat it through an interpolation.
    assert "module.model." not in message and "model.net.rpn.in_channels" not in message
    assert "resume_allow_config_change=true" in message


def test_a_changed_batch_size_is_refused_unless_allowed(tmp_path, caplog):
    resumed = saved_run(tmp_path)
    cfg = compose_config(
        [*TINY, "data.datamodule.batch_size=4", f"resume={tmp_path / 'run'}"], run_dir=str(tmp_path / "run")
    )
    with pytest.raises(ValueError, match=r"in:\n  data.datamodule.batch_size: 2 -> 4\n"):
        check_resume_config(cfg, resumed)
    allowed = compose_config(
        [*TINY, "data.datamodule.batch_size=4", "resume_allow_config_change=true"], run_dir=str(tmp_path / "run")
    )
    with caplog.at_level(logging.WARNING, logger="mrcnn.engine.checkpoints"):
        check_resume_config(allowed, resumed)
    assert "data.datamodule.batch_size: 2 -> 4" in caplog.text


def test_a_run_saved_before_the_batched_switches_existed_resumes_unless_they_are_turned_on(tmp_path):
    # model.batched_sampling and model.batched_proposals came later; their default builds what the older run built
    # (MaskRCNN's RPN and RoI heads' default arguments), so only turning one on is a change.
    resumed = saved_run(tmp_path)
    net_nodes = (resumed.config["model"]["net"], resumed.config["module"]["model"])
    for net in net_nodes:
        for node, keys in (
            (net["rpn"], ("batched_proposals", "batched_sampling")),
            (net["roi_heads"], ("batched_sampling",)),
        ):
            for key in keys:
                del node[key]
    for key in ("batched_proposals", "batched_sampling"):
        del resumed.config["model"][key]
    cfg = compose_config([*TINY, f"resume={tmp_path / 'run'}"], run_dir=str(tmp_path / "resumed"))
    check_resume_config(cfg, resumed)

    switched = compose_config(
        [*TINY, "model.batched_sampling=true", f"resume={tmp_path / 'run'}"], run_dir=str(tmp_path / "resumed")
    )
    with pytest.raises(ValueError) as error:
        check_resume_config(switched, resumed)
    assert "model.batched_sampling: '<absent>' -> True" in str(error.value)
    # Named where it is written, not again at the arguments that interpolate it.
    assert "model.net.rpn.batched_sampling" not in str(error.value)
    assert "model.net.roi_heads.batched_sampling" not in str(error.value)
    assert "batched_proposals" not in str(error.value)


def test_a_plain_key_that_no_target_reads_is_a_change_when_it_is_new(tmp_path):
    # Without a _target_ argument to compare with, a new key (here one nothing interpolates) is a change.
    resumed = saved_run(tmp_path)
    cfg = compose_config([*TINY, "+model.note=1"], run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"model.note: '<absent>' -> 1"):
        check_resume_config(cfg, resumed)


def test_an_added_or_removed_key_is_a_change(tmp_path):
    resumed = saved_run(tmp_path)
    cfg = compose_config([*TINY, "+model.net.roi_heads.nms_thresh=0.4"], run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="model.net.roi_heads.nms_thresh: '<absent>' -> 0.4"):
        check_resume_config(cfg, resumed)


def test_a_key_a_newer_config_writes_out_at_its_default_is_no_change():
    # shapes.yaml gained aspect_ratio_grouping: false (InstanceDataModule's default): a run recorded before resumes.
    current = OmegaConf.to_container(compose_config(TINY, run_dir="/runs/a"), resolve=True)
    older = OmegaConf.to_container(compose_config(TINY, run_dir="/runs/a"), resolve=True)
    del older["data"]["datamodule"]["aspect_ratio_grouping"]
    assert config_changes(older, current, "/runs/a", "/runs/a") == []
    # Another value than the default (batch_size 2, whose default is 4; grouping true) is a change.
    current["data"]["datamodule"]["aspect_ratio_grouping"] = True
    assert config_changes(older, current, "/runs/a", "/runs/a") == [
        "data.datamodule.aspect_ratio_grouping: '<absent>' -> True"
    ]
    del older["data"]["datamodule"]["batch_size"]
    assert "data.datamodule.batch_size: '<absent>' -> 2" in config_changes(older, current, "/runs/a", "/runs/a")


def test_a_checkpoint_without_a_record_is_resumed_unchecked(tmp_path, caplog):
    path = tmp_path / "old.ckpt"
    torch.save({"global_step": 3, "state_dict": {}, **LIGHTNING}, path)
    resumed = read_resumed_run(path)
    assert resumed.config is None and resumed.global_step == 3 and resumed.wandb_run_id is None
    with caplog.at_level(logging.WARNING, logger="mrcnn.engine.checkpoints"):
        check_resume_config(compose_config([]), resumed)
    assert "not checked" in caplog.text


def test_keys_that_leave_the_weights_alone_may_change(tmp_path):
    resumed = saved_run(tmp_path)
    cfg = compose_config(
        [*TINY, "trainer.limit_val_batches=0", "+trainer.max_time=00:01:00:00", "+data.datamodule.val_batch_size=1"],
        run_dir=str(tmp_path / "run"),
    )
    check_resume_config(cfg, resumed)  # no error


@pytest.mark.parametrize(
    "content",
    [{"model": {"w": torch.zeros(2)}}, {"w": torch.zeros(2)}, {"state_dict": {"w": torch.zeros(2)}}],
    ids=["torchvision-pth", "state-dict", "state-dict-entry"],
)
def test_a_plain_state_dict_given_to_resume_is_refused_naming_weights(tmp_path, content):
    # Mixing up weights= and ckpt_path=: a file Lightning cannot resume stops before the data and model are built.
    path = tmp_path / "model.pth"
    torch.save(content, path)
    with pytest.raises(CommandError, match=rf"ckpt_path={path} is not a Lightning checkpoint.*use weights={path}"):
        read_resumed_run(path)


def test_a_file_without_weights_given_to_resume_is_refused_without_suggesting_weights(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CommandError, match=r"is not a Lightning checkpoint .*so there is no run to resume$"):
        read_resumed_run(path)


def test_a_key_is_left_out_as_a_repeat_only_where_it_repeated_its_source_in_the_saved_config_too():
    # data.min_size reads ${data.image_size} now; the saved run had them equal (a repeat), or set apart (a change).
    unresolved = {"data": {"image_size": 800, "min_size": "${data.image_size}"}}
    new = {"data": {"image_size": 800, "min_size": 800}}
    repeated = {"data": {"image_size": 1000, "min_size": 1000}}
    assert config_changes(repeated, new, "/r", "/r", unresolved) == ["data.image_size: 1000 -> 800"]
    apart = {"data": {"image_size": 1000, "min_size": 600}}
    assert config_changes(apart, new, "/r", "/r", unresolved) == [
        "data.image_size: 1000 -> 800",
        "data.min_size: 600 -> 800",
    ]


def test_the_continue_command_reads_back_as_the_same_overrides_whatever_the_folders_name():
    # A sweep job's folder named after its overrides (hydra.sweep.subdir=${hydra.job.override_dirname}) holds = and ,.
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mrcnn.engine.checkpoints import continue_command

    for folder in ("/runs/plain", "/runs/base_lr=0.02,seed=1", "/runs/with space", '/runs/quo"te'):
        command = continue_command(["base_lr=0.02", "resume=/old", "hydra.run.dir=/old"], f"resume={folder}", folder)
        words = shlex.split(command)
        assert words[:2] == ["python", "run.py"]
        parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(words[2:])}
        assert parsed == {"base_lr": 0.02, "resume": folder, "hydra.run.dir": folder}
