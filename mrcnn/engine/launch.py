"""Hydra jobs and Lightning's DDP processes: one job's processes run exactly that job, and nothing leaks.

Lightning's ``ddp`` strategy starts the other processes of a job by re-running ``sys.argv`` with
``LOCAL_RANK`` set. Under ``python run.py -m`` that command line is the whole sweep, so each child
would run every job of the sweep (Lightning issue 11300). Both halves of the fix live here:
:func:`job_scope` (in the job's main process) writes the job's resolved config and names its folder
in ``MRCNN_DDP_JOB_DIR``; :func:`pin_ddp_child_to_its_job` (at the top of ``run.py``, in a child)
turns the child's command line into one that runs exactly that config.

A job's folder is its own: :class:`RunDirIsFree` (a Hydra callback, before Hydra writes there) and
:func:`check_run_dir_is_free` (at the start of each mode) stop a job whose folder holds another run's output,
unless the job resumes that run.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mrcnn.config import override_key, task_overrides
from mrcnn.engine import job_processes
from mrcnn.engine.config_checks import (
    newest_checkpoint,
    resume_checkpoint,
    resume_problem,
    slurm_restart_count,
    start_checkpoint,
)

log = logging.getLogger(__name__)

# Set by RunDirIsFree when SLURM requeued this job and its folder was not there at this start: the run started over,
# and a next start would too (why_a_requeued_start_starts_over).
_requeued_into_a_new_folder = False

# Set by RunDirIsFree when a job starts in a folder that holds a run's record (a resume into the run's own folder,
# a requeued job): the folder, its .hydra/*.yaml as that run left them, and its checkpoints' (name, size, mtime)
# then, for restore_run_record.
_kept_record: tuple[Path, dict[str, bytes], frozenset] | None = None

# Set by check_sweep_continues: {job folder: (its number, its .hydra/*.yaml)} of each job a continued sweep finished
# before.
_finished_records: dict[Path, tuple[int, dict[str, bytes]]] = {}

# A job's main process names its Hydra output folder here for the DDP children Lightning starts from
# it; run.py, started as such a child, runs <folder>/.hydra/<RESOLVED_CONFIG>.yaml.
DDP_JOB_DIR_ENV = "MRCNN_DDP_JOB_DIR"
RESOLVED_CONFIG = "resolved"
# What Lightning's process launcher sets in the main process's own environment.
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


@contextlib.contextmanager
def job_scope(cfg: DictConfig):
    """Runs one Hydra job so that its DDP processes run exactly it, and nothing of it leaks into the next job.

    Lightning's ``ddp`` strategy starts the other processes of a job by re-running ``sys.argv`` with
    ``LOCAL_RANK`` set. Under ``python run.py -m`` that command line is the whole sweep, so each child
    would run every job of the sweep (Lightning issue 11300). Instead, the job's main process writes its
    fully resolved config to ``<job dir>/.hydra/resolved.yaml`` and names the job folder in
    ``MRCNN_DDP_JOB_DIR``; ``run.py`` started as a child with that variable runs that config, in that
    folder, and nothing else. Under SLURM (or torchrun) the processes are created outside Lightning and
    each one composes the job itself, as usual.

    If the job fails in this process, the DDP processes Lightning started for it get a moment to end on their
    own and are then killed (:func:`mrcnn.engine.job_processes.stop_after_failure`): they may be waiting for this
    one, and in a sweep the next job needs their devices. If it succeeds in a sweep, they get the same moment to
    finish (:func:`mrcnn.engine.job_processes.end_after_success`). At the end of the job it finishes the W&B run (one run
    per sweep job), destroys the process group and restores the variables Lightning's launcher set in this
    process: with ``LOCAL_RANK`` left over, the next job of a sweep would take its processes to be started
    externally and wait for peers that never come.
    """
    import torch  # here, not at the top: run.py imports this module before Hydra composes (a typo fails fast)

    saved_env = {key: os.environ.get(key) for key in (*_LAUNCHER_ENV, DDP_JOB_DIR_ENV, job_processes.MAIN_PID_ENV)}
    threads = torch.get_num_threads()
    if HydraConfig.initialized() and DDP_JOB_DIR_ENV not in os.environ:
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        write_resolved_config(cfg, job_dir / ".hydra" / f"{RESOLVED_CONFIG}.yaml")
        os.environ[DDP_JOB_DIR_ENV] = str(job_dir)
        os.environ[job_processes.MAIN_PID_ENV] = str(os.getpid())
    job_processes.forget()
    failed = stopped = False
    try:
        yield
    except BaseException as error:
        failed, stopped = True, is_stop(error)
        raise
    finally:
        if failed:
            # First: the other processes may be waiting for this one in a collective, holding their GPUs, and
            # destroying an NCCL group can wait for its peers.
            job_processes.stop_after_failure(stopped=stopped)
        else:
            # The others have finished the job too, and may exit while this one finishes its W&B run: a non-zero
            # exit then is no reason for Lightning's observer to kill this process (in a sweep, the next job).
            job_processes.release_from_observer()
        wandb = sys.modules.get("wandb")  # only if something imported it
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=int(failed))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if not failed and in_sweep():
            # A sweep's next job needs the devices. After this process's side of the teardown: the others' may wait
            # for it (over NCCL). A single run does not wait: its processes end with it (exit_with_parent), and a
            # process's own exit takes a second or two (torch's libraries), here and there alike.
            job_processes.end_after_success()
        job_processes.forget()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(threads)


def is_stop(error: BaseException) -> bool:
    """Whether ``error`` ends a job stopped on purpose: Ctrl-C, or a signal's exit (``128 + signal number``, as
    ``mrcnn.engine.callbacks.TrainingInterrupted`` and a SIGTERM outside training exit), or Lightning's exit after
    a second Ctrl-C (``sys.exit(1)`` while handling the ``KeyboardInterrupt``)."""
    if isinstance(error, KeyboardInterrupt):
        return True
    if not isinstance(error, SystemExit):
        return False
    return (isinstance(error.code, int) and error.code > 128) or isinstance(error.__context__, KeyboardInterrupt)


def write_resolved_config(cfg: DictConfig, path: Path) -> None:
    """Writes ``cfg`` with every interpolation resolved (``${hydra:...}`` too), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several processes of one job may write the same file (e.g. SLURM tasks): write, then rename.
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(partial, path)


