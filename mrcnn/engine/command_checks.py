"""The checks that answer a mistake in the command before anything is built: one job's (:func:`check_command`, which
``run.py`` runs first in every job), and every job of a sweep's before the first one starts (:class:`SweepJobsPass`,
a Hydra callback).

Without the second, a sweep runs its jobs one after another and a mistake in one variant (``-m data.min_size=800,-5``,
a missing file that only one option reads) surfaces when that job starts, after the jobs before it have trained:
hours later at the paper's setting. Hydra itself composes every job before the first (so an unknown key is answered
at once), but it does not run the project's own checks.

Like ``run.py``'s first lines, this module loads neither torch nor Lightning.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from mrcnn.config import (
    check_ablation_overrides,
    check_added_keys,
    check_model_contract,
    hydra_group_options,
    task_overrides,
)
from mrcnn.engine.config_checks import check_config
from mrcnn.engine.sweep_cost import sweep_jobs

log = logging.getLogger(__name__)

MODES = ("train", "evaluate", "predict")

# The errors a check raises for a mistake in the command (the checks of mrcnn.config and mrcnn.engine.config_checks).
COMMAND_ERRORS = (ValueError, FileNotFoundError, RuntimeError)

# Launchers that run a sweep's jobs on the machine that starts the sweep. Elsewhere (a SLURM cluster's nodes) the
# data, the weights and the GPUs a job needs are those of another machine, and only the config itself is checked.
LOCAL_LAUNCHERS = ("BasicLauncher", "submitit_launcher.LocalLauncher", "joblib_launcher.JoblibLauncher")


def check_command(cfg: DictConfig, hydra_cfg: DictConfig, on_this_machine: bool = True) -> None:
    """Stops a job whose command holds a mistake: a model that breaks its contract, a key added with ``+`` that
    nothing reads, an ablation switch given as a plain override, an unknown mode, a value that breaks its rule, a
    mistyped ``_target_``; and, ``on_this_machine``, an input file that is not there or a GPU that is not here.

    Args:
        cfg: the job's composed config, without its ``hydra`` node.
        hydra_cfg: the job's ``hydra`` node (``HydraConfig.get()`` in a job).
        on_this_machine: whether the job runs here (see :func:`mrcnn.engine.config_checks.check_config`).

    Raises:
        ValueError, FileNotFoundError, RuntimeError: naming the mistake (:data:`COMMAND_ERRORS`).
    """
    check_launcher(hydra_cfg)
    check_model_contract(cfg)
    check_added_keys(
        cfg,
        task_overrides(hydra_cfg),
        hydra_group_options,
        hydra_cfg.runtime.choices,
        recompose=lambda overrides: compose(config_name=hydra_cfg.job.config_name, overrides=overrides),
        hydra_cfg=hydra_cfg,
    )
    check_ablation_overrides(hydra_cfg.runtime.choices, task_overrides(hydra_cfg))
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {cfg.mode!r}")
    check_config(cfg, on_this_machine=on_this_machine)


def check_launcher(hydra_cfg: DictConfig) -> None:
    """Stops a single job (no ``-m``) given a launcher that runs jobs elsewhere: Hydra uses a launcher for a sweep's
    jobs only, and the job would train here, on the machine that was to submit it (a cluster's login node).

    Raises:
        ValueError: naming the launcher and the ``-m`` that submits the job.
    """
    launcher = hydra_cfg.get("launcher")
    if str(hydra_cfg.get("mode")).rpartition(".")[2] != "RUN" or runs_here(launcher) or launcher is None:
        return
    choice = (hydra_cfg.get("runtime") or {}).get("choices", {}).get("hydra/launcher")
    name = f"hydra/launcher={choice}" if choice else f"hydra.launcher._target_={launcher.get('_target_')}"
    raise ValueError(
        f"{name} launches the jobs of a sweep, and this command is a single run, which Hydra runs here, on this "
        "machine: add -m to submit it (a sweep of one job; an experiment= sweeps by itself)"
    )


def runs_here(launcher: Mapping | None) -> bool:
    """Whether a sweep's ``hydra.launcher`` runs its jobs on this machine (:data:`LOCAL_LAUNCHERS`)."""
    target = str((launcher or {}).get("_target_", ""))
    return target.endswith(LOCAL_LAUNCHERS)


class SweepJobsPass(Callback):
    """Hydra callback: when a sweep starts, runs :func:`check_command` on every job's config, and stops the sweep
    before its first job when any would fail, naming each such job by its number and overrides.

    Only sweeps of Hydra's basic sweeper are checked, whose jobs are known when it starts (a sweeper that picks
    each job from the results of the last, such as Optuna's, is not). A job is composed as the launcher will
    compose it (Hydra's ``load_sweep_config``, with its number and folder): one Hydra cannot compose (an option that
    does not exist) is named with Hydra's message, before the sweeper writes its folder. A job still runs its
    checks again when it starts. With a launcher that runs the jobs on other machines (:func:`runs_here`), files
    and GPUs are not looked for here.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return
        start = time.perf_counter()
        loader = GlobalHydra.instance().config_loader()
        on_this_machine = runs_here(config.hydra.get("launcher"))
        failures: dict[str, list[str]] = {}  # message -> the jobs ("#<num> <overrides>") it stops
        sweep_hydra_cfg = HydraConfig.instance().cfg
        try:
            jobs = sweep_jobs(config.hydra.sweeper.get("params"), config.hydra.overrides.task, loader)
        except Exception:  # noqa: BLE001
            return  # a sweep Hydra cannot parse: the sweeper's own check, next, says so in Hydra's words
        try:
            for num, overrides in enumerate(jobs):
                # As the command wrote them: Hydra's sweeper escapes an interpolation's characters (\$\{oc.env\:X\}).
                written = " ".join(_HYDRA_ESCAPE.sub(r"\1", override) for override in overrides)
                name = f"#{num} {written}".rstrip()
                try:
                    job_config = job_config_of(loader, config, overrides, num)
                except Exception as error:  # noqa: BLE001  (an option or a key that does not exist, a bad value)
                    failures.setdefault(f"{type(error).__name__}: {_hydra_message(error)}", []).append(name)
                    continue
                HydraConfig.instance().set_config(job_config)
                task_config = copy.deepcopy(job_config)
                with read_write(task_config), open_dict(task_config):
                    del task_config["hydra"]
                try:
                    check_command(task_config, job_config.hydra, on_this_machine)
                except Exception as error:  # noqa: BLE001  (any: Hydra would only warn of it, and start the sweep)
                    failures.setdefault(f"{type(error).__name__}: {error}", []).append(name)
        finally:
            HydraConfig.instance().cfg = sweep_hydra_cfg
        log.debug("checked the configs of %d sweep jobs in %.2f s", len(jobs), time.perf_counter() - start)
        if failures:
            raise SystemExit(failures_message(failures, len(jobs)))


_HYDRA_ESCAPE = re.compile(r"\\(.)")


def job_config_of(loader, sweep_config: DictConfig, overrides: Sequence[str], num: int) -> DictConfig:
    """Job ``num`` of a sweep, composed as Hydra's launchers compose it (``load_sweep_config``, then its number),
    with its output folder set as ``hydra.core.utils.run_job`` sets it (``run_dir`` reads it), not created."""
    job_config = loader.load_sweep_config(sweep_config, list(overrides))
    with open_dict(job_config):
        job_config.hydra.job.id = num
        job_config.hydra.job.num = num
    output_dir = os.path.join(str(job_config.hydra.sweep.dir), str(job_config.hydra.sweep.subdir))
    with read_write(job_config.hydra.runtime), open_dict(job_config.hydra.runtime):
        job_config.hydra.runtime.output_dir = os.path.abspath(output_dir)
    return job_config


def _hydra_message(error: Exception) -> str:
    """Hydra's message for a config it cannot compose, without the config search path it appends."""
    return str(error).split("\nConfig search path:")[0].rstrip()


def failures_message(failures: Mapping[str, Sequence[str]], jobs: int) -> str:
    """The message a sweep stops with: each mistake once, under the jobs it stops."""
    failing = sum(len(names) for names in failures.values())
    lines = [f"{failing} of the sweep's {jobs} jobs would fail, so none was started:"]
    for message, names in failures.items():
        lines.append("  " + ("every job" if len(names) == jobs and jobs > 1 else ", ".join(names)) + ":")
        lines.extend("    " + line for line in message.splitlines())
    return "\n".join(lines)
