"""A composed config -> (datamodule, LightningModule, Trainer): the one place Hydra objects are built."""

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import ParallelStrategy
from omegaconf import DictConfig, OmegaConf

from mrcnn.config import task_overrides
from mrcnn.data.datamodule import InstanceDataModule
from mrcnn.engine import job_processes
from mrcnn.engine.callbacks import RandomState, RunRecord
from mrcnn.engine.checkpoints import ResumedRun, load_weights
from mrcnn.engine.data_fit import check_num_classes, warn_if_boxes_outside_anchors
from mrcnn.engine.loggers import instantiate_loggers
from mrcnn.engine.quiet import silence_library_noise
from mrcnn.errors import CommandError


def build(cfg: DictConfig, resumed: ResumedRun | None = None):
    """Instantiate (datamodule, module, trainer) from a composed config.

    Args:
        resumed: the run this one resumes (:func:`mrcnn.engine.checkpoints.read_resumed_run`): its CSV history and
            W&B run are continued.
    """
    datamodule = instantiate(cfg.data.datamodule)
    if isinstance(datamodule, InstanceDataModule):
        check_num_classes(cfg.model.num_classes, datamodule.class_names)
    module = build_module(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # Not named config entries, as a resume depends on them: RunRecord carries the whole config into every
    # checkpoint (for the resume check), RandomState the random states (for the same draws after a resume).
    callbacks = [*instantiate_callbacks(cfg), RunRecord(resolved, job_overrides()), RandomState()]
    loggers = instantiate_loggers(cfg, resumed)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    job_processes.track(trainer)
    check_sync_batchnorm(module, trainer, converts_batchnorm=bool(cfg.trainer.get("sync_batchnorm")))
    if trainer.is_global_zero and isinstance(datamodule, InstanceDataModule) and datamodule.val_dataset is not None:
        warn_if_boxes_outside_anchors(module.model, datamodule.val_dataset)
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):  # W&B got the config at init (instantiate_logger)
            logger.log_hyperparams(resolved)
    return datamodule, module, trainer


def job_overrides() -> list[str] | None:
    """The Hydra job's command-line overrides; ``None`` outside a Hydra job."""
    if not HydraConfig.initialized():
        return None
    return task_overrides(HydraConfig.get())


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The LightningModule, initialised from ``weights`` (a torchvision state dict or a Lightning checkpoint) when given."""
    silence_library_noise()
    module = instantiate(cfg.module)
    if cfg.get("weights"):
        # Only a training run fine-tunes a file of other classes; evaluate and predict would score random layers,
        # unless a checkpoint replaces the weights (ckpt_path=, resume=: a fine-tuned run's own overrides).
        fine_tune = cfg.get("mode", "train") == "train" or bool(cfg.get("ckpt_path") or cfg.get("resume"))
        load_weights(module.model, cfg.weights, class_names=module.class_names, fine_tune=fine_tune)
    return module


def instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks named under ``cfg.callbacks`` (``{name: callback config}``; a null entry is switched off)."""
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


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
        raise CommandError(
            "norm=syncbn synchronises BatchNorm across GPUs and needs CUDA devices (torch's SyncBatchNorm); "
            "with CPU processes (trainer=ddp_cpu) use model.norm=gn / model.head_norm=gn"
        )
