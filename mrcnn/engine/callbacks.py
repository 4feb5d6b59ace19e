"""Lightning callbacks: the last checkpoint (also on SIGINT / SIGTERM), the run record in checkpoints, throughput, the
sweep's cost estimate, W&B overlays."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import statistics
import threading
import time
from collections import deque
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from mrcnn.engine import job_processes
from mrcnn.engine import loggers as engine_loggers
from mrcnn.engine.checkpoints import RUN_RECORD_KEY
from mrcnn.engine.host_collectives import host_max, host_process_group
from mrcnn.engine.launch import outlive_the_requeue_sigterm, requeue_after_stop, slurm_job_id
from mrcnn.engine.sweep_cost import estimate_line, sweep_position
from mrcnn.engine.visualize import (
    draw_instances,
    select,
    semantic_label_map,
    to_uint8,
    wandb_boxes,
    wandb_class_labels,
)

log = logging.getLogger(__name__)

# What stops a training run gracefully: Ctrl-C, and what a cluster sends before it preempts or times out a job.
# SIGUSR2: what the SLURM launcher (submitit) asks SLURM to send 120 s (signal_delay_s) before a job's time limit;
# its own handler would requeue the job and exit mid-step, saving nothing.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class TrainingInterrupted(SystemExit):
    """A stop signal ended training after ``last.ckpt`` was saved at the step reached.

    The process exits with ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), as a shell reports a
    process killed by that signal, so a scheduler sees an unfinished job, never a success.

    Args:
        signum: the signal.
        path: the checkpoint to resume from.
        step: the global step it was saved at.
        requeued: the SLURM job that was requeued to continue from it, if any.

    Attributes:
        finished: set by ``mrcnn.engine.train.train`` when the step was the run's last and its weights were validated
            before the stop took effect: the run is complete and its results are written.
    """

    def __init__(self, signum: int, path: Path, step: int, requeued: str | None = None):
        super().__init__(128 + signum)
        self.signum, self.path, self.step, self.requeued = signum, path, step, requeued
        self.finished = False

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} at step {self.step}; resume from {self.path}"


class LastCheckpoint(L.Callback):
    """Keeps ``<dirpath>/last.ckpt`` current, for resuming a run that was stopped or killed.

    It is saved at the end of every training epoch, at the end of training and, with
    ``every_n_train_steps``, every that many optimizer steps, so a killed run loses at most that many
    steps: Lightning resumes a checkpoint saved mid-epoch with the same global step, epoch, optimizer
    and lr-scheduler state. (``ModelCheckpoint(every_n_train_steps=N, save_last=True)`` alone stops
    saving at epoch ends and leaves ``last.ckpt`` at the last multiple of N.) Best-by-metric
    checkpoints stay with Lightning's ``ModelCheckpoint``; when one of them was saved at the current
    step, ``last.ckpt`` becomes a hard link to it instead of a second copy of the same weights.

    On SIGINT (Ctrl-C), SIGTERM (what SLURM and other schedulers send before they preempt or time out
    a job) or SIGUSR2 (what SLURM sends 120 s before a job's time limit under the SLURM launcher) during
    training, the run finishes the step it is in, saves ``last.ckpt`` (with the training
    loader's position, so a resumed run sees the batches the uninterrupted run would have seen) and
    raises :class:`TrainingInterrupted`: the process exits with 130 / 143 / 140. After SIGUSR2 in a SLURM job
    (``slurm_requeue``) the job's first process first asks SLURM to requeue the job
    (:func:`mrcnn.engine.launch.requeue_after_stop`), while the others wait for it. Under DDP any process's
    signal stops all of them at the same step (one all-reduce of a flag per step, on the host: a GPU step never
    waits for it). A signal received
    during a validation takes effect when the validation ends. A second Ctrl-C stops at once, saving
    nothing. These handlers replace Lightning's SIGTERM handler while the training loop runs (it would
    stop without saving and exit with 0).

    Args:
        dirpath: folder of the checkpoint.
        every_n_train_steps: also save every that many optimizer steps; ``None`` or 0: epoch ends only.
        filename: checkpoint file name.
        stop_on_signal: handle SIGINT, SIGTERM and SIGUSR2 as above; ``False`` leaves them to Lightning and Python.
        slurm_requeue: after a stop by SIGUSR2 in a SLURM job, requeue the job, as above.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = None,
        filename: str = "last.ckpt",
        stop_on_signal: bool = True,
        slurm_requeue: bool = False,
    ):
        super().__init__()
        self.path = Path(dirpath) / filename
        self.every_n_train_steps = every_n_train_steps or 0
        self.stop_on_signal = stop_on_signal
        self.slurm_requeue = slurm_requeue
        self.received_signal = 0  # the first stop signal this process received (set by the handler); 0: none
        self._stop_signal = 0  # the signal all processes agreed to stop on, once last.ckpt is saved for it
        self._saved_step = -1
        self._final_mid_epoch_step = -1  # the step of a save where max_steps ended the run mid-epoch
        self._step_at_batch_start = -1  # the global step when the current training batch started
        # The step the every-N count runs from: the start of this fit, then each periodic save.
        self._periodic_base = 0
        self._start_step = 0  # the global step this fit started from
        self._previous_handlers: dict[int, object] = {}
        self._signal_trainer: L.Trainer | None = None  # set when training starts
        self._flag_group = None  # the host process group the stop flag is agreed on (several processes only)

    # ---- saving ---------------------------------------------------------------------------------

    def _save(self, trainer: L.Trainer) -> None:
        """Saves ``last.ckpt`` at this step (once), as a link to another checkpoint of this step if there is one."""
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.global_step == self._final_mid_epoch_step:
            return
        # The steps' losses not read yet (on a GPU the module reads each when the GPU has it ready, a step or more
        # later): a non-finite one stops the run here, before its weights replace the last good last.ckpt.
        watch = getattr(trainer.lightning_module, "loss_watch", None)
        if watch is not None:
            watch.check(wait=True)
        same_step = _checkpoint_saved_at_this_step(trainer)
        if same_step is not None and same_step != self.path:
            self._link(trainer, same_step)
        elif trainer.global_step != self._saved_step:
            # Every rank calls it (it ends in a barrier); rank zero writes the file. Lightning writes a new
            # file and renames it over the old one, so a checkpoint hard-linked to the old one keeps its content.
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state: a resume needs it
        self._saved_step = trainer.global_step

    def _link(self, trainer: L.Trainer, source: Path) -> None:
        """``last.ckpt`` becomes a hard link to ``source``, a checkpoint of the same step (no second copy on disk)."""
        if trainer.is_global_zero and not (self.path.exists() and os.path.samefile(source, self.path)):
            partial = self.path.with_name(f"{self.path.name}.link")
            partial.unlink(missing_ok=True)
            try:
                os.link(source, partial)
            except OSError:  # a file system without hard links
                shutil.copyfile(source, partial)
            os.replace(partial, self.path)
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if _epoch_end_or_validation_follows(trainer, batch_idx):
            # Lightning resumes a checkpoint saved here past the validation that follows (it takes it for
            # one saved after it): saving and stopping wait for the epoch's end, or for the next batch.
            return
        if trainer.global_step == self._step_at_batch_start:
            # A batch whose gradients wait for the next ones (trainer.accumulate_grad_batches): a checkpoint holds no
            # gradients, so a save here would resume with part of the window lost. Every rank skips the same batches.
            return
        # Due once the step count passes a multiple of N since the last periodic save: a save skipped because a
        # validation followed (above) is made at the next batch instead of being lost.
        n = self.every_n_train_steps
        if n and trainer.global_step // n > self._periodic_base // n:
            self._save(trainer)
            self._periodic_base = trainer.global_step
        if not self._stop_signal:
            self._agree_to_stop(trainer)
            if self._stop_signal:
                # Saved here, where the loader's position is the number of steps done; the run stops at the
                # next hook, once Lightning has logged this step's metrics.
                self._save(trainer)
        if 0 <= trainer.max_steps <= trainer.global_step:
            # trainer.max_steps ends the run mid-epoch: saved here too, as for a signal. By the end of training
            # Lightning counts the epoch as complete, so a run resumed from a later save (to train longer) would
            # start the next epoch and skip this one's remaining batches. Kept over later saves at this step.
            self._save(trainer)
            self._final_mid_epoch_step = trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        batches = trainer.num_training_batches
        if batches != float("inf") and trainer.fit_loop.epoch_loop.batch_progress.current.completed < batches:
            # The epoch ends before its last batch: trainer.max_steps at a batch a validation followed (no save was
            # made there), or trainer.should_stop set by trainer.max_time's timer or early stopping (Lightning
            # validates at such a stop). Saved as a mid-epoch checkpoint, so that a resumed run trains this epoch's
            # remaining batches instead of starting the next epoch.
            if trainer.global_step == self._step_at_batch_start and trainer.global_step != self._final_mid_epoch_step:
                # The last batch stepped no optimizer: the stop came inside a gradient-accumulation window.
                log.warning(
                    "training stopped inside a gradient-accumulation window (trainer.accumulate_grad_batches=%s): "
                    "%s holds no gradients, so the resumed run steps without this window's batches taken so far",
                    trainer.accumulate_grad_batches,
                    self.path,
                )
            with _as_mid_epoch(trainer):
                self._save(trainer)
            self._final_mid_epoch_step = trainer.global_step
        else:
            self._save(trainer)
        # A stop waits for the next epoch's start: a ModelCheckpoint saving at epoch ends runs after this callback.
        self._agree_to_stop(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._saved_step == trainer.global_step:
            # Saved at the epoch's end, before a ModelCheckpoint saved there too: link to its file instead.
            self._save(trainer)
        if self._stop_signal:
            self._raise_stop(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)
        self._agree_to_stop(trainer)
        if self._stop_signal:
            self._raise_stop(trainer)
        self._restore_handlers()

    # ---- stopping on a signal ----------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        self._periodic_base = self._start_step = trainer.global_step
        self._final_mid_epoch_step = -1
        # Installed here, after Lightning installed its own at the start of fit(): ours replace its SIGTERM
        # handler while the training loop runs. Signal handlers can only be set from the main thread.
        self.received_signal = self._stop_signal = 0
        self._signal_trainer = trainer  # whether the signal came during a validation, for its message
        if self.stop_on_signal and threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self._flag_group = host_process_group(trainer.world_size) if self.stop_on_signal else None

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received_signal:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        if not self.received_signal:
            self.received_signal = signum
            trainer = self._signal_trainer
            when = "after this step"
            if trainer is not None and trainer.validating:
                # A validation inside an epoch is followed by a step before the save (where the loader's position is
                # a step's); one at the epoch's end by none.
                when = "when this validation ends (after the next step, if the epoch goes on)"
            # os.write, not logging or print: a handler that runs inside a logging call could deadlock there.
            os.write(
                2,
                (
                    f"\n{signal.Signals(signum).name} received: saving {self.path} {when}, then "
                    "stopping (Ctrl-C again to stop at once without saving)\n"
                ).encode(),
            )

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The stop signal, the same on every process: the largest any process received; 0 for none."""
        if not self._previous_handlers:  # not handling signals: no process is, so no collective either
            return 0
        signum = self.received_signal or (int(signal.SIGTERM) if trainer.received_sigterm else 0)
        if self._flag_group is not None:  # after every step: on the host, so that no step waits for the GPU (host_max)
            signum = host_max(signum, self._flag_group)
        return signum

    def _agree_to_stop(self, trainer: L.Trainer) -> None:
        """Where ``last.ckpt`` was just saved: if any process received a stop signal, all stop at the next hook."""
        if not self._stop_signal:
            self._stop_signal = self._agreed_signal(trainer)

    def _raise_stop(self, trainer: L.Trainer) -> None:
        requeued = self._requeue(trainer)
        self._restore_handlers()
        if requeued is not None and threading.current_thread() is threading.main_thread():
            outlive_the_requeue_sigterm()  # in place of Lightning's handler (train.py's stop sets it again after)
        job_processes.release_from_observer()  # the children exit 128 + the signal too: no failure to kill for
        raise TrainingInterrupted(self._stop_signal, self.path, self._saved_step, requeued)

    def _requeue(self, trainer: L.Trainer) -> str | None:
        """After a stop by SIGUSR2 in a SLURM job (``slurm_requeue``): the first process asks SLURM to requeue the
        job (:func:`mrcnn.engine.launch.requeue_after_stop`) and tells the others, which wait for it: one that
        exited first would end the first one with it (srun's ``--kill-on-bad-exit`` ends a job step at its first
        non-zero exit). Before the stop handlers are restored, so a SIGTERM SLURM sends meanwhile is only recorded.

        Returns:
            The requeued job's id, on every process; ``None`` where it was not requeued.
        """
        if not (self.slurm_requeue and self._stop_signal == signal.SIGUSR2 and slurm_job_id()):
            return None
        job = None
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()  # the rows logged so far (the CSV logger buffers them), before SLURM ends the job
            job = requeue_after_stop(trained=self._saved_step > self._start_step)
        if self._flag_group is not None:  # on the host, as the stop flag
            job = slurm_job_id() if host_max(int(job is not None), self._flag_group) else None
        return job

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._stop_signal:
            self._raise_stop(trainer)
        self._step_at_batch_start = trainer.global_step

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._stop_signal and not trainer.sanity_checking:
            self._raise_stop(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Before Lightning loads its loops from the checkpoint, with this fit's trainer.max_steps.
        if trainer.max_steps != -1:
            _resume_after_a_trained_epoch_at_the_next(checkpoint)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            # None: a handler not set from Python; the default is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous_handlers = {}


def _epoch_end_or_validation_follows(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the training epoch ends, or Lightning may validate, right after this batch.

    It may say so when Lightning will not validate (``check_val_every_n_epoch`` skips the epoch); never the
    other way round. The answer is the same on every rank.
    """
    if batch_idx + 1 >= trainer.num_training_batches:
        return True
    every = getattr(trainer, "val_check_batch", None)  # batches between validations (val_check_interval)
    return isinstance(every, int) and every > 0 and ((batch_idx + 1) % every == 0 or trainer.global_step % every == 0)


@contextlib.contextmanager
def _as_mid_epoch(trainer: L.Trainer):
    """While held, the fit loop's progress reads as during the epoch rather than at its end.

    Lightning counts an epoch as processed just before ``on_train_epoch_end``, and a checkpoint saved with that count
    resumes at the next epoch; one saved with it one lower resumes after the epoch's last finished batch, as a
    checkpoint saved after a validation in the middle of an epoch does (the loader's position, saved with it, says
    which batches were taken).
    """
    progress = trainer.fit_loop.epoch_progress
    # Where a validation was due after the last batch, Lightning's restart goes through that batch's end once more (a
    # checkpoint saved at a validation's end is saved before it) and counts its step for the loggers again: the
    # logged step would run one ahead of the uninterrupted run's.
    recounted = int(_validates_without_the_stop(trainer))
    progress.total.processed -= 1
    progress.current.processed -= 1
    trainer.fit_loop.epoch_loop._batches_that_stepped -= recounted
    try:
        yield
    finally:
        progress.total.processed += 1
        progress.current.processed += 1
        trainer.fit_loop.epoch_loop._batches_that_stepped += recounted


def _resume_after_a_trained_epoch_at_the_next(checkpoint: dict) -> None:
    """Makes a fit with ``trainer.max_steps`` set resume a checkpoint saved after an epoch's last batch (at the
    validation that follows it, at the epoch's end, at the end of training) at the next epoch's first batch.

    Lightning 2.6 takes every fit with ``max_steps`` for a restart, and resumes such a checkpoint into an epoch whose
    batches it counts as taken already: a run extended to train longer (``trainer.max_steps=8 trainer.max_epochs=2``
    after 4 steps, 1 epoch) trained no step and stopped at ``max_epochs``, or trained one. Without ``max_steps`` it
    starts the next epoch, as it does here with the loop state written as at that epoch's start: the epoch finished,
    no batch of the next taken. Lightning's restart then counts one more step for the loggers, which the checkpoint
    already counts when it was saved after the validation: one less is loaded. Nothing else runs between an epoch's
    last validation and the next epoch that a resume would have to repeat: the learning-rate schedule steps by
    optimizer step, and the loader's position (the whole epoch taken) starts the next epoch.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or not fit.get("epoch_loop.batch_progress", {}).get("is_last_batch"):
        return
    epochs = fit["epoch_progress"]
    counted = epochs["total"]["processed"] == epochs["total"]["started"]  # saved after the epoch's validation
    for counts in epochs.values():  # "total" and "current"
        counts["processed"] = counts["completed"] = counts["started"]
    batches = fit["epoch_loop.batch_progress"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False
    if counted:
        fit["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


def _validates_without_the_stop(trainer: L.Trainer) -> bool:
    """Whether Lightning would validate after the current training batch had ``trainer.should_stop`` not been set.

    Lightning's own decision (``_should_check_val_fx`` of its training epoch loop: the epoch's last batch,
    ``val_check_interval``, ``check_val_every_n_epoch``) asked with ``should_stop`` off; where that private method is
    missing (another Lightning version), :func:`_epoch_end_or_validation_follows`, which may say yes wrongly.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    decide = getattr(epoch_loop, "_should_check_val_fx", None)
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if decide is None or fetcher is None:
        return _epoch_end_or_validation_follows(trainer, epoch_loop.batch_idx)
    should_stop, trainer.should_stop = trainer.should_stop, False
    try:
        return bool(decide(fetcher))
    finally:
        trainer.should_stop = should_stop


