"""logger=wandb: offline without credentials (never a prompt), and what an offline run records."""

import csv
import json
import os

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from mrcnn.engine.loggers import wandb_mode, wandb_settings
from mrcnn.modeling.mask_rcnn import LOSS_KEYS
from tests.helpers.config import compose_config
from tests.helpers.runs import TINY_RUN, run_py
from tests.helpers.wandb import read_wandb_records

W_AND_B_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    for key in W_AND_B_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    # No settings file of this machine's user or folder (`wandb offline`, `wandb login --host`) counts either.
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "netrc"


def test_mode_is_offline_without_credentials_and_online_with_them(no_credentials, monkeypatch):
    assert wandb_mode() == "offline"
    no_credentials.write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    assert wandb_mode() == "online"
    no_credentials.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_mode_follows_wandbs_own_settings_files_and_self_hosted_servers(no_credentials, tmp_path, monkeypatch):
    key = "0" * 40

    def login(machine):
        no_credentials.write_text(f"machine {machine}\n  login user\n  password {key}\n")

    # wandb 0.31 names its cloud api.forge.coreweave.com in netrc.
    login("api.forge.coreweave.com")
    assert wandb_mode() == "online"
    # A self-hosted server: wandb writes its host with the port.
    login("localhost:8080")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_BASE_URL", "http://localhost:8080")
    assert wandb_mode() == "online"
    monkeypatch.delenv("WANDB_BASE_URL")
    # ... or its address only in the settings `wandb login --host` writes.
    (tmp_path / "wandb_config").mkdir()
    (tmp_path / "wandb_config" / "settings").write_text("[default]\nbase_url = http://localhost:8080\n")
    assert wandb_mode() == "online"
    # `wandb offline` (the workspace's settings) and `wandb disabled` win over credentials.
    monkeypatch.setenv("WANDB_API_KEY", key)
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    assert wandb_mode() == "offline"
    (tmp_path / "wandb_config" / "settings").write_text("[default]\nmode = disabled\n")
    (tmp_path / "wandb" / "settings").unlink()
    assert wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode() == "online"


