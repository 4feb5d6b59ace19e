"""``mode=train`` and ``mode=evaluate``: build from the config, fit or validate, write the final metrics."""

import contextlib
import json
import logging
import os
import signal
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

import mrcnn.config  # noqa: F401  (registers the config resolvers)
from mrcnn.engine.build import build, job_overrides
from mrcnn.engine.callbacks import TrainingInterrupted
from mrcnn.engine.checkpoint_model import use_checkpoint_model
from mrcnn.engine.checkpoints import check_checkpoint_fits, check_resume_config, continue_command, read_resumed_run
from mrcnn.engine.config_checks import (
    check_config,
    checkpoint_path,
    resume_checkpoint,
    slurm_restart_count,
    validation_schedule_note,
)
from mrcnn.engine.launch import (
    check_run_dir_is_free,
    continue_sweep_sentence,
    continues_its_folder,
    in_sweep,
    is_ddp_child,
    is_first_process,
    job_scope,
    outlive_the_requeue_sigterm,
)
from mrcnn.engine.model_record import read_checkpoint
from mrcnn.engine.process_meeting import processes_meet
from mrcnn.engine.quiet import reading_weights_only
from mrcnn.engine.summary import write_final_metrics

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume: ``ckpt_path`` / ``resume``), then evaluate on the validation split.

    A resumed run must have the config of the run it resumes, but for the length of training and runtime
    keys (:func:`mrcnn.engine.checkpoints.check_resume_config`); it continues that run's CSV history and W&B run.

    Returns the final COCO metrics.
    """
    check_config(cfg)
    ckpt_path = checkpoint_path(cfg)
    check_run_dir_is_free(cfg.run_dir, cfg.mode, ckpt_path, in_sweep(), bool(cfg.get("continue_sweep")))
    if slurm_restart_count() and is_first_process():
        log_requeued_start(cfg.run_dir, ckpt_path)
    elif cfg.get("continue_sweep") and is_first_process():
        log_continued_start(cfg.run_dir, ckpt_path)
    note = validation_schedule_note(cfg)
    if note:
        log.warning(note)
    resumed = read_resumed_run(ckpt_path) if ckpt_path else None
    if resumed is not None:
        check_resume_config(cfg, resumed)
    with job_scope(cfg), stops_with_nonzero_exit(cfg):
        prepare_determinism(cfg)
        L.seed_everything(cfg.seed, workers=True)
        datamodule, module, trainer = build(cfg, resumed)
        try:
            with warnings.catch_warnings(), processes_meet(trainer):
                if continues_its_folder(cfg.run_dir, ckpt_path):
                    # The run continues in its own folder: the checkpoints Lightning warns of finding there are its own.
                    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except TrainingInterrupted as stop:
            if cfg.get("final_eval", True) and finished_and_validated(trainer, module):
                # The stop came during the run's last step, and Lightning validated the final weights before it took
                # effect: the run is complete, and its results are written. It still exits as stopped (a sweep ends).
                stop.finished = True
                write_final_metrics(cfg, trainer, dict(module.last_metrics), module.nothing_to_score)
            raise
        metrics = {}
        recorded = results_it_finished_with(cfg, resumed, trainer) if cfg.get("final_eval", True) else None
        if recorded is not None:
            metrics, nothing_to_score = recorded
            write_final_metrics(cfg, trainer, metrics, nothing_to_score)
        elif cfg.get("final_eval", True):
            # Skip a second pass when fit() already validated the final weights.
            if module.last_metrics_step != trainer.global_step:
                with logged_as_after_the_last_step(trainer):
                    trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics = dict(module.last_metrics)
            write_final_metrics(cfg, trainer, metrics, module.nothing_to_score)
        return metrics


def results_it_finished_with(cfg: DictConfig, resumed, trainer: L.Trainer) -> tuple[dict, str | None] | None:
    """A resumed run that had finished: its final results (``metrics.json``) and why nothing was scored, if so;
    ``None`` when this start trained a step, or its config may differ, or the run left no results of this step.

    Its final weights were validated when it finished: validated again, the same AP is logged a second time at the
    same step, in the CSV history and on W&B. With ``resume_allow_config_change=true`` the validation data may
    differ, and it is validated again.
    """
    if resumed is None or trainer.global_step != resumed.global_step or cfg.get("resume_allow_config_change"):
        return None
    path = Path(resumed.folder) / "metrics.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # not there: it stopped before its results were written
        return None
    if not isinstance(record, dict) or record.get("global_step") != trainer.global_step:
        return None
    if is_first_process():
        log.info(
            "the run had finished at step %d (%s): nothing is left to train, and the results of its final validation "
            "stand",
            trainer.global_step,
            path,
        )
    nothing_to_score = record.pop("nothing_to_score", None)
    record.pop("global_step"), record.pop("world_size", None)
    return record, nothing_to_score


def finished_and_validated(trainer: L.Trainer, module: L.LightningModule) -> bool:
    """Whether the fit trained every step it planned and validated the weights of the last one."""
    return trainer.global_step >= trainer.estimated_stepping_batches and module.last_metrics_step == trainer.global_step


@contextlib.contextmanager
def logged_as_after_the_last_step(trainer: L.Trainer):
    """While held, Lightning logs at the step and epoch its validation after the fit's last step would have logged at.

    In the fit Lightning validates after a step before it counts that step for the loggers: the validation after
    step N (``global_step`` N) is logged at step N - 1, in the epoch of that step. After the fit both counts have moved
    on, so a validation of the same weights was logged at step N under the next epoch: one row later in the CSV log
    and on W&B's charts, and a run resumed from the checkpoint of step N dropped it from the CSV history (rows from
    the checkpoint's step on are the resumed run's to log again). Nothing is moved before any step was trained.

    The step is set, not counted back: a run resumed from a checkpoint of its last step (saved after that step, before
    Lightning counted it for the loggers, as a stop during the last step saves it) trains nothing more, and its count
    is one lower already; counted back, its validation was logged one step early, before the step it validates.
    """
    loop = trainer.fit_loop
    counted, completed = loop.epoch_loop._batches_that_stepped, loop.epoch_progress.current.completed
    started = loop.epoch_progress.current.started
    if counted > 0 and started > 0:
        loop.epoch_loop._batches_that_stepped = trainer.global_step - 1
        # The epoch of the last step, the last one started: a fit that max_steps ended mid-epoch counts that epoch as
        # completed, and a resumed fit with nothing left to train (from that fit's save) only as started.
        loop.epoch_progress.current.completed = started - 1
    try:
        yield
    finally:
        loop.epoch_loop._batches_that_stepped, loop.epoch_progress.current.completed = counted, completed


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a Lightning checkpoint (``ckpt_path`` / ``resume``) or torchvision ``weights`` on the validation split."""
    check_config(cfg)
    ckpt_path = checkpoint_path(cfg)  # check_config: there, or weights= given
    check_run_dir_is_free(cfg.run_dir, cfg.mode, ckpt_path, in_sweep(), bool(cfg.get("continue_sweep")))
    # A file that is no checkpoint stops here, before the data is built. The step its weights were trained to is
    # the evaluation's (the Trainer's own stays 0: validate restores no training loop); weights= have none.
    step = read_checkpoint(ckpt_path).get("global_step") if ckpt_path else None
    # The architecture the weights were trained as (a torchvision state dict in weights= records none).
    use_checkpoint_model(cfg, ckpt_path or cfg.weights, job_overrides(), "ckpt_path" if ckpt_path else "weights")
    with job_scope(cfg), stops_with_nonzero_exit(cfg):
        prepare_determinism(cfg)
        L.seed_everything(cfg.seed, workers=True)
        datamodule, module, trainer = build(cfg)
        if ckpt_path:
            check_checkpoint_fits(module, ckpt_path, cfg)
        with reading_weights_only(), processes_meet(trainer):
            trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        metrics = dict(module.last_metrics)
        write_final_metrics(cfg, trainer, metrics, module.nothing_to_score, global_step=step)
        return metrics