def _checkpoint_saved_at_this_step(trainer: L.Trainer) -> Path | None:
    """The file a ``ModelCheckpoint`` saved at the current global step (e.g. the best by mask AP), if any."""
    for callback in trainer.checkpoint_callbacks:
        # Lightning's ModelCheckpoint records the step and file of its latest save (private, so read with care).
        # The answer must be the same on every rank (linking ends in a barrier): the file exists on rank zero's disk.
        step = getattr(callback, "_last_global_step_saved", None)
        path = getattr(callback, "_last_checkpoint_saved", "")
        if step == trainer.global_step and path:
            return Path(path)
    return None


class RunRecord(L.Callback):
    """Writes what a resumed run needs to know about this one into every checkpoint it saves.

    ``checkpoint["mrcnn_run"]`` (``mrcnn.engine.checkpoints.RUN_RECORD_KEY``) holds the resolved config (a resumed run
    compares its own with it: ``mrcnn.engine.checkpoints.check_resume_config``), the command-line overrides and the
    W&B run's id and labels (a resumed run continues that W&B run, under its name, group and tags). Hydra rewrites
    ``<run_dir>/.hydra`` when a run is resumed into its own folder, so the checkpoint is the one place these facts outlive the run's start.

    Args:
        config: the resolved config, as plain containers.
        overrides: the run's command-line overrides.
    """

    def __init__(self, config: dict, overrides: list[str] | None = None):
        super().__init__()
        self.config = config
        self.overrides = list(overrides) if overrides is not None else None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[RUN_RECORD_KEY] = {
            "config": self.config,
            "overrides": self.overrides,
            "wandb_run_id": _wandb_run_id(trainer),
            "wandb_labels": _wandb_labels(trainer),
        }


