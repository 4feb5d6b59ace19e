"""``mode=train`` and ``mode=evaluate``: build from the config, fit or validate, write the final metrics."""

import lightning as L
from omegaconf import DictConfig

import mrcnn.config  # noqa: F401  (registers the config resolvers)
from mrcnn.build import build
from mrcnn.checkpoints import checkpoint_path
from mrcnn.launch import job_scope
from mrcnn.summary import write_final_metrics


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
            write_final_metrics(cfg, trainer, metrics)
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
        write_final_metrics(cfg, trainer, metrics)
        return metrics