def pin_ddp_child_to_its_job() -> None:
    """In a DDP process that Lightning started for a job, run that job's resolved config and nothing else.

    Lightning's ``ddp`` strategy starts a job's other processes by re-running this script with the
    main process's command line (and ``LOCAL_RANK``). Under ``-m`` that command line is the whole
    sweep (Lightning issue 11300). The job's main process has written the job's resolved config and
    named the job folder in ``MRCNN_DDP_JOB_DIR`` (:func:`job_scope`); here the command line
    is replaced by one that runs exactly that config, in that folder, without rewriting its ``.hydra``
    files, logging to ``ddp_rank<N>.log`` (and to the console only its errors). The child ends when the main
    process dies, even by SIGKILL (:func:`mrcnn.engine.job_processes.exit_with_parent`).
    """
    if not is_ddp_child():
        return
    job_processes.exit_with_parent()
    job_dir = os.environ[DDP_JOB_DIR_ENV]
    # Quoted: a sweep job folder's name holds "=" and "," (Hydra's override_dirname).
    quoted_dir = '"' + job_dir.replace("\\", "\\\\").replace('"', '\\"') + '"'
    sys.argv = [
        sys.argv[0],
        f"--config-path={Path(job_dir) / '.hydra'}",
        f"--config-name={RESOLVED_CONFIG}",
        f"hydra.run.dir={quoted_dir}",
        "hydra.output_subdir=null",
        f"hydra.job.name=ddp_rank{os.environ['LOCAL_RANK']}",
        # Its log goes to that file whole, and to the console only from errors up: every process says the same
        # things (a warning of the config, each step of the run), which the main process prints already.
        "++hydra.job_logging.handlers.console.level=ERROR",
    ]


