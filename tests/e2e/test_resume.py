"""A training run killed mid-epoch (SIGKILL) resumes from its last checkpoint and finishes as planned.

The resumed run goes on with the same global step, optimizer, lr schedule and data order: the batches
after the resume are those the uninterrupted run saw at the same steps.
"""

import contextlib
import csv
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mrcnn.data.datamodule import InstanceDataModule, init_worker
from mrcnn.data.samplers import EPOCH_ORDER
from mrcnn.engine import job_processes
from mrcnn.engine.callbacks import LastCheckpoint, TrainingInterrupted
from mrcnn.engine.config_checks import checkpoint_path
from mrcnn.engine.train import stops_with_nonzero_exit
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.data import IdsDataset
from tests.helpers.runs import fake_scontrol, run_process, training_only_trainer

ROOT = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 6  # 12 images, 2 per batch
EPOCHS = 2
ARGS = [
    *TINY_MODEL,
    "data.num_train_images=12",
    "data.num_val_images=2",
    "data.datamodule.batch_size=2",
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.check_val_every_n_epoch={EPOCHS}",
    "trainer.log_every_n_steps=1",
    "checkpoint_every_n_steps=4",
]


def recording_overrides(tmp_path: Path, path: Path) -> list[str]:
    """Overrides that run the default callbacks plus :class:`RecordTrainBatches` writing to ``path``."""
    return [
        "+callbacks.record_batches._target_=tests.helpers.runs.RecordTrainBatches",
        f"+callbacks.record_batches.path={path}",
    ]


