"""What a sweep costs before and while it runs: jobs x steps x seconds a step, and the time left.

A sweep logs its estimate when it starts (:class:`SweepCostAtStart`, a Hydra callback) from the step time recorded
for its setting (``callbacks.cost_estimate.step_time_s``, set by ``configs/setting/``), and every job keeps it
current (:class:`mrcnn.engine.callbacks.CostEstimate`, a Lightning callback): once its first steps are timed, the measured step time
replaces the recorded one, and each update gives the time left of the job and of the whole sweep. The estimate
counts training steps only; start-up and validation come on top.

This module holds what the sweep-level estimate needs and no more: Hydra instantiates :class:`SweepCostAtStart`
before every run, so it must not load torch or Lightning (a mistyped override would wait seconds for them).

A job knows where it stands from Hydra: its index is ``hydra.job.num`` and the number of jobs follows from the
sweep's parameters and command-line overrides, which the sweeper saved in ``<sweep dir>/multirun.yaml`` before
it launched the first job (:func:`sweep_job_count` repeats the basic sweeper's product of the swept values).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mrcnn.config import as_written, override_key, task_overrides

log = logging.getLogger(__name__)


def sweep_jobs(params: Mapping[str, str] | None, overrides: Sequence[str], config_loader=None) -> list[list[str]]:
    """The overrides of each job Hydra's basic sweeper launches, in its order: the product of the swept values per key.

    Args:
        params: ``hydra.sweeper.params`` (``{"seed": "0,1,2", "model/pooler": "roi_pool,roi_align"}``).
        overrides: the command-line overrides (``hydra.overrides.task``); a key given there replaces the
            same key of ``params``, as in the sweeper.
        config_loader: Hydra's config loader, which a ``glob(...)`` sweep of a config group's options needs.
    """
    # The command line's overrides as written (mrcnn.config.as_written: a value with an interpolation is one each job
    # resolves); the params resolved, as Hydra's sweeper reads them (${oc.env:SEEDS} may hold the values swept).
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(as_written(overrides))
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(lines)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def sweep_job_count(params: Mapping[str, str] | None, overrides: Sequence[str]) -> int:
    """The number of jobs Hydra's basic sweeper launches (:func:`sweep_jobs`)."""
    return len(sweep_jobs(params, overrides))


def planned_steps(cfg: DictConfig) -> int | None:
    """Optimizer steps a job of this config trains, as Lightning stops it: at ``trainer.max_steps`` or after
    ``trainer.max_epochs`` epochs of the built-in shapes (their number of images is in the config), whichever comes
    first; ``None`` when neither is known (epochs of data not yet read, such as COCO; devices chosen by Lightning)."""
    trainer = cfg.get("trainer") or {}
    max_steps = trainer.get("max_steps", -1)
    max_steps = int(max_steps) if max_steps is not None and max_steps > 0 else None
    per_epoch = _steps_per_epoch(cfg)
    epochs = trainer.get("max_epochs")
    by_epochs = int(epochs) * per_epoch if per_epoch is not None and epochs and epochs > 0 else None
    known = [steps for steps in (max_steps, by_epochs) if steps is not None]
    return min(known) if known else None