def port_in_use_message(error: BaseException) -> str | None:
    """What to do when a DDP job's main process cannot listen on its port (torch's ``DistNetworkError``, EADDRINUSE:
    another run or program holds ``MASTER_PORT``); ``None`` for any other error."""
    if type(error).__name__ != "DistNetworkError" or "EADDRINUSE" not in str(error):
        return None
    port = re.search(r"port: (\d+)", str(error))
    port = port.group(1) if port else os.environ.get("MASTER_PORT", "?")
    given = "MASTER_PORT" in os.environ
    return (
        f"DistNetworkError: port {port}{' (MASTER_PORT)' if given else ''} is in use on this machine, by another run "
        "or program, so the DDP processes cannot meet there: "
        + ("set MASTER_PORT to a free port, or unset it (Lightning then picks a free one)" if given else "try again")
    )


def is_ddp_child() -> bool:
    """Whether this process is a DDP process that Lightning started for a job (not the job's main process)."""
    # The job's main process has both variables too once Lightning has started the others (it sets LOCAL_RANK in
    # its own environment): it is the process whose id job_scope recorded.
    return (
        DDP_JOB_DIR_ENV in os.environ
        and "LOCAL_RANK" in os.environ
        and os.environ.get(job_processes.MAIN_PID_ENV) != str(os.getpid())
    )


# How many Lightning loops (a training's, a validation's) this process has started: a job that failed after its loop
# started keeps its folder (discard_unused_output), whose log holds what the run did until then.
_loops_started = 0


def note_loop_start() -> None:
    """Called as a training or validation loop starts (``MaskRCNNModule``): from here a job that fails keeps its
    folder, its log the record of what it did before (a loss that went non-finite at step 3: the user needs the
    log most then, and the folder holds nothing else until the loggers' first write)."""
    global _loops_started
    _loops_started += 1


def loops_started() -> int:
    """How many loops :func:`note_loop_start` has counted in this process (a sweep's jobs share one)."""
    return _loops_started


