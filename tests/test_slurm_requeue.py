"""A SLURM job stopped before its time limit requeues itself, and its next start continues its run.

The whole cycle through ``run.py`` (SIGUSR2, the save, the requeue, the second start without ``resume=``) is
``tests/e2e/test_resume.py::test_signalled_run_saves_its_step_exits_nonzero_and_resumes_with_the_same_batches``.
"""

import logging
import signal
from pathlib import Path

import pytest

from mrcnn.engine.callbacks import TrainingInterrupted
from mrcnn.engine.config_checks import checkpoint_path
from mrcnn.engine.train import requeue, says_how_it_continues
from tests.helpers.config import compose_config
from tests.helpers.runs import fake_scontrol

SLURM_ENV = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT", "SLURM_PROCID")


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A SLURM job's environment (job 77) with a stand-in ``scontrol``; returns the file it records its calls in."""
    for name in SLURM_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    calls = tmp_path / "scontrol.txt"
    monkeypatch.setenv("PATH", str(fake_scontrol(tmp_path, calls)))
    return calls


def stop(signum=signal.SIGUSR2, step=5, start_step=2) -> TrainingInterrupted:
    return TrainingInterrupted(signum, Path("run/checkpoints/last.ckpt"), step, start_step)


def test_sigusr2_requeues_the_job_from_its_first_process(slurm, monkeypatch):
    cfg = compose_config()
    assert cfg.slurm_requeue is True  # the default
    assert requeue(cfg, stop()) == "77"
    # A task of a job array is requeued by its array name.
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue(cfg, stop()) == "70_3"
    assert slurm.read_text() == "requeue 77\nrequeue 70_3\n"


def test_no_requeue_without_sigusr2_slurm_progress_or_the_switch(slurm, monkeypatch, caplog):
    cfg = compose_config()
    # Ctrl-C, and the SIGTERM of scancel (a preempted job is requeued by SLURM itself).
    assert requeue(cfg, stop(signal.SIGINT)) is None
    assert requeue(cfg, stop(signal.SIGTERM)) is None
    assert requeue(compose_config(["slurm_requeue=false"]), stop()) is None
    # A job that trained no step since it started would stop the same way at every start.
    with caplog.at_level(logging.WARNING):
        assert requeue(cfg, stop(step=2, start_step=2)) is None
    assert "not requeued: the job trained no step after step 2, where it started" in caplog.text
    # The job's other processes (SLURM's tasks; Lightning's children) leave it to the first.
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert requeue(cfg, stop()) is None
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert requeue(cfg, stop()) is None
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("SLURM_JOB_ID")  # not a SLURM job
    assert requeue(cfg, stop()) is None
    assert not slurm.exists()


def test_a_failed_requeue_says_why_and_the_job_waits_for_resume(tmp_path, slurm, monkeypatch, caplog):
    cfg = compose_config(run_dir=str(tmp_path / "run"))
    monkeypatch.setenv("PATH", str(fake_scontrol(tmp_path, slurm, exit_code=1)))
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingInterrupted), says_how_it_continues(cfg):
        raise stop()
    assert "scontrol requeue 77 failed (exit 1): scontrol: error: Requeue of job is disabled" in caplog.text
    assert f"Continue with: python run.py <the same overrides> resume={tmp_path / 'run'}" in caplog.text
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-folder"))  # no scontrol on the node
    caplog.clear()
    assert requeue(cfg, stop()) is None
    assert "scontrol requeue 77 failed: [Errno 2] No such file or directory" in caplog.text
    # Requeued: the log says so instead of how to resume.
    monkeypatch.setenv("PATH", str(fake_scontrol(tmp_path, slurm)))
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(TrainingInterrupted), says_how_it_continues(cfg):
        raise stop()
    assert "SLURM requeued job 77: it continues from there when it starts again" in caplog.text
    assert "Continue with" not in caplog.text


def test_a_requeued_training_job_continues_from_its_own_folders_last_checkpoint(tmp_path, slurm, monkeypatch):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    elsewhere = tmp_path / "before" / "checkpoints" / "last.ckpt"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.touch()

    def start(*overrides):
        return checkpoint_path(compose_config(list(overrides), run_dir=str(run)))

    # The first start: what the command names.
    assert start() is None
    assert start(f"resume={elsewhere.parents[1]}") == str(elsewhere)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    # Requeued before its first save: as its first start.
    assert start() is None
    assert start(f"ckpt_path={elsewhere}") == str(elsewhere)
    # Requeued after a save: its own last.ckpt, over the file the command started from (the run went on from it).
    last.parent.mkdir(parents=True)
    last.touch()
    assert start() == start(f"ckpt_path={elsewhere}") == start(f"resume={elsewhere.parents[1]}") == str(last)
    # Evaluating or predicting writes a job's own record: it takes what the command names.
    assert start("mode=evaluate", f"ckpt_path={elsewhere}") == str(elsewhere)
    # Not requeued: the folder's last.ckpt is another run's, and the first start is refused there (test_run_dir).
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert start() is None