def read_records(path: Path) -> list[tuple[int, list[int]]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


def planned_batches(overrides: list[str]) -> list[list[int]]:
    """Image ids of every training batch of an uninterrupted run, by global step (what its loader serves)."""
    cfg = compose_config(overrides)
    datamodule = instantiate(cfg.data.datamodule)
    datamodule.seed = cfg.seed  # what seed_everything(cfg.seed) gives the run
    loader = datamodule.train_dataloader()
    batches = []
    for epoch in range(cfg.trainer.max_epochs):
        _set_sampler_epoch(loader, epoch)  # as Lightning does at each epoch start
        batches += [[int(t["image_id"]) for t in targets] for _, targets in loader]
    return batches


def test_killed_run_resumes_mid_epoch_with_the_same_step_optimizer_schedule_and_data_order(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    records = tmp_path / "batches.jsonl"
    command = [sys.executable, "run.py", *ARGS, *recording_overrides(tmp_path, records), f"hydra.run.dir={run_dir}"]
    # Killed (SIGKILL, nothing saved on the way out) as step 6 starts: after the first step checkpoint (step 4,
    # mid-epoch), before the epoch's end would save another. The run kills itself, so the moment is the same on
    # any machine; a kill from here could come late on a busy one.
    kill = [
        "+callbacks.kill._target_=tests.helpers.runs.InterruptAt",
        "+callbacks.kill.step=6",
        "+callbacks.kill.signum=9",
    ]
    killed_run = run_process([*command, *kill], cwd=ROOT, timeout=300)
    assert killed_run.returncode == -signal.SIGKILL, killed_run.stderr[-3000:]
    killed = torch.load(last, map_location="cpu", weights_only=False)
    killed_at = killed["global_step"]
    assert killed_at == 4  # the step checkpoint before the kill; mid-epoch
    # The checkpoint holds the training loader's position: the epoch and the batches taken from it (in the
    # fit loop's state, and in the datamodule's, which gets it to the loader despite Lightning issue 20550).
    position = {
        "epoch": killed_at // STEPS_PER_EPOCH,
        "batches": killed_at % STEPS_PER_EPOCH,
        "seed": 0,
        "order": EPOCH_ORDER,
    }
    assert killed["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [position]
    assert killed["InstanceDataModule"] == {"train_loader": position}
    killed_records = read_records(records)

    result = run_process([*command, f"resume={run_dir}"], cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Restored all states from the checkpoint" in output
    assert "dataloader is not resumable" not in output

    # Both runs served the planned order of an uninterrupted run: the killed one up to its end, the
    # resumed one from the checkpoint's step on (not the first batches of the epoch again).
    planned = planned_batches(ARGS)
    assert killed_records == [(step, planned[step]) for step in range(len(killed_records))]
    assert len(killed_records) >= killed_at
    resumed_records = read_records(records)[len(killed_records) :]
    assert resumed_records == [(step, planned[step]) for step in range(killed_at, len(planned))]

    total = STEPS_PER_EPOCH * EPOCHS
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == total
    assert checkpoint["epoch"] == EPOCHS - 1
    # The lr schedule went on from the killed run's step and SGD kept its momentum buffers.
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == total
    assert (
        checkpoint["optimizer_states"][0]["state"]
        and "momentum_buffer" in checkpoint["optimizer_states"][0]["state"][0]
    )
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == total
    # metrics.csv holds the whole history, each step once: the killed run's rows up to its checkpoint (written
    # at every logged step; the row of the step in progress at the kill may be lost), then the resumed run's.
    steps = train_loss_steps(run_dir)
    assert steps == sorted(set(steps)) and set(range(killed_at - 1)) | set(range(killed_at, total)) <= set(steps)
    assert max(steps) == total - 1
    # The best checkpoint by mask AP is of the last step (the only validation): last.ckpt is the same file.
    [best] = (run_dir / "checkpoints").glob("epoch*.ckpt")
    assert os.path.samefile(best, last)


def train_loss_steps(run_dir: Path) -> list[int]:
    """The steps of the ``train/loss`` rows of a run's ``csv/metrics.csv``, in file order."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]


# Validated only at the end (epoch 2), so a stop in epoch 0 or 1 waits for no validation.
SIGNAL_ARGS = [arg for arg in ARGS if not arg.startswith("checkpoint_every_n_steps")]


@pytest.mark.parametrize(
    "signum",
    # SIGTERM through run.py is slow (a run and its resume in new processes); the default suite has it in process
    # (test_signal_saves_the_step_reached_...) and through DDP processes (test_sigterm_to_rank_zero_...).
    # SIGUSR2 in a SLURM job: SLURM's notice before the time limit. The job asks SLURM to requeue it (a stand-in
    # scontrol records the call), and SLURM's second start of the same command continues from last.ckpt. Slow too:
    # the default suite requeues through DDP processes (test_sigusr2_in_a_ddp_slurm_job_...) and continues a
    # requeued job in process (tests/test_slurm_requeue.py).
    [
        signal.SIGINT,
        pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
        pytest.param(signal.SIGUSR2, marks=pytest.mark.slow),
    ],
    ids=["SIGINT", "SIGTERM", "SIGUSR2-SLURM-requeue"],
)
def test_signalled_run_saves_its_step_exits_nonzero_and_resumes_with_the_same_batches(tmp_path, signum):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    records = tmp_path / "batches.jsonl"
    env, scontrol_calls = dict(os.environ), tmp_path / "scontrol.txt"
    if signum == signal.SIGUSR2:
        env.update(SLURM_JOB_ID="4242", PATH=f"{fake_scontrol(tmp_path, scontrol_calls)}{os.pathsep}{env['PATH']}")
    # With loader workers: a terminal's Ctrl-C and SLURM's SIGTERM reach them too.
    command = [
        sys.executable,
        "run.py",
        *SIGNAL_ARGS,
        "data.datamodule.num_workers=2",
        *recording_overrides(tmp_path, records),
        f"hydra.run.dir={run_dir}",
    ]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        # Its own process group, so that the signal goes to all its processes and to nothing else.
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
        )
        try:
            # Signal it as soon as its first training batch has started, as Ctrl-C or a cluster would.
            deadline = time.monotonic() + 240
            while (
                not (records.exists() and records.read_text())
                and process.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            os.killpg(process.pid, signum)
            process.wait(timeout=240)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 128 + signum, (tmp_path / "stderr.txt").read_text()[-3000:]
    if signum == signal.SIGUSR2:
        assert scontrol_calls.read_text() == "requeue 4242\n"
        assert (
            "SLURM requeued job 4242: it continues from there when it starts again" in (run_dir / "run.log").read_text()
        )
    else:
        assert not scontrol_calls.exists()
        # How to go on: the run's own command, continued in its folder.
        overrides = " ".join(shlex.quote(arg) for arg in command[2:-1])  # without hydra.run.dir
        continued = f"python run.py {overrides} resume={run_dir} hydra.run.dir={run_dir}"
        assert f"Continue with: {continued}\n" in (run_dir / "run.log").read_text()
    # It finished the step in progress and saved last.ckpt there, with the loader's position.
    stopped_records = read_records(records)
    stopped_at = len(stopped_records)
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == stopped_at
    position = checkpoint["InstanceDataModule"]["train_loader"]
    assert position["epoch"] * STEPS_PER_EPOCH + position["batches"] == stopped_at

    if signum == signal.SIGINT:
        # Resumed without the run's overrides (the default 2000 images, ...): stops, naming what differs, each
        # change once (not again under module.model, which repeats model.net), and the command to use instead. The
        # folder's record still says how the run was trained.
        record = {path.name: path.read_bytes() for path in (run_dir / ".hydra").glob("*.yaml")}
        result = run_process(
            [sys.executable, "run.py", f"resume={run_dir}", f"hydra.run.dir={run_dir}"], cwd=ROOT, timeout=120
        )
        assert result.returncode != 0
        assert (
            "data.num_train_images: 12 -> 2000" in result.stderr and "resume_allow_config_change=true" in result.stderr
        )
        assert f"\n  {continued}\n" in result.stderr and "module.model." not in result.stderr
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert {path.name: path.read_bytes() for path in (run_dir / ".hydra").glob("*.yaml")} == record

    if signum == signal.SIGUSR2:
        # SLURM starts the requeued job with the same command: no resume=, and SLURM_RESTART_COUNT set.
        env["SLURM_RESTART_COUNT"] = "1"
    else:
        command = [*command, f"resume={run_dir}"]
    result = run_process(command, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exists and is not empty" not in result.stderr  # Lightning's warning: these checkpoints are the run's own
    if signum == signal.SIGUSR2:
        assert f"SLURM requeued this job: it continues from {last}" in (run_dir / "run.log").read_text()
    planned = planned_batches(ARGS)
    assert stopped_records == [(step, planned[step]) for step in range(stopped_at)]
    assert read_records(records)[stopped_at:] == [(step, planned[step]) for step in range(stopped_at, len(planned))]
    total = STEPS_PER_EPOCH * EPOCHS
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == total
    # metrics.csv holds every step once: the stopped run's rows, then the resumed run's.
    assert train_loss_steps(run_dir) == list(range(total))

    if signum == signal.SIGINT:
        # Resumed once more, with nothing left to train: the results of its final validation stand, not logged again.
        history, results = (run_dir / "csv" / "metrics.csv").read_text(), (run_dir / "metrics.json").read_text()
        result = run_process(command, cwd=ROOT, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (
            f"the run had finished at step {total} ({run_dir / 'metrics.json'}): nothing is left to train"
            in (run_dir / "run.log").read_text()
        )
        assert (run_dir / "csv" / "metrics.csv").read_text() == history
        assert (run_dir / "metrics.json").read_text() == results
        assert "COCO-style AP on the validation split" in result.stdout


# ---- the same with a Trainer in this process: every kind of training loader, epoch 1 ------------


class _Interrupt(Exception):
    pass


class _RecordingModule(L.LightningModule):
    """Records the image ids of every training batch by global step; raises at global step ``stop_at``.

    With ``schedule`` its lr schedule reads ``trainer.estimated_stepping_batches`` (as the project's
    does), which makes Lightning build the training loader before it restores the checkpoint's loops.
    """

    def __init__(self, stop_at=None, schedule=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.stop_at = stop_at
        self.schedule = schedule
        self.seen = {}

    def training_step(self, batch, batch_idx):
        if self.global_step == self.stop_at:
            raise _Interrupt
        self.seen[self.global_step] = [t["image_id"] for t in batch[1]]
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if not self.schedule:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit(folder, module, grouping, num_workers, ckpt_path=None):
    """2 epochs of 6 batches of 2 images, last.ckpt every 4 steps and at epoch ends."""
    datamodule = InstanceDataModule(
        IdsDataset(12), IdsDataset(2), batch_size=2, num_workers=num_workers, aspect_ratio_grouping=grouping, seed=3
    )
    trainer = training_only_trainer(devices=1, max_epochs=2, callbacks=[LastCheckpoint(folder, every_n_train_steps=4)])
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize(
    "grouping,num_workers,stop_at,schedule",
    [
        (False, 0, 9, False),
        (False, 2, 9, False),
        (True, 0, 9, False),
        (True, 2, 9, False),
        (False, 2, 7, False),
        (False, 0, 9, True),
        (True, 2, 9, True),
    ],
    ids=[
        "plain",
        "plain-workers",
        "grouped",
        "grouped-workers",
        "epoch-end-workers",
        "plain-schedule",
        "grouped-workers-schedule",
    ],
)
def test_resumed_fit_sees_the_batches_the_uninterrupted_fit_saw(tmp_path, grouping, num_workers, stop_at, schedule):
    expected = _fit(tmp_path / "uninterrupted", _RecordingModule(schedule=schedule), grouping, num_workers=0)
    assert sorted(expected) == list(range(12)) and expected[0] != expected[6]

    interrupted = _RecordingModule(stop_at, schedule)
    with pytest.raises(_Interrupt):
        _fit(tmp_path / "run", interrupted, grouping, num_workers)
    assert interrupted.seen == {step: expected[step] for step in range(stop_at)}
    last = tmp_path / "run" / "last.ckpt"
    # stop_at 9: saved at step 8, mid-epoch 1 (batch 2 of 6); stop_at 7: saved at the end of epoch 0.
    saved_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert saved_at == stop_at - 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit(tmp_path / "run", _RecordingModule(schedule=schedule), grouping, num_workers, ckpt_path=last)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert resumed == {step: ids for step, ids in expected.items() if step >= saved_at}


# ---- stopped by SIGINT / SIGTERM: last.ckpt at the step reached, the same batches and validations after it ------


class _SignallingModule(_RecordingModule):
    """A :class:`_RecordingModule` (with the lr schedule) that validates and can signal itself.

    In the training step of global step ``signal_at`` rank zero sends its own process ``signum``, as a
    cluster or a Ctrl-C would; with ``to_job``, every process of its process group (the job's processes, their
    loader workers and fork servers), as SLURM and a terminal's Ctrl-C do. Every validation logs ``score`` (the global
    step: each one is the best so far) and is recorded in ``validated_at``.
    """

    def __init__(self, stop_at=None, signal_at=None, signum=signal.SIGTERM, to_job=False):
        super().__init__(stop_at=stop_at, schedule=True)
        self.signal_at, self.signum, self.to_job = signal_at, signum, to_job
        self.validated_at = []

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_at and self.global_rank == 0:
            if self.to_job:
                os.killpg(os.getpgrp(), self.signum)
            else:
                os.kill(os.getpid(), self.signum)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.validated_at.append(self.global_step)
        self.log("score", float(self.global_step))


def _fit_validated(folder, module, ckpt_path=None):
    """2 epochs of 6 batches, validated at each epoch end; the best checkpoint by ``score`` and last.ckpt."""
    datamodule = InstanceDataModule(IdsDataset(12), IdsDataset(2), batch_size=2, seed=3)
    best = ModelCheckpoint(dirpath=folder, filename="best-{step}", monitor="score", mode="max", save_top_k=1)
    # Validation and checkpointing on: the best checkpoint needs both.
    trainer = training_only_trainer(
        devices=1,
        max_epochs=2,
        enable_checkpointing=True,
        limit_val_batches=None,
        callbacks=[best, LastCheckpoint(folder)],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module


# SIGUSR2: what SLURM sends 120 s before a job's time limit under the SLURM launcher (submitit).
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR2], ids=["SIGINT", "SIGTERM", "SIGUSR2"]
)
@pytest.mark.parametrize("signal_at", [3, 5, 8], ids=["mid-epoch", "last-batch-of-epoch", "after-a-best-checkpoint"])
def test_signal_saves_the_step_reached_and_the_resumed_fit_sees_the_same_batches(tmp_path, signum, signal_at):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    expected = _fit_validated(tmp_path / "uninterrupted", _SignallingModule())
    assert expected.validated_at == [6, 12]

    interrupted = _SignallingModule(signal_at=signal_at, signum=signum)
    # A DDP child of this job, as Lightning's launcher lists it for its observer thread.
    child = SimpleNamespace(pid=1, poll=lambda: None)
    launcher = SimpleNamespace(procs=[child])
    job_processes.forget()
    job_processes.track(SimpleNamespace(strategy=SimpleNamespace(launcher=launcher)))
    try:
        with pytest.raises(TrainingInterrupted) as stop:
            _fit_validated(tmp_path / "run", interrupted)
        # The observer no longer watches it (it would take its exit with 128 + the signal for a failure and kill
        # this process while it finishes the stop); the job still does, to wait for it.
        assert launcher.procs == [] and job_processes.tracked_processes() == [(1, child)]
    finally:
        job_processes.forget()
    assert stop.value.code == 128 + signum  # the process's exit status: 130 / 143 / 140
    # The step in progress finished, and training stopped after it; the signal handlers are the test's again.
    assert interrupted.seen == {step: expected.seen[step] for step in range(signal_at + 1)}
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    last = tmp_path / "run" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == signal_at + 1
    if signal_at == 8:
        # last.ckpt was a hard link to the best checkpoint of step 6, then saved anew at step 9: the best one is intact.
        assert (
            torch.load(tmp_path / "run" / "best-step=6.ckpt", map_location="cpu", weights_only=False)["global_step"]
            == 6
        )

    resumed = _fit_validated(tmp_path / "run", _SignallingModule(), ckpt_path=last)
    assert resumed.seen == {step: ids for step, ids in expected.seen.items() if step > signal_at}
    # Every validation of the uninterrupted run happened once, before or after the stop.
    assert sorted(interrupted.validated_at + resumed.validated_at) == expected.validated_at


def test_loader_workers_ignore_stop_signals_and_are_seeded_as_lightning_seeds_them(monkeypatch):
    monkeypatch.setenv("PL_SEED_WORKERS", "1")

    def worker_state(init):
        torch.manual_seed(5)  # the loader draws its workers' base seed from the main process's generator
        loader = torch.utils.data.DataLoader(_WorkerState(), num_workers=1, worker_init_fn=init, batch_size=None)
        return next(iter(loader))

    ignored, seed = worker_state(functools.partial(init_worker, rank=1))
    assert ignored  # SIGINT, SIGTERM and SIGUSR2: the main process saves last.ckpt, the workers end with it
    assert seed == worker_state(functools.partial(pl_worker_init_function, rank=1))[1]


class _WorkerState(torch.utils.data.Dataset):
    """One item: whether this process ignores SIGINT, SIGTERM and SIGUSR2, and its torch seed."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        handlers = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)]
        return handlers == [signal.SIG_IGN] * 3, torch.initial_seed()


def test_lightnings_own_sigterm_stop_outside_the_training_loop_exits_nonzero():
    # Lightning stops a validation (sanity check, final validation, mode=evaluate) on SIGTERM with a SystemExit
    # that has no code: the process would exit 0 as if the job had finished.
    with pytest.raises(SystemExit) as stop, stops_with_nonzero_exit(compose_config([])):
        raise SIGTERMException
    assert stop.value.code == 128 + signal.SIGTERM


def test_a_second_ctrl_c_exits_130_not_lightnings_1():
    # Lightning handles the KeyboardInterrupt a second Ctrl-C raises with sys.exit(1), as if the run had failed.
    with pytest.raises(SystemExit) as stop, stops_with_nonzero_exit(compose_config([])):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)
    assert stop.value.code == 128 + signal.SIGINT
    with pytest.raises(SystemExit) as stop, stops_with_nonzero_exit(compose_config([])):
        sys.exit(1)  # any other exit keeps its code
    assert stop.value.code == 1


def test_a_ctrl_c_outside_the_training_loop_exits_130_without_a_traceback_and_says_how_to_go_on(
    tmp_path, monkeypatch, caplog
):
    # Ctrl-C while the data and the model are built raised KeyboardInterrupt through Hydra: a 90-line traceback.
    # In the final validation (Lightning's sys.exit(1)) the run said nothing of its own. Each now says what was
    # saved and, where the run has a last.ckpt, the command that continues it.
    monkeypatch.setattr("mrcnn.engine.train.job_overrides", lambda: ["seed=3"])
    cfg = compose_config([], run_dir=str(tmp_path))
    with pytest.raises(SystemExit) as stop, stops_with_nonzero_exit(cfg):
        raise KeyboardInterrupt
    assert stop.value.code == 128 + signal.SIGINT and stop.value.__cause__ is None
    assert caplog.messages[-1] == "stopped by SIGINT; nothing was saved now."
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    with pytest.raises(SystemExit) as stop, stops_with_nonzero_exit(cfg):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)
    assert stop.value.code == 128 + signal.SIGINT
    assert caplog.messages[-1] == (
        f"stopped by SIGINT; nothing was saved now. Continue from {tmp_path}/checkpoints/last.ckpt with: python "
        f"run.py seed=3 resume={tmp_path} hydra.run.dir={tmp_path}"
    )


def test_a_stop_before_a_run_from_an_earlier_checkpoint_saved_says_to_start_there_again(tmp_path, monkeypatch, caplog):
    # ckpt_path= names an earlier checkpoint of the run's own folder, whose last.ckpt holds a later state. Stopped
    # before it saved anything, the run goes on from where it started; resume= would take that later state.
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    earlier, last = folder / "epoch1-step8.ckpt", folder / "last.ckpt"
    earlier.touch()
    last.touch()
    os.utime(last, (time.time() - 60, time.time() - 60))  # written by the run before this job
    monkeypatch.setattr("mrcnn.engine.train.job_overrides", lambda: ["seed=3", f"ckpt_path={earlier}"])
    cfg = compose_config([f"ckpt_path={earlier}"], run_dir=str(tmp_path))
    with pytest.raises(SystemExit), stops_with_nonzero_exit(cfg):
        raise KeyboardInterrupt
    assert caplog.messages[-1] == (
        f"stopped by SIGINT; nothing was saved now. The run saved no checkpoint: start it again from {earlier} with: "
        f"python run.py seed=3 ckpt_path={earlier} hydra.run.dir={tmp_path}"
    )
    # Once this job has saved last.ckpt, resume= continues from it.
    with pytest.raises(SystemExit), stops_with_nonzero_exit(cfg):
        last.touch()
        raise KeyboardInterrupt
    assert caplog.messages[-1].endswith(
        f"Continue from {last} with: python run.py seed=3 resume={tmp_path} hydra.run.dir={tmp_path}"
    )
    # As when the run started from its last.ckpt itself.
    os.utime(last, (time.time() - 60, time.time() - 60))
    with (
        pytest.raises(SystemExit),
        stops_with_nonzero_exit(compose_config([f"ckpt_path={last}"], run_dir=str(tmp_path))),
    ):
        raise KeyboardInterrupt
    assert caplog.messages[-1].endswith(
        f"Continue from {last} with: python run.py seed=3 resume={tmp_path} hydra.run.dir={tmp_path}"
    )


def test_last_checkpoint_is_a_hard_link_to_a_best_checkpoint_of_its_step_and_resumes(tmp_path):
    expected = _fit_validated(tmp_path / "uninterrupted", _SignallingModule())
    last, best = tmp_path / "uninterrupted" / "last.ckpt", tmp_path / "uninterrupted" / "best-step=12.ckpt"
    assert os.path.samefile(last, best) and os.stat(last).st_nlink == 2
    assert sorted(p.name for p in (tmp_path / "uninterrupted").iterdir()) == ["best-step=12.ckpt", "last.ckpt"]

    # Killed in epoch 1: last.ckpt is the best checkpoint of step 6 (saved after its validation), and resumes.
    killed = _SignallingModule(stop_at=8)
    with pytest.raises(_Interrupt):
        _fit_validated(tmp_path / "run", killed)
    assert os.path.samefile(tmp_path / "run" / "last.ckpt", tmp_path / "run" / "best-step=6.ckpt")
    resumed = _fit_validated(tmp_path / "run", _SignallingModule(), ckpt_path=tmp_path / "run" / "last.ckpt")
    assert resumed.seen == {step: ids for step, ids in expected.seen.items() if step >= 6}
    assert sorted(killed.validated_at + resumed.validated_at) == expected.validated_at


# Lightning's ddp strategy re-runs this script (sys.argv) for rank 1: one fit per process.
DDP_SCRIPT = """
import json, os, sys
import lightning as L
sys.path.insert(0, {root!r})
from mrcnn.engine import job_processes
from mrcnn.engine.callbacks import LastCheckpoint
from mrcnn.data.datamodule import InstanceDataModule
from tests.helpers.data import IdsDataset
from tests.e2e.test_resume import _SignallingModule


def fit():
    folder, ckpt_path = sys.argv[1], sys.argv[2] or None
    module = _SignallingModule(
        stop_at=int(sys.argv[3]) or None, signal_at=int(sys.argv[4]) or None, signum={signum}, to_job={to_job}
    )
    datamodule = InstanceDataModule(IdsDataset(26), IdsDataset(2), batch_size=2, num_workers={num_workers},
                                    aspect_ratio_grouping={grouping}, seed=3)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, max_epochs=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[LastCheckpoint(folder, every_n_train_steps=4, slurm_requeue={requeue})])
    # As build.py does: a stop then takes rank 1 out of Lightning's observer, which would take its exit (128 + the
    # signal) for a failure and SIGKILL this process while it finishes its own stop.
    job_processes.track(trainer)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        # Written whole, for the test to read: rank 0's process does not wait for rank 1's.
        path = f"{{folder}}/rank{{trainer.global_rank}}.json"
        with open(path + ".part", "w") as file:
            json.dump(module.seen, file)
        os.replace(path + ".part", path)


# The loader workers of a DDP process start from a fork server, which imports this script: only run as a script.
if __name__ == "__main__":
    fit()
"""


def ddp_script(path: Path, grouping=False, num_workers=0, signum=signal.SIGTERM, requeue=False, to_job=False) -> Path:
    """:data:`DDP_SCRIPT` written to ``path``."""
    path.write_text(
        DDP_SCRIPT.format(
            root=str(ROOT),
            grouping=grouping,
            num_workers=num_workers,
            signum=int(signum),
            requeue=requeue,
            to_job=to_job,
        )
    )
    return path


def _ddp_fit(script, folder, ckpt_path="", stop_at=0, signal_at=0, env=None):
    """Runs ``script`` (:data:`DDP_SCRIPT`, 2 processes); rank zero's exit code and each rank's batches by step."""
    folder.mkdir(exist_ok=True)
    paths = [folder / f"rank{rank}.json" for rank in range(2)]
    for path in paths:
        path.unlink(missing_ok=True)
    result = run_process(
        [sys.executable, str(script), str(folder), str(ckpt_path), str(stop_at), str(signal_at)],
        cwd=script.parent,
        timeout=300,
        env=env,
    )
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in paths) and time.monotonic() < deadline:
        time.sleep(0.1)
    return result.returncode, [{int(step): ids for step, ids in json.loads(path.read_text()).items()} for path in paths]