def record_failure_in_log(error: BaseException) -> None:
    """Writes the error that ended a job into its log file (Hydra's ``<job>.log``), and nowhere else: the terminal
    shows it already, with its traceback. A folder kept after a failure then says how its run ended."""
    record = logging.LogRecord(
        __name__, logging.ERROR, __file__, 0, "failed: %s: %s", (type(error).__name__, error), None
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def discard_unused_output(job_dir: Path) -> bool:
    """Removes a job's output folder that holds nothing but Hydra's own files (``.hydra/``, ``*.log``) and the CSV
    logger's copy of the config (``csv/hparams.yaml``, written when training starts).

    Called when a job fails before it wrote anything and before its loop started (a typo, a missing file, too few
    images for a batch; :func:`note_loop_start`): the user is left with the error, not with an empty
    ``outputs/<date>/<time>/``. A folder that holds anything else (metrics, checkpoints, an earlier run's files) is
    kept. The folders above it inside the working directory (``outputs/<date>/``) go too while that leaves them
    empty.

    Only a job's main process cleans up: a DDP child shares the job's folder, where the processes started
    after it still read ``.hydra/resolved.yaml``.

    Returns:
        Whether the folder was removed.
    """
    job_dir = Path(job_dir)
    if is_ddp_child() or not job_dir.is_dir():
        return False
    for path in job_dir.iterdir():
        if not (path.name == ".hydra" or (path.is_file() and path.suffix == ".log") or _only_hparams(path)):
            return False
    shutil.rmtree(job_dir)
    # Then the folders Hydra made above it (outputs/<date>/), while empty and inside the working directory.
    cwd = Path.cwd().resolve()
    for parent in job_dir.resolve().parents:
        if parent == cwd or cwd not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: other runs
            break
    return True


def keep_run_record(run_dir: str | Path) -> None:
    """Remembers the record of the run in ``run_dir`` (``.hydra/*.yaml``) before Hydra rewrites it for this job, and
    the state of its checkpoints, for :func:`restore_run_record`; nothing when the folder holds no record."""
    global _kept_record
    run_dir = Path(run_dir).resolve()  # the job may change its working folder (hydra.job.chdir)
    record = run_dir / ".hydra"
    files = {path.name: path.read_bytes() for path in record.glob("*.yaml")} if record.is_dir() else {}
    _kept_record = (run_dir, files, _checkpoint_state(run_dir)) if files else None


def restore_run_record(run_dir: str | Path) -> bool:
    """Puts back the record of the run a failed job continued in its folder (:func:`keep_run_record`), when the job
    saved no checkpoint there.

    Hydra writes a job's record (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``) before the job starts.
    A job that resumes the run of its own folder and fails before saving anything (its config differs from the
    run's and is refused, a typo in a file, Ctrl-C before the first step) would leave the run described by its
    command: the run's own overrides, which the sweep report and the next resume read, would be lost. A job that
    saved a checkpoint has continued the run, and its record stands.

    Returns:
        Whether the record was put back: the folder is that run's, and must stay (not
        :func:`discard_unused_output`'s to remove).
    """
    global _kept_record
    kept, _kept_record = _kept_record, None
    if kept is None or is_ddp_child() or Path(run_dir).resolve() != kept[0]:
        return False
    folder, files, checkpoints = kept
    record = folder / ".hydra"
    if not record.is_dir() or _checkpoint_state(folder) != checkpoints:
        return False
    for path in record.glob("*.yaml"):
        if path.name not in files:
            path.unlink()  # written by this job alone
    for name, content in files.items():
        (record / name).write_bytes(content)
    return True


def _checkpoint_state(run_dir: Path) -> frozenset:
    """(name, size, mtime) of each file in ``run_dir/checkpoints``: changes when a checkpoint is saved there."""
    folder = run_dir / "checkpoints"
    files = folder.iterdir() if folder.is_dir() else ()
    return frozenset((path.name, path.lstat().st_size, path.lstat().st_mtime_ns) for path in files)


def _only_hparams(path: Path) -> bool:
    """Whether ``path`` is the CSV logger's folder holding nothing but ``hparams.yaml`` (no logged step)."""
    return path.name == "csv" and path.is_dir() and [p.name for p in path.iterdir()] in ([], ["hparams.yaml"])


# What a run leaves in its folder that a new run there would write over: its checkpoints, its CSV log (Lightning's
# CSVLogger deletes an old metrics.csv when it saves a new one) and its final metrics.
RUN_OUTPUTS = ("checkpoints/*.ckpt", "csv/metrics.csv", "metrics.json")


def check_run_dir_is_free(
    run_dir: str | Path,
    mode: str = "train",
    ckpt_path: str | Path | None = None,
    sweep_job: bool = False,
    again: bool = False,
) -> None:
    """Stops a job whose folder (``hydra.run.dir``) holds another run's output, before the job writes there.

    Hydra gives every run a new folder; one named with ``hydra.run.dir`` may hold a run already (the resume command
    without its ``resume=``). Lightning would only warn, then write over that run's checkpoints and delete its CSV
    log, and Hydra over its ``.hydra`` record. Resuming a checkpoint of the folder's own run (``resume=<run_dir>``, or
    ``ckpt_path=`` inside it) in ``mode=train`` continues that run and is allowed; evaluating or predicting writes a
    job's own record there, so they need another folder.

    Only the job's first process checks (:func:`is_first_process`): it is the one that writes these files, and a
    resumed run's first process writes the continued ``csv/metrics.csv`` before the others (started by Lightning
    at ``fit``, or by SLURM at any time) would reach their check.

    Args:
        run_dir: the job's folder.
        mode: ``train``, ``evaluate`` or ``predict``.
        ckpt_path: the Lightning checkpoint the job starts from, if any.
        sweep_job: the job is one of a sweep's (its folder is below ``hydra.sweep.dir``): the message says so.
        again: the job is started again in its own folder to go on with its run (a sweep continued with
            ``continue_sweep=true``): what the folder holds is its own.

    Raises:
        FileExistsError: naming the folder, what it holds and the ways on.
    """
    run_dir = Path(run_dir)
    if not is_first_process():
        return
    found = _outputs(run_dir, Path.glob)
    if not found:
        return
    if mode == "train" and continues_its_folder(run_dir, ckpt_path):
        return  # the folder's own run, continued
    if again:
        return  # a job of a continued sweep: its folder's output is its own earlier start's
    if mode == "train" and slurm_restart_count():
        # Requeued by SLURM (the same command again) with no last.ckpt to continue from (checkpoint_path would have
        # chosen it): its first start stopped before its first save, and this is that run's own output, which it
        # writes again (mrcnn.engine.train.train says so).
        return
    if mode == "train":
        harm = "a new run there would write over them (Lightning deletes the old csv/metrics.csv)"
        if resume_checkpoint(run_dir).is_file():
            ways = f"Continue that run with resume={run_dir} hydra.run.dir={run_dir}, or write"
        elif (newest := newest_checkpoint(run_dir)) is not None:
            # No last.ckpt: a run without the LastCheckpoint callback, or it was removed.
            ways = f"Continue that run from its newest checkpoint with ckpt_path={newest} hydra.run.dir={run_dir}, or write"
        elif not (run_dir / "metrics.json").exists():
            # Stopped before its first save (a second Ctrl-C, a crash): resume= would find nothing to continue.
            ways = "That run saved no checkpoint to continue from: delete the folder to start again there, or write"
        else:
            ways = "Write"
    else:
        harm = f"mode={mode} would write its own record over that run's"
        ways = "Write"
    if sweep_job:
        ways = "Write the sweep"
    raise FileExistsError(
        f"the job's folder {run_dir} holds another run's output ({found}): {harm}. {ways} to a new folder: leave "
        f"{'hydra.sweep.dir' if sweep_job else 'hydra.run.dir'} out, or name an empty one."
    )


def continues_its_folder(run_dir: str | Path, ckpt_path: str | Path | None) -> bool:
    """Whether the checkpoint a job starts from is inside the job's folder: the job continues that folder's run."""
    return ckpt_path is not None and Path(run_dir).resolve() in Path(ckpt_path).resolve().parents


def _outputs(folder: Path, glob) -> str:
    """What ``folder`` holds of :data:`RUN_OUTPUTS` (``glob``: ``Path.glob``, or ``Path.rglob`` for every depth), the
    first three named; ``""`` if nothing."""
    found = sorted(str(path.relative_to(folder)) for pattern in RUN_OUTPUTS for path in glob(folder, pattern))
    return ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")


def is_first_process() -> bool:
    """Whether this process is its job's first (global rank 0), read from the variables launchers set: Lightning's
    children (``LOCAL_RANK``, ``NODE_RANK``), SLURM's tasks (``SLURM_PROCID``), torchrun's processes (``RANK``)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in _RANK_ENV)


# Variables that give a process's rank (or its node's) before a Trainer exists; in a job's first process none is set
# or each is 0.
_RANK_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def requeue_after_stop(trained: bool) -> str | None:
    """After a training job stopped by SIGUSR2 saved ``last.ckpt``: requeues the SLURM job, where its next start
    continues this run (:func:`requeue_slurm_job`). Called by the job's first process.

    SIGUSR2 is the notice SLURM sends before a job's time limit where asked to (the SLURM launcher's
    ``signal_delay_s``, ``#SBATCH --signal=USR2@<seconds>``); ``scancel`` and a preemption send SIGTERM (SLURM
    requeues a preempted job itself where it is set to). A job is not requeued, the reason logged, where its next
    start would not continue from this ``last.ckpt`` (:func:`why_a_requeued_start_starts_over`), or where it trained
    no step since this start (it would stop the same way at every start).

    Args:
        trained: a step was trained since this start.

    Returns:
        The requeued job's id, or ``None``.
    """
    why = why_a_requeued_start_starts_over()
    if not why and not trained:
        why = "it trained no step since it started, and would stop the same way at every start"
    if why:
        log.warning("not requeued: %s", why)
        return None
    return requeue_slurm_job()


def why_a_requeued_start_starts_over() -> str:
    """Why a start of this job that SLURM requeued would not continue from this start's folder; ``""`` if it would.

    Under the SLURM launcher (submitit) SLURM starts the same job again in its folder. A job script runs its command
    again: a single run (``python run.py``) names the same folder when ``hydra.run.dir`` is not named by the time,
    and did so at this start if this start found its folder from the last one (:class:`RunDirIsFree` looks: a
    folder named in the job script by ``$(date)``, or one that ``claim_timed_run_dir`` renamed, is new each time).
    """
    from hydra.types import RunMode

    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        return ""
    if not HydraConfig.initialized():
        return "this process runs no Hydra job"
    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN:
        return (
            "a sweep run by Hydra's basic launcher would start again as a whole (hydra/launcher=slurm requeues each "
            "job on its own)"
        )
    if _requeued_into_a_new_folder or "${now:" in str(OmegaConf.to_container(hydra.run, resolve=False)["dir"]):
        return (
            "its folder is new at each start (hydra.run.dir named by the time), so a requeued start would train from "
            "the start in a new one: name it in the job script (hydra.run.dir=<path>)"
        )
    return ""


def requeue_slurm_job() -> str | None:
    """Asks SLURM to requeue the job this process runs in (``scontrol requeue``), as submitit and Lightning do.

    SLURM ends the job's processes and starts the job again once it is scheduled; that start continues from its
    folder's ``last.ckpt`` (:func:`mrcnn.engine.config_checks.requeued_checkpoint`). A task of a job array is
    named ``<array job>_<task>``.

    Returns:
        The job's id, or ``None`` outside SLURM or where ``scontrol`` failed (a job submitted with ``--no-requeue``,
        a cluster that allows no requeue, no ``scontrol`` on the node): the reason is logged.
    """
    job = slurm_job_id()
    if not job:
        return None
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
    except subprocess.CalledProcessError as error:
        log.error("scontrol requeue %s failed (exit %d): %s", job, error.returncode, error.stderr.strip())
        return None
    except (OSError, subprocess.TimeoutExpired) as error:
        log.error("scontrol requeue %s failed: %s", job, error)
        return None
    return job


def slurm_job_id() -> str | None:
    """This SLURM job's id as ``scontrol`` takes it (``<array job>_<task>`` for a task of a job array); ``None``
    outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID") or None