def _steps_per_epoch(cfg: DictConfig) -> int | None:
    """Optimizer steps of one epoch of the built-in shapes on every process; ``None`` for other data or where
    Lightning picks the number of devices (``trainer.devices=auto`` or ``-1``)."""
    trainer = cfg.get("trainer") or {}
    images = OmegaConf.select(cfg, "data.num_train_images", default=None)
    devices = trainer.get("devices", 1)
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        devices = len(devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if images is None or not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        return None
    world = devices * int(trainer.get("num_nodes", 1) or 1)
    batches = int(images) // (int(cfg.data.datamodule.batch_size) * world)  # the loader drops the last partial batch
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    # Lightning steps at the end of each epoch's last window, a short one too.
    return math.ceil(batches / int(trainer.get("accumulate_grad_batches", 1) or 1))


def duration(seconds: float) -> str:
    """``42 s``, ``5.8 min`` or ``3.2 h``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def estimate_line(
    jobs: int | None,
    job: int | None,
    steps: int | None,
    done: int,
    step_time: float | None,
    source: str,
    at_once: int = 1,
    kept: Collection[int] = (),
) -> str:
    """One log line: the job's and the sweep's cost and time left.

    Args:
        jobs: jobs in the sweep (``None``: not a sweep, or not known).
        job: this job's index, from 0 (``None``: before the first job).
        steps: optimizer steps of a job.
        done: steps this job has done.
        step_time: seconds a step; ``None``: not known yet.
        source: where the step time comes from (``measured over 20 steps``, ``recorded for setting=cpu``).
        at_once: how many of the sweep's jobs its launcher runs side by side (:func:`jobs_at_once`); the time left
            counts the jobs in rounds of that many, job ``j`` in round ``j // at_once``.
        kept: the numbers of the jobs a continued sweep (``continue_sweep=true``) finished before: not run again, so
            neither counted nor waited for.
    """
    where = f"job {job + 1}/{jobs}" if job is not None and jobs else ("sweep" if jobs else "run")
    if steps is None:
        return f"cost estimate ({where}): the number of steps is known once the job has read its data and its devices"
    if step_time is None:
        total = f"{jobs} jobs x {steps:,} steps" if jobs else f"{steps:,} steps"
        return (
            f"cost estimate ({where}): {total}; no step time recorded for this setting: measured after the first steps"
        )
    parts = [f"cost estimate ({where}, {step_time:.3g} s/step, {source}):"]
    if job is not None or not jobs:
        parts.append(f"step {done:,}/{steps:,}, {duration((steps - done) * step_time)} left of this job;")
    if jobs:
        runs = [j for j in range(jobs) if j not in kept or j == job]  # the jobs this start of the sweep trains
        at_once = max(1, min(at_once, len(runs)))
        rounds = math.ceil(len(runs) / at_once)
        later = rounds - (runs.index(job) // at_once + 1 if job is not None else 0)
        left = (steps - done) * step_time * (job is not None) + later * steps * step_time
        total = (
            f"sweep {len(runs)} jobs x {steps:,} steps x {step_time:.3g} s = {duration(len(runs) * steps * step_time)}"
        )
        if len(runs) < jobs:
            total += f" ({jobs - len(runs)} of its {jobs} jobs finished before: kept)"
        if at_once == 1:
            parts.append(f"{total}, {duration(left)} left;")
        else:
            parts.append(
                f"{total} of job time, {duration(left)} left with {at_once} running at once (as the scheduler "
                "starts them);"
            )
    parts.append("training steps only (start-up and validation come on top)")
    return " ".join(parts)


def jobs_at_once(launcher: Mapping | None, jobs: int) -> int:
    """How many of a sweep's ``jobs`` its launcher (``hydra.launcher``) runs side by side.

    Hydra's basic launcher runs them one after another. submitit's SLURM launcher submits them as one job array that
    runs up to ``array_parallelism`` (256 by default) at a time, as the cluster's queue allows; its local launcher
    starts every job at once. Other launchers count as one after another.
    """
    launcher = launcher or {}
    target = str(launcher.get("_target_", ""))
    if target.endswith("submitit_launcher.SlurmLauncher"):
        return max(1, min(int(launcher.get("array_parallelism") or 256), jobs))
    if target.endswith("submitit_launcher.LocalLauncher"):
        return max(1, jobs)
    return 1


def sweep_position() -> tuple[int | None, int | None, int, frozenset[int]]:
    """(job index, number of jobs, how many run at once, the jobs kept from before) from Hydra;
    ``(None, None, 1, frozenset())`` outside a sweep."""
    if not HydraConfig.initialized():
        return None, None, 1, frozenset()
    hydra = HydraConfig.get()
    if str(hydra.mode) != "RunMode.MULTIRUN":
        return None, None, 1, frozenset()
    saved = Path(hydra.sweep.dir) / "multirun.yaml"
    if not saved.is_file():
        return int(hydra.job.num), None, 1, frozenset()
    sweep = OmegaConf.load(saved).hydra
    jobs = sweep_job_count(sweep.sweeper.get("params"), sweep.overrides.task)
    continued = any(
        override_key(o) == "continue_sweep" and o.split("=", 1)[1].strip().lower() == "true"
        for o in task_overrides(hydra)
    )
    kept = frozenset()
    if continued:
        from mrcnn.engine.launch import kept_job_numbers  # (light)

        # Known exactly where the sweep was continued (Hydra's basic launcher runs its jobs in that process); where
        # not (a cluster's job), the jobs after this one that hold results, all this job's time left needs.
        kept = kept_job_numbers() or finished_job_numbers(Path(hydra.sweep.dir), int(hydra.job.num))
    return int(hydra.job.num), jobs, jobs_at_once(sweep.get("launcher"), jobs), kept


def finished_job_numbers(sweep_dir: Path, after: int) -> frozenset[int]:
    """The numbers above ``after`` of the jobs whose folder in ``sweep_dir`` holds their results (``metrics.json``):
    in a continued sweep, jobs that finished before (a job after this one has not run in this start)."""
    numbers = set()
    for results in sweep_dir.rglob("metrics.json"):
        try:
            num = int(OmegaConf.load(results.parent / ".hydra" / "hydra.yaml").hydra.job.num)
        except Exception:  # noqa: BLE001  (a record not there or cut short)
            continue
        if num > after:
            numbers.add(num)
    return frozenset(numbers)


class SweepCostAtStart(Callback):
    """Hydra callback: when a sweep starts, logs jobs x steps x the recorded step time of its setting."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from mrcnn.engine.launch import finished_jobs  # (light: Hydra builds its callbacks from it too)

        jobs = sweep_job_count(config.hydra.sweeper.get("params"), config.hydra.overrides.task)
        # A continued sweep (continue_sweep=true) runs only the jobs it did not finish before.
        kept = finished_jobs() if config.get("continue_sweep") else 0
        step_time = OmegaConf.select(config, "callbacks.cost_estimate.step_time_s", default=None)
        note = OmegaConf.select(config, "callbacks.cost_estimate.step_time_note", default=None)
        at_once = jobs_at_once(config.hydra.get("launcher"), jobs - kept)
        source = note or "recorded for this setting"
        line = estimate_line(jobs - kept, None, planned_steps(config), 0, step_time, source, at_once)
        log.info(line + (f" ({kept} of the sweep's {jobs} jobs finished before: kept, not run again)" if kept else ""))