@pytest.mark.slow  # the default suite resumes each rank's shard in the SIGTERM test below (with loader workers)
@pytest.mark.parametrize(
    "grouping,num_workers",
    # Grouped batches resume part-way in one process in the default suite (test above).
    [(False, 2), (True, 0)],
    ids=["plain-workers", "grouped"],
)
def test_resumed_ddp_fit_continues_each_ranks_shard(tmp_path, grouping, num_workers):
    script = ddp_script(tmp_path / "fit.py", grouping, num_workers)

    def fit(folder, ckpt_path="", stop_at=0):
        return _ddp_fit(script, folder, ckpt_path, stop_at)[1]

    expected = fit(tmp_path / "uninterrupted")
    assert expected[0] != expected[1] and sorted(expected[0]) == sorted(expected[1]) == list(range(len(expected[0])))
    # Interrupted on both ranks at step 9: resumes from last.ckpt of step 8, in epoch 1.
    interrupted = fit(tmp_path / "run", stop_at=9)
    assert interrupted == [{step: ids[step] for step in range(9)} for ids in expected]
    resumed = fit(tmp_path / "run", ckpt_path=tmp_path / "run" / "last.ckpt")
    assert resumed == [{step: seen for step, seen in ids.items() if step >= 8} for ids in expected]


