"""Entry point: `python run.py [group=option ...] [key=value ...]`; `-m` sweeps. See README.md."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import mrcnn.config  # noqa: F401  (registers the config resolvers)
from mrcnn.predict import predict
from mrcnn.train import DDP_JOB_DIR_ENV, RESOLVED_CONFIG, evaluate, train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    modes = {"train": train, "evaluate": evaluate, "predict": predict}
    if cfg.mode not in modes:
        raise ValueError(f"mode must be one of {sorted(modes)}, got {cfg.mode!r}")
    metrics = modes[cfg.mode](cfg)
    # The returned value is what Hydra sweepers optimise.
    return metrics.get("segm_AP")


def pin_ddp_child_to_its_job() -> None:
    """In a DDP process that Lightning started for a job, run that job's resolved config and nothing else.

    Lightning's ``ddp`` strategy starts a job's other processes by re-running this script with the
    main process's command line (and ``LOCAL_RANK``). Under ``-m`` that command line is the whole
    sweep (Lightning issue 11300). The job's main process has written the job's resolved config and
    named the job folder in ``MRCNN_DDP_JOB_DIR`` (``mrcnn.train.job_scope``); here the command line
    is replaced by one that runs exactly that config, in that folder, without rewriting its ``.hydra``
    files, logging to ``ddp_rank<N>.log``.
    """
    job_dir = os.environ.get(DDP_JOB_DIR_ENV)
    if job_dir is None or "LOCAL_RANK" not in os.environ:
        return
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


if __name__ == "__main__":
    pin_ddp_child_to_its_job()
    main()
