"""Hydra jobs and Lightning's DDP processes: one job's processes run exactly that job, and nothing leaks.

Lightning's ``ddp`` strategy starts the other processes of a job by re-running ``sys.argv`` with
``LOCAL_RANK`` set. Under ``python run.py -m`` that command line is the whole sweep, so each child
would run every job of the sweep (Lightning issue 11300). Both halves of the fix live here:
:func:`job_scope` (in the job's main process) writes the job's resolved config and names its folder
in ``MRCNN_DDP_JOB_DIR``; :func:`pin_ddp_child_to_its_job` (at the top of ``run.py``, in a child)
turns the child's command line into one that runs exactly that config.
"""

import contextlib
import os
import shutil
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

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

    At the end of the job it finishes the W&B run (one run per sweep job), destroys the process group
    and restores the variables Lightning's launcher set in this process: with ``LOCAL_RANK`` left over,
    the next job of a sweep would take its processes to be started externally and wait for peers that
    never come.
    """
    import torch  # here, not at the top: run.py imports this module before Hydra composes (a typo fails fast)

    saved_env = {key: os.environ.get(key) for key in (*_LAUNCHER_ENV, DDP_JOB_DIR_ENV)}
    threads = torch.get_num_threads()
    if HydraConfig.initialized() and DDP_JOB_DIR_ENV not in os.environ:
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        write_resolved_config(cfg, job_dir / ".hydra" / f"{RESOLVED_CONFIG}.yaml")
        os.environ[DDP_JOB_DIR_ENV] = str(job_dir)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        wandb = sys.modules.get("wandb")  # only if something imported it
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=int(failed))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(threads)


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
    files, logging to ``ddp_rank<N>.log``.
    """
    if not is_ddp_child():
        return
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
    ]


def is_ddp_child() -> bool:
    """Whether this process is a DDP process that Lightning started for a job (not the job's main process)."""
    return DDP_JOB_DIR_ENV in os.environ and "LOCAL_RANK" in os.environ


def discard_unused_output(job_dir: Path) -> bool:
    """Removes a job's output folder that holds nothing but Hydra's own files (``.hydra/``, ``*.log``).

    Called when a job fails before it wrote anything (a typo, a missing file): the user is left
    with the error, not with an empty ``outputs/<date>/<time>/``. A folder that holds anything else
    (metrics, checkpoints, an earlier run's files) is kept. The folders above it inside the working
    directory (``outputs/<date>/``) go too while that leaves them empty.

    Only a job's main process cleans up: a DDP child shares the job's folder, where the processes started
    after it still read ``.hydra/resolved.yaml``.

    Returns:
        Whether the folder was removed.
    """
    job_dir = Path(job_dir)
    if is_ddp_child() or not job_dir.is_dir():
        return False
    for path in job_dir.iterdir():
        if not (path.name == ".hydra" or (path.is_file() and path.suffix == ".log")):
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
