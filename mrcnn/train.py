"""Turn a composed Hydra config into a datamodule, a LightningModule and a Trainer, and run them."""

import contextlib
import json
import logging
import netrc
import os
import pickle
import sys
from pathlib import Path
from urllib.parse import urlsplit

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import ParallelStrategy
from omegaconf import DictConfig, OmegaConf

import mrcnn.config  # noqa: F401  (registers the config resolvers)
from mrcnn.modeling.mask_rcnn import load_torchvision_weights

log = logging.getLogger(__name__)

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# A job's main process names its Hydra output folder here for the DDP children Lightning starts from
# it; run.py, started as such a child, runs <folder>/.hydra/<RESOLVED_CONFIG>.yaml (see job_scope).
DDP_JOB_DIR_ENV = "MRCNN_DDP_JOB_DIR"
RESOLVED_CONFIG = "resolved"
# What Lightning's process launcher sets in the main process's own environment.
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


# ---- one job ------------------------------------------------------------------------------


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


# ---- building -----------------------------------------------------------------------------


def build(cfg: DictConfig):
    """Instantiate (datamodule, module, trainer) from a composed config."""
    datamodule = instantiate(cfg.data.datamodule)
    module = build_module(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or [])]
    loggers = [instantiate_logger(c, cfg) for c in (cfg.get("logger") or [])]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_sync_batchnorm(module, trainer, converts_batchnorm=bool(cfg.trainer.get("sync_batchnorm")))
    for logger in trainer.loggers:
        if type(logger).__name__ != "WandbLogger":  # W&B got the config at init (instantiate_logger)
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return datamodule, module, trainer


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The LightningModule, with ``weights`` (a torchvision Mask R-CNN state dict file) loaded when given."""
    module = instantiate(cfg.module)
    if cfg.get("weights"):
        load_weights(module.model, cfg.weights)
    return module


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Loads a torchvision Mask R-CNN state dict file (e.g. torchvision's COCO ``maskrcnn_resnet50_fpn``).

    Raises:
        ValueError: the file is a Lightning checkpoint, or does not match the configured model
            (the message names the file and the mismatched keys).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"weights={path} is not a plain state dict (torch.save(model.state_dict())); "
            "a Lightning checkpoint goes in ckpt_path=..."
        ) from error
    if isinstance(state, dict) and "state_dict" in state and "pytorch-lightning_version" in state:
        raise ValueError(f"weights={path} is a Lightning checkpoint: pass it as ckpt_path=... instead")
    try:
        load_torchvision_weights(model, state)
    except ValueError as error:
        raise ValueError(f"weights={path}: {error}") from error
    log.info("Loaded torchvision weights from %s", path)


def instantiate_logger(logger_cfg: DictConfig, cfg: DictConfig):
    """A logger from its config; a ``WandbLogger`` also gets the settings of :func:`wandb_settings`."""
    if str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
        settings = wandb_settings(logger_cfg, cfg)
        # `config` is also the name of instantiate()'s own first parameter: pass it to the partial.
        config = settings.pop("config")
        return instantiate(logger_cfg, _partial_=True, **settings)(config=config)
    return instantiate(logger_cfg)


def wandb_settings(logger_cfg: DictConfig, cfg: DictConfig) -> dict:
    """``wandb.init`` arguments derived from the job, for the keys the logger config leaves null.

    * ``config``: the full resolved config, given at init so that offline runs keep it too.
    * ``mode``: :func:`wandb_mode`, so a job never stops at a login prompt.
    * ``name``: the variant, Hydra's ``override_dirname`` (e.g. ``model/pooler=roi_pool``).
    * ``group``: the experiment (``experiment_name``, else the ``experiment=`` file, else the sweep folder).
    * ``tags``: the job's command-line overrides.
    """
    settings = {"config": OmegaConf.to_container(cfg, resolve=True)}
    if logger_cfg.get("mode") is None:
        settings["mode"] = wandb_mode()
    if not HydraConfig.initialized():
        return settings
    hydra_cfg = HydraConfig.get()
    if logger_cfg.get("name") is None and hydra_cfg.job.override_dirname:
        settings["name"] = hydra_cfg.job.override_dirname
    if logger_cfg.get("group") is None:
        group = hydra_cfg.runtime.choices.get("experiment")
        if group is None and hydra_cfg.mode == RunMode.MULTIRUN:
            group = str(hydra_cfg.sweep.dir)
        settings["group"] = group
    if logger_cfg.get("tags") is None:
        # W&B refuses tags longer than 64 characters.
        settings["tags"] = [o[:64] for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith("hydra")]
    return settings


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else ``online`` when W&B credentials exist, ``offline`` when not.

    Credentials are ``WANDB_API_KEY`` (or ``WANDB_IDENTITY_TOKEN_FILE``) or a netrc entry for the W&B
    host (what ``wandb login`` writes). Offline runs are uploaded later with ``wandb sync <run dir>/wandb``.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def check_sync_batchnorm(module: L.LightningModule, trainer: L.Trainer, converts_batchnorm: bool = False) -> None:
    """Fails before training when SyncBatchNorm would fail at the first step.

    torch's SyncBatchNorm synchronises over CUDA devices only: under a distributed strategy on CPU it
    raises on the first training batch. GroupNorm (``model.norm=gn``, ``model.head_norm=gn``) has no
    batch statistics to synchronise and works everywhere.

    Args:
        converts_batchnorm: the Trainer turns BatchNorm layers into SyncBatchNorm (``sync_batchnorm``).
    """
    batch_norms = (torch.nn.SyncBatchNorm, torch.nn.BatchNorm2d) if converts_batchnorm else (torch.nn.SyncBatchNorm,)
    has_sync_bn = any(isinstance(m, batch_norms) for m in module.modules())
    distributed = isinstance(trainer.strategy, ParallelStrategy)
    if has_sync_bn and distributed and not isinstance(trainer.accelerator, CUDAAccelerator):
        raise ValueError(
            "norm=syncbn synchronises BatchNorm across GPUs and needs CUDA devices (torch's SyncBatchNorm); "
            "with CPU processes (trainer=ddp_cpu) use model.norm=gn / model.head_norm=gn"
        )


def checkpoint_path(cfg: DictConfig) -> str | None:
    """The Lightning checkpoint to start from: ``ckpt_path``, or ``<resume>/checkpoints/last.ckpt``."""
    if cfg.get("resume"):
        if cfg.get("ckpt_path"):
            raise ValueError("give either ckpt_path=<file> or resume=<run dir>, not both")
        path = Path(cfg.resume) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"resume={cfg.resume}: there is no {path}")
        return str(path)
    return cfg.get("ckpt_path")


# ---- running ------------------------------------------------------------------------------


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-row table of COCO box and mask AP, in percent."""
    header = f"{'':6}" + "".join(f"{k:>8}" for k in AP_KEYS)
    rows = [header]
    for iou_type, name in (("bbox", "box"), ("segm", "mask")):
        values = [metrics.get(f"{iou_type}_{k}", -1.0) for k in AP_KEYS]
        # pycocotools reports -1 where no ground truth exists (e.g. no large objects).
        rows.append(f"{name:6}" + "".join(f"{100 * v:8.1f}" if v >= 0 else f"{'-':>8}" for v in values))
    return "\n".join(rows)