def outlive_the_requeue_sigterm() -> None:
    """Once this job asked SLURM to requeue it: ignores the SIGTERM SLURM then sends the job's processes, so they
    finish their stop (the loggers' last rows, the W&B run, the other processes' exits) until SLURM's SIGKILL,
    ``KillWait`` (30 s by default) later. Lightning's SIGTERM handler would kill the DDP children and broadcast from
    inside the handler; Python's default would end the process at once, with 143."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def continue_sweep_command() -> str | None:
    """In a job of a sweep: the command that continues the whole sweep (its own overrides, from its ``multirun.yaml``,
    with ``hydra.sweep.dir=<its folder> continue_sweep=true``); ``None`` outside one, or without that file."""
    if not in_sweep():
        return None
    import shlex

    from mrcnn.engine.checkpoints import hydra_quoted

    sweep_dir = Path(HydraConfig.get().runtime.cwd, HydraConfig.get().sweep.dir)
    try:
        overrides = task_overrides(OmegaConf.load(sweep_dir / "multirun.yaml").hydra)
    except Exception:  # noqa: BLE001  (not there, or not readable)
        return None
    words = without_continue_sweep(overrides)
    words += [f"hydra.sweep.dir={hydra_quoted(str(sweep_dir))}", "continue_sweep=true"]
    return "python run.py -m " + " ".join(shlex.quote(word) for word in words)


def continue_sweep_sentence() -> str | None:
    """In a job of a sweep: "Continue the sweep (this job, and those after it) with: <the command>", as every stop
    message gives it (:func:`continue_sweep_command`); ``None`` outside one."""
    command = continue_sweep_command()
    return None if command is None else f"Continue the sweep (this job, and those after it) with: {command}"


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra sweep (``-m``, or an experiment that sweeps)."""
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class RunDirIsFree(Callback):
    """Hydra callback: stops a command whose folder holds a run's output, before Hydra writes its record there.

    Hydra calls it with the composed config, once the command line, the config files and their interpolations have
    set the folder (``hydra.run.dir``; ``hydra.sweep.dir`` for a sweep), ``mode``, ``resume`` and ``ckpt_path``, and
    before it creates the folder, writes ``.hydra/`` or ``multirun.yaml`` there and opens the log. Commands that only
    print (``--cfg``, ``--help``, ``--info``) start no run and are not checked.

    A single job is checked by :func:`check_run_dir_is_free`. A sweep into a folder that holds any run's output, at
    any depth, is refused: the new jobs' folders would be the old ones. Each sweep job checks its own folder again
    when its mode starts (a sweep's job folders are known only then). DDP children and a job's other processes pass
    (:func:`is_first_process`).

    A refusal exits with its message (as ``sys.exit`` does), not with a traceback from inside Hydra.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        global _requeued_into_a_new_folder
        if config.get("continue_sweep") and not is_ddp_child():
            sys.exit(
                "ValueError: continue_sweep=true continues a stopped sweep (-m, or an experiment that sweeps) in its "
                "folder, hydra.sweep.dir; a single run continues with resume=<its folder> hydra.run.dir=<its folder>"
            )
        resume, mode = config.get("resume"), config.get("mode", "train")
        if resume and not is_ddp_child() and not Path(str(resume)).exists():
            # Answered before Hydra creates the run's folder: with hydra.run.dir=<the same path>, as the stop message's
            # command gives it, a mistyped path would by then be a new folder, taken for a run stopped before its
            # first checkpoint.
            sys.exit(f"FileNotFoundError: {resume_problem(str(resume))}")
        claim_timed_run_dir(config)
        run_dir = str(config.hydra.run.dir)
        # Hydra writes its record there next: a folder without one is new to this job.
        _requeued_into_a_new_folder = bool(slurm_restart_count()) and not (Path(run_dir) / ".hydra").is_dir()
        # From hydra.run.dir: config.run_dir does not resolve before the job.
        ckpt_path = start_checkpoint(run_dir, mode, resume, config.get("ckpt_path"))
        _exit_if_refused(check_run_dir_is_free, run_dir, mode, ckpt_path)
        if is_first_process():
            keep_run_record(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.get("continue_sweep"):
            _exit_if_refused(check_sweep_continues, str(config.hydra.sweep.dir), config)
        else:
            _exit_if_refused(check_sweep_dir_is_free, str(config.hydra.sweep.dir))


def claim_timed_run_dir(config: DictConfig) -> None:
    """Makes a run's folder named by the time it started (``outputs/<date>/<H-M-S>``) its own, before Hydra uses it.

    Two runs started within the same second (``for s in 0 1 2; do python run.py seed=$s & done``) compose the same
    folder, and neither holds any output yet for :func:`check_run_dir_is_free` to see: they would write over each
    other's record, checkpoints and metrics. The folder is created here, by one atomic ``mkdir``; a run that finds it
    taken takes ``<H-M-S>-2`` (then ``-3``, ...) and ``hydra.run.dir`` is set to it. A folder named without the time
    (``hydra.run.dir=<path>``, a resume) is left to :func:`check_run_dir_is_free`; so is every process but the job's
    first (DDP children run in their job's folder).
    """
    if not is_first_process() or "${now:" not in str(OmegaConf.to_container(config.hydra.run, resolve=False)["dir"]):
        return
    composed = Path(str(config.hydra.run.dir))
    for number in range(1, 1000):
        candidate = composed if number == 1 else composed.with_name(f"{composed.name}-{number}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        if candidate != composed:
            log.warning("%s was taken by a run started in the same second: this run writes to %s", composed, candidate)
            with open_dict(config), read_write(config):
                config.hydra.run.dir = str(candidate)
        return


def check_sweep_dir_is_free(sweep_dir: str | Path) -> None:
    """Stops a sweep into a folder that holds any run's output (at any depth: Hydra's job subfolders may nest).

    Raises:
        FileExistsError: naming the folder and what it holds.
    """
    sweep_dir = Path(sweep_dir)
    if not is_first_process():
        return
    found = _outputs(sweep_dir, Path.rglob)
    if found:
        raise FileExistsError(
            f"hydra.sweep.dir={sweep_dir} holds runs' output ({found}): a new sweep there would write over them and "
            "its multirun.yaml. Write to a new folder: leave hydra.sweep.dir out, or name an empty one."
        )


def check_sweep_continues(sweep_dir: str | Path, config: DictConfig) -> None:
    """Stops ``continue_sweep=true`` unless ``sweep_dir`` holds a sweep of the same command (its ``multirun.yaml``)
    whose every job folder ran the job this sweep gives its number (its ``.hydra/hydra.yaml``): a job finds its own
    folder by its number, and a finished one is kept as it is. Remembers the record of each finished job, which
    Hydra rewrites before the job starts (:func:`finished_earlier` puts it back).

    Raises:
        FileExistsError: naming the folder and what differs.
    """
    global _finished_records
    sweep_dir = Path(sweep_dir)
    if not is_first_process():
        return
    recorded = sweep_dir / "multirun.yaml"
    if not recorded.is_file():
        raise FileExistsError(
            f"continue_sweep=true: hydra.sweep.dir={sweep_dir} holds no sweep to continue (no multirun.yaml); name the "
            "folder of the stopped sweep (multirun/<date>/<time>, or multirun/<experiment>/<time>)"
        )
    try:
        earlier = task_overrides(OmegaConf.load(recorded).hydra)
    except Exception as error:  # noqa: BLE001  (not yaml, or no hydra.overrides.task in it)
        raise FileExistsError(f"continue_sweep=true: cannot read the sweep's command in {recorded} ({error})") from None
    earlier = without_continue_sweep(earlier)
    now = without_continue_sweep(task_overrides(config.hydra))
    if earlier != now:
        raise FileExistsError(
            f"continue_sweep=true: the sweep in {sweep_dir} ran with the overrides {' '.join(earlier)}, this command "
            f"gives {' '.join(now)}: continue it with its own (its jobs are found by their numbers), or start a new "
            "sweep in a new folder"
        )
    from hydra.core.global_hydra import GlobalHydra

    from mrcnn.engine.sweep_cost import sweep_jobs

    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    planned = sweep_jobs(config.hydra.sweeper.get("params"), config.hydra.overrides.task, loader)
    _finished_records = {}
    for record in sorted(sweep_dir.rglob(".hydra/hydra.yaml")):
        job_dir = record.parent.parent
        try:
            job = OmegaConf.load(record).hydra
            num, ran = int(job.job.num), without_continue_sweep(task_overrides(job))
        except Exception:  # noqa: BLE001  (a record cut short: the job never started)
            continue
        wanted = without_continue_sweep(planned[num]) if num < len(planned) else None
        if ran != wanted:
            raise FileExistsError(
                f"continue_sweep=true: {job_dir} ran job #{num} with {' '.join(ran)}, which is "
                + (
                    f"#{num} {' '.join(wanted)} now"
                    if wanted is not None
                    else f"beyond this sweep's {len(planned)} jobs"
                )
                + " (the sweep's parameters in its config changed since): start a new sweep in a new folder"
            )
        if (job_dir / "metrics.json").is_file():
            files = {path.name: path.read_bytes() for path in record.parent.glob("*.yaml")}
            _finished_records[job_dir.resolve()] = num, files


def without_continue_sweep(overrides) -> list[str]:
    """A sweep's overrides but ``continue_sweep=true``, which its continued start adds to those of the first."""
    return [str(o) for o in overrides if override_key(str(o)) != "continue_sweep"]


