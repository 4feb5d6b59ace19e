"""Turn a composed Hydra config into a datamodule, a LightningModule and a Trainer, and run them."""

import logging

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import mrcnn.config  # noqa: F401  (registers the config resolvers)

log = logging.getLogger(__name__)

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def build(cfg: DictConfig):
    """Instantiate (datamodule, module, trainer) from a composed config."""
    datamodule = instantiate(cfg.data.datamodule)
    module = instantiate(cfg.module)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or [])]
    loggers = [instantiate(c) for c in (cfg.get("logger") or [])]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return datamodule, module, trainer


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-row table of COCO box and mask AP, in percent."""
    header = f"{'':6}" + "".join(f"{k:>8}" for k in AP_KEYS)
    rows = [header]
    for iou_type, name in (("bbox", "box"), ("segm", "mask")):
        values = [metrics.get(f"{iou_type}_{k}", -1.0) for k in AP_KEYS]
        # pycocotools reports -1 where no ground truth exists (e.g. no large objects).
        rows.append(f"{name:6}" + "".join(f"{100 * v:8.1f}" if v >= 0 else f"{'-':>8}" for v in values))
    return "\n".join(rows)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, then evaluate on the validation split; returns the final COCO metrics."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {}
    if cfg.get("final_eval", True):
        # Skip a second pass when fit() already validated the final weights.
        if module.last_metrics_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = dict(module.last_metrics)
        if trainer.is_global_zero:
            print("\nCOCO-style AP on the validation split (%):\n" + format_metrics(metrics), flush=True)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a checkpoint (``ckpt_path``) on the validation split."""
    if not cfg.get("ckpt_path"):
        raise ValueError("mode=evaluate needs ckpt_path=<file>")
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    trainer.validate(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, verbose=False)
    metrics = dict(module.last_metrics)
    if trainer.is_global_zero:
        print("\nCOCO-style AP on the validation split (%):\n" + format_metrics(metrics), flush=True)
    return metrics