def report(cfg: DictConfig, trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Prints the AP table and writes ``<run_dir>/metrics.json`` (rank zero)."""
    log.info(
        "process %d of %d done at global step %d in %s", trainer.global_rank, trainer.world_size, trainer.global_step, cfg.run_dir
    )
    if not trainer.is_global_zero:
        return
    print("\nCOCO-style AP on the validation split (%):\n" + format_metrics(metrics), flush=True)
    record = {**metrics, "global_step": trainer.global_step, "world_size": trainer.world_size}
    path = Path(cfg.run_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume: ``ckpt_path`` / ``resume``), then evaluate on the validation split.

    Returns the final COCO metrics.
    """
    with job_scope(cfg):
        L.seed_everything(cfg.seed, workers=True)
        ckpt_path = checkpoint_path(cfg)
        datamodule, module, trainer = build(cfg)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {}
        if cfg.get("final_eval", True):
            # Skip a second pass when fit() already validated the final weights.
            if module.last_metrics_step != trainer.global_step:
                trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics = dict(module.last_metrics)
            report(cfg, trainer, metrics)
        return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a Lightning checkpoint (``ckpt_path`` / ``resume``) or torchvision ``weights`` on the validation split."""
    ckpt_path = checkpoint_path(cfg)
    if not ckpt_path and not cfg.get("weights"):
        raise ValueError("mode=evaluate needs ckpt_path=<Lightning checkpoint>, resume=<run dir> or weights=<torchvision file>")
    with job_scope(cfg):
        L.seed_everything(cfg.seed, workers=True)
        datamodule, module, trainer = build(cfg)
        trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        metrics = dict(module.last_metrics)
        report(cfg, trainer, metrics)
        return metrics
