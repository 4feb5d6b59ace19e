"""A SLURM job stopped before its time limit requeues itself, and its next start continues its run.

The whole cycle through ``run.py`` (SIGUSR2, the save, the requeue, the second start without ``resume=``) is
``tests/e2e/test_resume.py::test_signalled_run_saves_its_step_exits_nonzero_and_resumes_with_the_same_batches``.
"""

import logging
import re
import signal

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from mrcnn.data.datamodule import InstanceDataModule
from mrcnn.engine import launch
from mrcnn.engine.callbacks import LastCheckpoint, TrainingInterrupted
from mrcnn.engine.checkpoints import ResumedRun, check_resume_config
from mrcnn.engine.config_checks import checkpoint_path
from mrcnn.engine.launch import RunDirIsFree, requeue_after_stop
from mrcnn.engine.train import stops_with_nonzero_exit
from tests.helpers.config import compose_config
from tests.helpers.data import IdsDataset
from tests.helpers.runs import InterruptAt, fake_scontrol, training_only_trainer

SLURM_ENV = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_RESTART_COUNT",
    "SLURM_PROCID",
    "SUBMITIT_EXECUTOR",
)


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A SLURM job's environment (job 77, under the SLURM launcher) with a stand-in ``scontrol``; returns the file it
    records its calls in."""
    for name in SLURM_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    calls = tmp_path / "scontrol.txt"
    monkeypatch.setenv("PATH", str(fake_scontrol(tmp_path, calls)))
    return calls


@pytest.fixture
def hydra_job():
    """Sets the running Hydra job's config, as run.py's job has it: ``hydra_job(overrides)``."""

    def set_config(overrides):
        HydraConfig.instance().set_config(compose_config(overrides, return_hydra_config=True))

    yield set_config
    HydraConfig.instance().cfg = None


class _Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SigtermWhileStopping(L.Callback):
    """Records the SIGTERM handler while Lightning handles the stop (before its teardown restores the one it found)."""

    handler = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.handler = signal.getsignal(signal.SIGTERM)


def fit(folder, signum=signal.SIGUSR2, ckpt_path=None, stop_at=2, **last_checkpoint) -> TrainingInterrupted:
    """A fit of 4 steps signalled with ``signum`` in the step that ends at ``stop_at``; the stop it raises, with the
    SIGTERM handler while it was handled as ``sigterm_handler``."""
    datamodule = InstanceDataModule(IdsDataset(8), IdsDataset(2), batch_size=2, seed=0)
    sigterm = _SigtermWhileStopping()
    callbacks = [LastCheckpoint(str(folder), **last_checkpoint), InterruptAt(stop_at, signum), sigterm]
    trainer = training_only_trainer(
        max_epochs=1, enable_checkpointing=True, default_root_dir=folder, callbacks=callbacks
    )
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit(_Model(), datamodule=datamodule, ckpt_path=ckpt_path)
    stop.value.sigterm_handler = sigterm.handler
    return stop.value


def test_sigusr2_requeues_the_job_once_last_ckpt_is_saved(tmp_path, slurm, monkeypatch):
    stop = fit(tmp_path / "run", slurm_requeue=True)
    assert (stop.code, stop.step, stop.requeued) == (140, 2, "77")
    assert slurm.read_text() == "requeue 77\n"
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)["global_step"] == 2
    # SLURM sends the job's processes SIGTERM when it requeues the job: from then on it is ignored (Lightning's
    # handler would kill the DDP children and broadcast from inside the handler), and the job finishes its stop.
    assert stop.sigterm_handler == signal.SIG_IGN
    assert fit(tmp_path / "not-requeued").sigterm_handler not in (signal.SIG_IGN, signal.SIG_DFL)  # Lightning's
    # A task of a job array is requeued by its array name. A SIGTERM during the requeue changes nothing either.
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("PATH", str(fake_scontrol(tmp_path, slurm, terminate_caller=True)))
    stop = fit(tmp_path / "array", slurm_requeue=True)
    assert (stop.code, stop.requeued) == (140, "70_3")
    assert slurm.read_text() == "requeue 77\nrequeue 70_3\n"


def test_no_requeue_without_sigusr2_in_a_slurm_job_or_the_switch(tmp_path, slurm, monkeypatch):
    # Ctrl-C, and the SIGTERM of scancel (a preempted job is requeued by SLURM itself).
    assert fit(tmp_path / "int", signal.SIGINT, slurm_requeue=True).requeued is None
    assert fit(tmp_path / "term", signal.SIGTERM, slurm_requeue=True).requeued is None
    assert fit(tmp_path / "off", slurm_requeue=False).requeued is None
    monkeypatch.delenv("SLURM_JOB_ID")  # not a SLURM job
    assert fit(tmp_path / "no-slurm", slurm_requeue=True).requeued is None
    assert not slurm.exists()


def test_a_job_is_requeued_only_where_its_next_start_continues_its_run(slurm, monkeypatch, hydra_job, caplog):
    caplog.set_level(logging.WARNING)
    # Under the SLURM launcher each job starts again in its own folder.
    assert requeue_after_stop(trained=True) == "77"
    # A job script runs its command again: a single run in a folder it names.
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    hydra_job(["hydra.run.dir=/tmp/named-run"])
    assert requeue_after_stop(trained=True) == "77"
    # A folder named by the time would be a new one: the run would start over at every start.
    hydra_job([])
    assert requeue_after_stop(trained=True) is None
    assert "not requeued: its folder is new at each start (hydra.run.dir named by the time)" in caplog.text
    # So would a sweep of Hydra's basic launcher inside one job.
    hydra_job(["hydra.mode=MULTIRUN"])
    assert requeue_after_stop(trained=True) is None
    assert "a sweep run by Hydra's basic launcher would start again as a whole" in caplog.text
    # A start that trained nothing would stop the same way again.
    hydra_job(["hydra.run.dir=/tmp/named-run"])
    assert requeue_after_stop(trained=False) is None
    assert "it trained no step since it started" in caplog.text
    assert slurm.read_text() == "requeue 77\nrequeue 77\n"


def test_a_requeued_start_in_a_folder_new_to_it_is_not_requeued_again(tmp_path, slurm, monkeypatch, caplog):
    # A job script that names its folder by $(date), or a timed folder renamed for a run started in the same second:
    # the requeued start found no folder of its last start (no Hydra record), started over, and would again.
    caplog.set_level(logging.WARNING)
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    callback = RunDirIsFree()

    def start(folder):
        config = compose_config([f"hydra.run.dir={folder}"], return_hydra_config=True)
        callback.on_run_start(config)
        HydraConfig.instance().set_config(config)
        return requeue_after_stop(trained=True)

    try:
        assert start(tmp_path / "new-at-this-start") is None
        assert "not requeued: its folder is new at each start" in caplog.text
        # A named folder whose first start was preempted before its first save: the next start continues.
        (tmp_path / "preempted" / ".hydra").mkdir(parents=True)
        assert start(tmp_path / "preempted") == "77"
    finally:
        HydraConfig.instance().cfg = None
        launch._requeued_into_a_new_folder = False


def test_a_failed_requeue_says_why_and_the_job_waits_for_resume(tmp_path, slurm, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("PATH", str(fake_scontrol(tmp_path, slurm, exit_code=1)))
    assert requeue_after_stop(trained=True) is None
    assert "scontrol requeue 77 failed (exit 1): scontrol: error: Requeue of job is disabled" in caplog.text
    monkeypatch.setenv("PATH", str(tmp_path / "no-such-folder"))  # no scontrol on the node
    assert requeue_after_stop(trained=True) is None
    assert "scontrol requeue 77 failed: [Errno 2] No such file or directory" in caplog.text
    # The job's log says how it goes on.
    cfg = compose_config(run_dir=str(tmp_path / "run"))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        for requeued, said in ((None, f"resume={tmp_path / 'run'} hydra.run.dir="), ("77", "SLURM requeued job 77")):
            caplog.clear()
            with pytest.raises(TrainingInterrupted), stops_with_nonzero_exit(cfg):
                raise TrainingInterrupted(signal.SIGUSR2, tmp_path / "run" / "last.ckpt", 5, requeued)
            assert said in caplog.text
            # Requeued: SLURM's SIGTERM is ignored while the job finishes (its W&B run, its other processes).
            assert (signal.getsignal(signal.SIGTERM) == signal.SIG_IGN) == (requeued is not None)
    finally:
        signal.signal(signal.SIGTERM, handler)


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


def test_a_requeued_start_whose_config_files_changed_meanwhile_says_so(tmp_path, monkeypatch):
    # The same command again, but the config files were edited while the job waited: the error names the requeue.
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").touch()
    cfg = compose_config(run_dir=str(run))
    saved = OmegaConf.to_container(compose_config(["base_lr=0.08"], run_dir=str(run)), resolve=True)
    resumed = ResumedRun(checkpoint=run / "checkpoints" / "last.ckpt", global_step=3, run_dir=run, config=saved)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    message = f"SLURM requeued this job to continue from {run / 'checkpoints' / 'last.ckpt'}, but the config differs"
    with pytest.raises(ValueError, match=re.escape(message) + r"(.|\n)*base_lr: 0\.08 -> 0\.04"):
        check_resume_config(cfg, resumed)