# Where RandomState writes the processes' random states in a checkpoint.
RANDOM_STATE_KEY = "mrcnn_random_state"


def random_state() -> dict:
    """This process's global random states: torch (CPU and every initialised CUDA device), numpy, python."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # As a tensor and plain numbers, not a numpy array: Lightning loads checkpoints with weights_only=True.
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The device this process trains on (Lightning makes it the current one), not every visible device: a run
        # resumed where fewer devices are visible (CUDA_VISIBLE_DEVICES, a smaller allocation) restores it as well.
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_random_state(state: dict) -> None:
    """Restores what :func:`random_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    random.setstate(state["python"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state:
        # Saved by an older version: one state per device visible then; this process's device is the current one.
        device = torch.cuda.current_device()
        if device < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][device])
        else:
            log.warning(
                "the checkpoint holds the CUDA random states of %d devices and this process trains on device %d: "
                "its CUDA random draws differ from those of the uninterrupted run",
                len(state["cuda"]),
                device,
            )


class RandomState(L.Callback):
    """Carries every process's random states in checkpoints, so a resumed run draws what the uninterrupted one drew.

    The model draws from torch's global generator at every training step (the RPN's and the RoI heads'
    positive/negative sampling, a random training size when ``data.min_size`` is a list). Without this a
    resumed run starts those draws from ``seed_everything``'s state and diverges from the uninterrupted
    run at its first step. The data needs nothing here: the training order follows from ``(seed, epoch)``
    (:class:`~mrcnn.data.samplers.EpochSampler`), each item's augmentation from ``(seed, epoch, index, repeat)``
    (:class:`~mrcnn.data.samplers.SampleIndex`) and the loader workers' seeds from ``(seed, epoch)``, in
    the checkpointed run as in the resumed one, in whichever process loads the item.

    ``checkpoint["mrcnn_random_state"]`` is a list with one :func:`random_state` per process (by global rank;
    gathered from every rank under DDP, where every rank saves a checkpoint together). A resumed training
    run restores its own rank's entry when training starts, after the sanity check and before the first
    batch is drawn, which is where the uninterrupted run stood when it saved.
    """

    def __init__(self):
        super().__init__()
        self._loaded: list[dict] | None = None
        self._before_validation: dict | None = None  # this process's states as the validation running now started

    def on_validation_start(self, trainer, pl_module) -> None:
        # A validation computes its losses with the model's samplers (RPN and RoI heads), which draw from the same
        # generators as training. Undone at its end: how often and how much a run validates (keys a resumed run may
        # change, trainer.limit_val_batches, check_val_every_n_epoch, ...) and the sanity check leave the training
        # draws alone, and so does a validation only a stopped run has (training stopped mid-epoch by
        # trainer.should_stop: max_time's timer, early stopping).
        if self._loaded and not trainer.sanity_checking:
            # A resumed run with nothing left to train never starts training: its final validation draws from the
            # states the uninterrupted run's drew from, as the steps it did not repeat left them.
            self.on_train_start(trainer, pl_module)
        self._before_validation = random_state()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._before_validation is not None:
            set_random_state(self._before_validation)
            self._before_validation = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Saved during a validation (a callback's on_validation_end before this one's): the states training goes on
        # from, those from before it.
        state = self._before_validation if self._before_validation is not None else random_state()
        states = [state]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, state)
        checkpoint[RANDOM_STATE_KEY] = states

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.state.fn != "fit":
            return  # evaluate / predict of a checkpoint: draws from this run's seed, as with weights=
        self._loaded = checkpoint.get(RANDOM_STATE_KEY)
        if self._loaded is None:
            log.warning(
                "the checkpoint holds no random states (it predates them): the random draws after the resume "
                "differ from those of the uninterrupted run"
            )
        elif len(self._loaded) != trainer.world_size:
            log.warning(
                "the checkpoint holds the random states of %d processes and this run has %d: the random draws "
                "after the resume differ from those of the uninterrupted run",
                len(self._loaded),
                trainer.world_size,
            )

    def on_train_start(self, trainer, pl_module) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded:
            set_random_state(loaded[trainer.global_rank % len(loaded)])


def _wandb_run(trainer: L.Trainer):
    """This run's W&B run, on rank zero (the rank that writes checkpoints and owns the W&B run); else ``None``."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            return logger.experiment
    return None


def _wandb_run_id(trainer: L.Trainer) -> str | None:
    """The id of this run's W&B run, on rank zero; ``None`` without W&B."""
    run = _wandb_run(trainer)
    return None if run is None else run.id


def _wandb_labels(trainer: L.Trainer) -> dict | None:
    """The name, group and tags of this run's W&B run, on rank zero; ``None`` without W&B.

    A resumed run gives them to W&B again (:func:`mrcnn.engine.loggers.wandb_settings`): W&B keeps a run's labels on
    its server, but a run that never reached it (offline, not synced) would be continued online without them.
    """
    run = _wandb_run(trainer)
    if run is None:
        return None
    labels = {"name": run.name or None, "group": run.group or None, "tags": list(run.tags or ()) or None}
    return {key: value for key, value in labels.items() if value is not None}


class StepTimer(L.Callback):
    """Base of the callbacks that time training steps: :meth:`step_seconds`, called at the end of each training
    batch, gives the wall time since the end of the previous one (data loading included).

    The first batch of an epoch and the first after a validation get ``None``: the gap before them is not training.
    """

    _last: float | None = None  # end of the previous training batch; None: the next one is not timed

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last = None

    def step_seconds(self) -> float | None:
        """Seconds since the previous training batch ended (``None`` as above); call once per training batch."""
        now = time.perf_counter()
        previous, self._last = self._last, now
        return None if previous is None else now - previous


class Throughput(StepTimer):
    """Logs ``train/images_per_sec``: images of the global batch per second of wall time.

    The time between the ends of consecutive training batches (data loading included) is averaged
    over the last ``window`` steps; time spent in validation is not counted.

    Args:
        window: steps to average over.
    """

    def __init__(self, window: int = 20):
        super().__init__()
        self.window = window
        self._steps: deque[tuple[int, float]] = deque(maxlen=window)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self.step_seconds()
        if step is None:
            return
        self._steps.append((len(batch[0]) * trainer.world_size, step))
        seconds = sum(s for _, s in self._steps)
        if seconds > 0 and engine_loggers.writes_train_metrics(trainer):
            # A host tensor: Lightning keeps a metric on its value's device, and a float would be copied to the GPU
            # every step (a copy from pageable memory, which waits for the GPU's queue).
            rate = torch.tensor(sum(n for n, _ in self._steps) / seconds, dtype=torch.float64)
            pl_module.log("train/images_per_sec", rate, batch_size=len(batch[0]))


class CostEstimate(StepTimer):
    """Logs what the run and its sweep cost and how long they have left (rank zero; training steps only).

    At the start of training it logs the estimate from the recorded ``step_time_s`` (or says there is none), after
    ``measure_steps`` timed steps from the measured median step time, and then every ``every_n_steps`` steps.
    A step is timed from the end of one optimizer step's last training batch to the end of the next one's (data
    loading included; ``trainer.accumulate_grad_batches`` batches a step; the gap around a validation is not
    counted), as the remaining steps (``estimated_stepping_batches``) count optimizer steps.

    Args:
        step_time_s: the step time recorded (or, where ``step_time_note`` says so, derived) for the run's
            setting and hardware; ``None``: none, the first steps give it.
        step_time_note: where ``step_time_s`` comes from, for the log.
        measure_steps: steps timed before the measured step time replaces the recorded one.
        every_n_steps: steps between updates; ``None``: a tenth of the run.
        job, jobs: this job's index (from 0) and the sweep's number of jobs; ``None``: from Hydra.
        at_once: how many of the sweep's jobs run side by side; ``None``: from Hydra's launcher when ``job`` and
            ``jobs`` come from Hydra too, else 1.
    """

    def __init__(
        self,
        step_time_s: float | None = None,
        step_time_note: str | None = None,
        measure_steps: int = 20,
        every_n_steps: int | None = None,
        job: int | None = None,
        jobs: int | None = None,
        at_once: int | None = None,
    ):
        super().__init__()
        self.step_time_s = step_time_s
        self.step_time_note = step_time_note or "recorded for this setting"
        self.measure_steps = measure_steps
        self.every_n_steps = every_n_steps
        self.job, self.jobs, self.at_once = job, jobs, at_once
        self.kept: frozenset[int] = frozenset()  # the jobs of a continued sweep that finished before
        self._times: deque[float] = deque(maxlen=200)
        self._measured_logged = False
        # The optimizer step being timed: its batches' seconds so far (None: one of them was not timed), and the
        # global step before it. With trainer.accumulate_grad_batches=k a step is k batches.
        self._window: float | None = None
        self._step_seen = -1

    def on_train_start(self, trainer, pl_module) -> None:
        if self.job is None and self.jobs is None:
            self.job, self.jobs, at_once, self.kept = sweep_position()
            self.at_once = self.at_once or at_once
        self._step_seen = trainer.global_step
        self._log(trainer, self.step_time_s, self.step_time_note)

    def _log(self, trainer, step_time: float | None, source: str) -> None:
        if trainer.is_global_zero:
            steps = int(trainer.estimated_stepping_batches)
            at_once = self.at_once or 1
            kept = self.kept
            log.info(estimate_line(self.jobs, self.job, steps, trainer.global_step, step_time, source, at_once, kept))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = self.step_seconds()
        # A step with an untimed batch (the first of a fit or an epoch, the first after a validation) is not timed.
        self._window = None if seconds is None or self._window is None else self._window + seconds
        if trainer.global_step == self._step_seen:
            return  # gradients accumulate: the step is not done
        self._step_seen = trainer.global_step
        if self._window is not None:
            self._times.append(self._window)
        self._window = 0.0
        if len(self._times) < self.measure_steps:
            return
        every = self.every_n_steps or max(1, int(trainer.estimated_stepping_batches) // 10)
        if not self._measured_logged or trainer.global_step % every == 0:
            self._measured_logged = True
            self._log(trainer, statistics.median(self._times), f"measured over the last {len(self._times)} steps")


class PredictionOverlays(L.Callback):
    """After every validation, logs the predictions on the first ``num_images`` validation images to W&B.

    Each image is logged twice: ``val/predictions`` is the plain image with W&B's interactive overlays
    (predicted and ground-truth masks as class label maps, predicted boxes with class names and
    scores), and ``val/overlays`` is the picture ``mrcnn.engine.visualize.draw_instances`` draws, where each
    instance has its own colour. The images are the same at every validation, so the panels show
    how the predictions change during training. Does nothing without a ``WandbLogger``.

    Args:
        num_images: how many validation images, from the first.
        score_threshold: detections scoring below it are not shown.
        mask_threshold: mask probabilities above it are foreground.
    """

    def __init__(self, num_images: int = 4, score_threshold: float = 0.5, mask_threshold: float = 0.5):
        super().__init__()
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        # Rank zero alone runs a few extra forward passes: the inner model, not the DDP wrapper,
        # in eval mode, so no collective is involved and the other ranks need not wait.
        if not loggers or trainer.sanity_checking or not trainer.is_global_zero or self.num_images <= 0:
            return
        loader = trainer.val_dataloaders
        dataset = (loader[0] if isinstance(loader, (list, tuple)) else loader).dataset
        samples = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        images = [image for image, _ in samples]
        with torch.no_grad():
            # One image a forward: a batch would pad each to the largest, and the padding reaches GroupNorm's
            # statistics; alone, each gets the detections evaluation scored (it batches images of one size).
            detections = [pl_module.model([image.to(pl_module.device)])[0][0] for image in images]
        # The step Lightning logs this validation's metrics at (one lower than global_step at an epoch's end), so
        # the images sit in the same history row as the AP (Lightning's LearningRateMonitor reads it the same way).
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        self._log(loggers, step, images, [target for _, target in samples], detections, pl_module.class_names)

    def _log(self, loggers, step, images, targets, detections, class_names) -> None:
        import wandb

        interactive, drawn = [], []
        class_labels = wandb_class_labels(class_names)
        for image, target, detection in zip(images, targets, detections):
            detection = select(detection, self.score_threshold)
            size = tuple(image.shape[-2:])
            pixels = to_uint8(image).permute(1, 2, 0).numpy()
            masks = {
                "predictions": {
                    "mask_data": semantic_label_map(detection, size, self.mask_threshold),
                    "class_labels": class_labels,
                },
                "ground_truth": {"mask_data": semantic_label_map(target, size), "class_labels": class_labels},
            }
            interactive.append(
                wandb.Image(pixels, masks=masks, boxes={"predictions": wandb_boxes(detection, class_names)})
            )
            overlay = draw_instances(image, detection, class_names, self.score_threshold, self.mask_threshold)
            drawn.append(wandb.Image(overlay.permute(1, 2, 0).numpy()))
        for logger in loggers:
            logger.log_metrics({"val/predictions": interactive, "val/overlays": drawn}, step=step)
