"""The checks of a sweep's jobs before the first one starts (mrcnn/engine/command_checks.py); tests/e2e/test_run.py
runs them through run.py."""

import copy

import pytest
from omegaconf import open_dict

from mrcnn.config import task_overrides
from mrcnn.engine.command_checks import check_command, failures_message, runs_here
from tests.helpers.config import compose_config


def test_only_launchers_that_run_jobs_here_count_as_local():
    cfg = compose_config(return_hydra_config=True)
    assert runs_here(cfg.hydra.launcher)  # Hydra's basic launcher: one job after another, here
    assert runs_here({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"})
    assert not runs_here({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"})
    assert not runs_here(None)


def test_a_mistake_is_said_once_under_the_jobs_it_stops():
    message = failures_message(
        {
            "ValueError: invalid config values:\n  data.min_size=-5: must be a positive integer": ["#1 a", "#3 b"],
            "FileNotFoundError: missing input": ["#2 c"],
        },
        jobs=4,
    )
    assert message.splitlines() == [
        "3 of the sweep's 4 jobs would fail, so none was started:",
        "  #1 a, #3 b:",
        "    ValueError: invalid config values:",
        "      data.min_size=-5: must be a positive integer",
        "  #2 c:",
        "    FileNotFoundError: missing input",
    ]
    assert failures_message({"ValueError: bad": ["#0 x", "#1 y"]}, jobs=2).splitlines()[1] == "  every job:"


def test_overrides_that_hold_interpolations_are_read_as_written(monkeypatch):
    # Read item by item, hydra.overrides.task resolves each override: ${oc.env:...} of a variable not set raised
    # while the checks looked for added keys, before any check could name the key.
    monkeypatch.delenv("MRCNN_TEST_UNSET", raising=False)
    monkeypatch.setenv("MRCNN_TEST_NAME", "resolved")
    overrides = ["data.min_size=${oc.env:MRCNN_TEST_UNSET}", "logger.csv.name=${oc.env:MRCNN_TEST_NAME}"]
    cfg = compose_config(overrides, return_hydra_config=True)
    assert task_overrides(cfg.hydra)[-2:] == overrides  # (after the tests' run_dir=)
    job = copy.deepcopy(cfg)
    with open_dict(job):
        del job["hydra"]
    with pytest.raises(ValueError) as error:
        check_command(job, cfg.hydra)
    assert str(error.value).splitlines()[1:] == [
        "  data.min_size=${oc.env:MRCNN_TEST_UNSET}: cannot be resolved (KeyError raised while resolving interpolation:"
        " \"Environment variable 'MRCNN_TEST_UNSET' not found\")"
    ]