def prepare_determinism(cfg: DictConfig) -> None:
    """Sets what ``trainer.deterministic=true`` (or ``warn``) needs before anything starts CUDA.

    cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it starts; without it, matrix products on a GPU may sum in a
    different order from run to run, and under deterministic algorithms torch raises at the first one.
    Lightning's Trainer sets it too, but only when it is built, after the model (and whatever a user's code ran
    on the GPU before). The rest is Lightning's: ``torch.use_deterministic_algorithms(True)`` and cuDNN's
    deterministic algorithms; the GPU RoIAlign and RoIPool backwards then take deterministic paths
    (``mrcnn.modeling.roi_align.needs_deterministic_path``). On the CPU a run repeats exactly without it.
    """
    if cfg.trainer.get("deterministic") in (True, "warn"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def log_requeued_start(run_dir: str, ckpt_path: str | None) -> None:
    """Says what a training job SLURM requeued continues from (``checkpoint_path`` chose ``ckpt_path``)."""
    if ckpt_path == str(resume_checkpoint(run_dir)):
        log.info("SLURM requeued this job: it continues from %s", ckpt_path)
    else:
        log.warning(
            "SLURM requeued this job, and its folder %s holds no checkpoints/last.ckpt: it starts over, as its first "
            "start did (a job script whose folder is named by the time it started gets a new one at each start: name "
            "it, hydra.run.dir=<path>, for a requeued job to continue its run)",
            run_dir,
        )


def log_continued_start(run_dir: str, ckpt_path: str | None) -> None:
    """Says where a job of a sweep continued with ``continue_sweep=true`` starts: from its own ``last.ckpt``, over
    again in its folder (stopped before its first save), or anew."""
    if ckpt_path == str(resume_checkpoint(run_dir)):
        log.info("continue_sweep=true: this job continues from %s", ckpt_path)
    elif (Path(run_dir) / "csv").is_dir():
        log.info(
            "continue_sweep=true: %s holds no checkpoints/last.ckpt (stopped before its first save): it starts over",
            run_dir,
        )


@contextlib.contextmanager
def stops_with_nonzero_exit(cfg: DictConfig):
    """A job stopped by a signal exits non-zero (128 + the signal), saying how it goes on when it trained: requeued
    by SLURM, or with the command that resumes it.

    In the training loop ``mrcnn.engine.callbacks.LastCheckpoint`` saves ``last.ckpt`` (and may requeue the job)
    and raises :class:`TrainingInterrupted`. Outside it (sanity check, the final validation, ``mode=evaluate``)
    Lightning's own SIGTERM handler stops the run with ``SIGTERMException``, a ``SystemExit`` with no
    code, which would exit with 0 as if the job had finished; and Lightning ends a fit that Ctrl-C interrupted at
    once (a second Ctrl-C) with ``sys.exit(1)``, which exits 130 here.
    """
    started = time.time()  # what the run's folder held from before it, for how_it_goes_on
    try:
        yield
    except TrainingInterrupted as stop:
        if stop.requeued is not None:
            outlive_the_requeue_sigterm()  # again: Lightning's teardown restored the handler it found
            log.warning("%s. SLURM requeued job %s: it continues from there when it starts again", stop, stop.requeued)
        elif stop.finished:
            log.warning(
                "stopped by %s during step %d, the run's last: its training is complete, and its results are written "
                "(%s)",
                signal.Signals(stop.signum).name,
                stop.step,
                Path(cfg.run_dir) / "metrics.json",
            )
        elif is_ddp_child():
            # Its command line is the one its job's main process gave it, not the user's: the main process's log
            # (run.log, and the console) says how to go on.
            log.warning("%s. The job's main process says how to continue, in %s", stop, Path(cfg.run_dir) / "run.log")
        elif (sweep := continue_sweep_sentence()) is not None:  # a sweep's job: the sweep goes on with it
            log.warning("%s. %s", stop, sweep)
        else:
            log.warning(
                "%s. Continue with: %s", stop, continue_command(job_overrides(), f"resume={cfg.run_dir}", cfg.run_dir)
            )
        raise
    except SIGTERMException as stop:
        log.warning(
            "stopped by SIGTERM outside the training loop; nothing was saved now.%s", how_it_goes_on(cfg, started)
        )
        raise SystemExit(128 + signal.SIGTERM) from stop
    except SystemExit as stop:
        if stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt):
            # Lightning ends a fit that a second Ctrl-C (or one outside the training loop) interrupted with exit
            # code 1, as for a failure: 130 says Ctrl-C, as the first one's stop does.
            log.warning("stopped by SIGINT; nothing was saved now.%s", how_it_goes_on(cfg, started))
            raise SystemExit(128 + signal.SIGINT) from stop
        raise
    except KeyboardInterrupt:
        # Outside Lightning's handling (building the data and the model; a second Ctrl-C in Lightning's teardown after
        # a stop): a stop, not a crash, so no traceback.
        log.warning("stopped by SIGINT; nothing was saved now.%s", how_it_goes_on(cfg, started))
        raise SystemExit(128 + signal.SIGINT) from None