def test_offline_run_has_losses_ap_config_names_and_prediction_images(tmp_path, no_credentials):
    env = {k: v for k, v in os.environ.items() if k not in W_AND_B_ENV}
    # No WANDB_MODE: offline must follow from the missing credentials; stdin closed: a prompt would fail.
    env.update(NETRC=str(no_credentials), WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    run_py(
        [
            *TINY_RUN,
            "logger=wandb",
            "experiment_name=smoke",
            "base_lr=0.015",
            "data.num_train_images=8",
            "data.num_val_images=2",
            "data.datamodule.batch_size=4",
            "callbacks.prediction_overlays.score_threshold=0.0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        env=env,
    )

    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = read_wandb_records(next(runs[0].glob("*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds.count("run") == 1 and "exit" in kinds

    run = records[kinds.index("run")].run
    # The resolved config was given at init, so the offline run has it.
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["depth"] == 18 and config["base_lr"] == 0.015 and config["run_dir"] == str(tmp_path / "run")
    assert run.run_group == "smoke"
    assert "model=tiny" in run.display_name and "model=tiny" in run.tags

    logged = {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    for loss in LOSS_KEYS:
        assert f"train/{loss}" in logged and f"val/{loss}" in logged
    for key in ("train/loss", "val/loss", "val/segm_AP", "val/segm_AP50", "val/bbox_AP", "lr", "train/images_per_sec"):
        assert key in logged, key
    assert "val/predictions/all_masks" in logged and "val/predictions/all_boxes" in logged
    # The prediction images sit at the step of the validation's AP; the lr is logged once a step, by the module
    # (a LearningRateMonitor beside it wrote a second row a step).
    steps = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
            for key in ("val/segm_AP", "val/predictions", "lr"):
                if any(k == key or k.startswith(key + "/") for k in items):
                    steps.setdefault(key, []).append(json.loads(items["trainer/global_step"]))
    assert steps["val/predictions"] == steps["val/segm_AP"], steps
    assert len(steps["lr"]) == len(set(steps["lr"])) and not any(k.startswith("lr-") for k in logged), logged

    media = runs[0] / "files" / "media"
    images = [str(p.relative_to(media)) for p in media.rglob("*.png")]
    assert any(p.startswith("images/val/predictions") for p in images), images
    assert any(p.startswith("images/val/overlays") for p in images), images
    assert any(p.startswith("images/mask/val/predictions") for p in images), images  # the label maps


def test_a_resumed_run_continues_the_wandb_run_it_resumes_under_its_labels(monkeypatch):
    # The resumed run's id, and its name, group and tags (this job's overrides hold resume=...), where the logger
    # config leaves them null; a W&B run that never reached the server is continued online with them.
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config(["logger=wandb"])
    logger = cfg.logger.wandb
    labels = {"name": "model/pooler=roi_pool", "group": "ablation_roialign", "tags": ["model/pooler=roi_pool"]}
    settings = wandb_settings(logger, cfg, resumed_id="abc123", resumed_labels=labels)
    assert settings["id"] == "abc123" and {k: settings[k] for k in labels} == labels
    assert settings["config"]["seed"] == cfg.seed  # the whole resolved config
    # A name the logger config gives is kept.
    named = OmegaConf.merge(logger, {"name": "mine"})
    assert "name" not in wandb_settings(named, cfg, resumed_id="abc123", resumed_labels=labels)
    assert "id" not in wandb_settings(logger, cfg)


def test_the_variant_and_tags_name_the_overrides_as_written(monkeypatch):
    # Hydra's override_dirname joins the overrides as written; read as a config value it resolved them (an
    # environment variable not set would fail the run's logger).
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MRCNN_TEST_PROJECT", "resolved")
    overrides = ["logger=wandb", "logger.wandb.project=${oc.env:MRCNN_TEST_PROJECT}"]
    cfg = compose_config(overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        settings = wandb_settings(cfg.logger.wandb, compose_config(overrides))
    finally:
        HydraConfig.instance().cfg = None
    assert settings["name"].startswith("logger.wandb.project=${oc.env:MRCNN_TEST_PROJECT},logger=wandb")
    assert settings["tags"][-2:] == overrides  # (after the tests' run_dir=)


# Slow (about 20 s): a run and its resume through run.py. The default suite resumes the CSV history in process
# (tests/test_loggers.py), checks the W&B settings of a resumed run above, and runs W&B offline through run.py.
@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run_and_its_csv_history(tmp_path, no_credentials):
    env = {k: v for k, v in os.environ.items() if k not in W_AND_B_ENV}
    env.update(NETRC=str(no_credentials), WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    run_dir = tmp_path / "run"
    args = [
        *TINY_RUN,
        "logger=wandb",
        "data.num_train_images=8",
        "data.num_val_images=2",
        "data.datamodule.batch_size=4",
        "callbacks.prediction_overlays.num_images=0",
        f"hydra.run.dir={run_dir}",
    ]
    run_py(args, env=env)  # 1 epoch of 2 steps
    # Trained on for one more epoch (the length of training may change on resume), into the same folder.
    run_py([*args, f"resume={run_dir}", "trainer.max_epochs=2"], env=env)

    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # W&B writes each offline session to its own folder...
    records = [read_wandb_records(next(folder.glob("*.wandb"))) for folder in runs]
    [first, second] = [[r.run for r in rs if r.WhichOneof("record_type") == "run"][0] for rs in records]
    assert first.run_id and second.run_id == first.run_id  # ... of the same W&B run, which the second one resumes
    # Under the first session's labels (from the checkpoint), not the resuming job's: given again, so that a run
    # continued online whose first session never reached the server is labelled too.
    assert first.display_name and first.tags
    assert (second.display_name, list(second.tags), second.run_group) == (
        first.display_name,
        list(first.tags),
        first.run_group,
    )
    assert all(folder.name.endswith(f"-{first.run_id}") for folder in runs)
    steps = [
        {
            json.loads(i.value_json)
            for r in rs
            if r.WhichOneof("record_type") == "history"
            for i in r.history.item
            if (i.key or "/".join(i.nested_key)) == "trainer/global_step"
        }
        for rs in records
    ]
    assert min(steps[1]) >= 2  # the second session logged the steps after the first one's

    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows if row.get("train/loss")] == [0, 1, 2, 3]
    assert sum(1 for row in rows if row.get("val/segm_AP")) == 2  # both epochs' validations