def test_sigterm_to_rank_zero_stops_every_ddp_process_at_its_step_and_resumes(tmp_path):
    # With loader workers: each rank's loader resumes at its own position in its shard.
    script = ddp_script(tmp_path / "fit.py", num_workers=2)
    _, expected = _ddp_fit(script, tmp_path / "uninterrupted")
    # Rank zero alone gets SIGTERM in step 8 (mid-epoch 1, between the every-4-steps checkpoints): both
    # processes finish step 8, last.ckpt is saved at step 9, and the job exits with 143.
    returncode, stopped = _ddp_fit(script, tmp_path / "run", signal_at=8)
    assert returncode == 128 + signal.SIGTERM
    assert stopped == [{step: ids[step] for step in range(9)} for ids in expected]
    assert torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 9
    returncode, resumed = _ddp_fit(script, tmp_path / "run", ckpt_path=tmp_path / "run" / "last.ckpt")
    assert returncode == 0
    assert resumed == [{step: seen for step, seen in ids.items() if step >= 9} for ids in expected]


@pytest.mark.slow  # the default suite: the fork server's signals (tests/data/test_datamodule.py), the stop above
def test_sigterm_to_every_process_of_a_ddp_job_stops_it_at_its_step(tmp_path):
    # SIGTERM to every process of the job, as SLURM sends it (and SIGUSR2 before a time limit): the loader workers
    # and the fork servers they start from ignore it, and the job stops as a SIGTERM to rank zero alone stops it.
    script = ddp_script(tmp_path / "fit_job.py", num_workers=2, to_job=True)
    returncode, stopped = _ddp_fit(script, tmp_path / "job", signal_at=8)
    assert returncode == 128 + signal.SIGTERM
    assert [sorted(seen) for seen in stopped] == [list(range(9))] * 2  # both processes stopped after step 8
    assert torch.load(tmp_path / "job" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 9


def test_sigusr2_in_a_ddp_slurm_job_is_requeued_once_while_every_process_waits(tmp_path):
    # The first process asks SLURM to requeue the job, the other waits for it at a barrier, and the SIGTERM SLURM
    # sends the job's processes when it requeues it (here from the stand-in scontrol) changes nothing.
    calls = tmp_path / "scontrol.txt"
    folder = fake_scontrol(tmp_path, calls, terminate_caller=True)
    env = dict(
        os.environ, SLURM_JOB_ID="4242", SUBMITIT_EXECUTOR="slurm", PATH=f"{folder}{os.pathsep}{os.environ['PATH']}"
    )
    script = ddp_script(tmp_path / "fit.py", signum=signal.SIGUSR2, requeue=True)
    returncode, stopped = _ddp_fit(script, tmp_path / "run", signal_at=8, env=env)
    assert returncode == 128 + signal.SIGUSR2
    assert [sorted(seen) for seen in stopped] == [list(range(9))] * 2  # both processes stopped after step 8
    assert torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 9
    assert calls.read_text() == "requeue 4242\n"


def test_resume_needs_a_run_folder_with_a_last_checkpoint(tmp_path):
    # The error says what is missing and why it may be.
    with pytest.raises(FileNotFoundError, match="is none"):
        checkpoint_path(compose_config([f"resume={tmp_path / 'no-such-run'}"]))
    with pytest.raises(FileNotFoundError, match="checkpoints/last.ckpt. It is not the folder of a run"):
        checkpoint_path(compose_config([f"resume={tmp_path}"]))
    (tmp_path / ".hydra").mkdir()
    with pytest.raises(FileNotFoundError, match="stopped before it saved its first checkpoint.*without resume="):
        checkpoint_path(compose_config([f"resume={tmp_path}"]))
    (tmp_path / "checkpoints").mkdir()
    for name in ("epoch10-step66.ckpt", "epoch9-step60.ckpt"):  # the newest by its step, not by its name as text
        (tmp_path / "checkpoints" / name).touch()
    with pytest.raises(FileNotFoundError, match=r"newest checkpoint: ckpt_path=\S*epoch10-step66.ckpt"):
        checkpoint_path(compose_config([f"resume={tmp_path}"]))
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    assert checkpoint_path(compose_config([f"resume={tmp_path}"])) == str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="not both"):
        checkpoint_path(compose_config([f"resume={tmp_path}", "ckpt_path=x.ckpt"]))