def how_it_goes_on(cfg: DictConfig, started: float) -> str:
    """After a stop outside the training loop: the command that continues the run from its ``last.ckpt`` (in a
    sweep, the sweep's), as a sentence; ``""`` where there is none, or in a DDP child (its main process says it).

    A run started from ``ckpt_path=`` in its own folder, an earlier checkpoint of that folder's run, that has saved
    nothing since (its ``last.ckpt`` is older than the job, ``started``): the same start again. ``resume=`` would
    continue from the later state in that ``last.ckpt``, which the user chose not to.
    """
    if is_ddp_child():
        return ""
    sweep = continue_sweep_sentence()
    if sweep is not None:
        return f" {sweep}"
    last = resume_checkpoint(cfg.run_dir)
    if not last.is_file():
        return ""
    start = cfg.get("ckpt_path")
    # A second's margin: file times come from a coarser clock than time.time(), and the job took longer to start.
    if start and not _same_file(start, last) and last.stat().st_mtime < started - 1:
        command = continue_command(job_overrides(), f"ckpt_path={start}", cfg.run_dir)
        return f" The run saved no checkpoint: start it again from {start} with: {command}"
    command = continue_command(job_overrides(), f"resume={cfg.run_dir}", cfg.run_dir)
    return f" Continue from {last} with: {command}"


def _same_file(a: str | Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there
        return False