def finished_jobs() -> int:
    """How many jobs the sweep continued with ``continue_sweep=true`` finished before (:func:`check_sweep_continues`
    found them)."""
    return len(_finished_records)


def kept_job_numbers() -> frozenset[int]:
    """The numbers of the jobs the sweep continued with ``continue_sweep=true`` in this process finished before."""
    return frozenset(num for num, _ in _finished_records.values())


def finished_earlier(cfg: DictConfig) -> dict | None:
    """In a sweep continued with ``continue_sweep=true``: the metrics of this job when it finished in the sweep's
    earlier start (its folder's ``metrics.json``), else ``None``: the job runs."""
    if not cfg.get("continue_sweep") or not HydraConfig.initialized():
        return None
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    path = job_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):  # not there, or cut short: the job did not finish
        return None
    # Hydra has written this start's record over the job's: the one it finished with goes back.
    for name, content in _finished_records.get(job_dir.resolve(), (None, {}))[1].items():
        (job_dir / ".hydra" / name).write_bytes(content)
    log.info("job %s finished when the sweep ran before (%s): kept, not run again", HydraConfig.get().job.num, path)
    return metrics


def _exit_if_refused(check, *args) -> None:
    """Runs ``check(*args)``; a refusal ends the command with its message, as ``sys.exit`` does.

    Raised inside a Hydra callback, the error would come with Hydra's traceback of its own frames; the message is
    all the user needs. Any other error of the check stops the command too: Hydra would only warn of an error in a
    callback and go on, into the folder the check was to keep.
    """
    try:
        check(*args)
    except Exception as error:  # noqa: BLE001
        sys.exit(f"{type(error).__name__}: {error}")
