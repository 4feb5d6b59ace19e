"""Lightning callbacks: the last checkpoint for resuming, training throughput, prediction overlays for W&B."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from mrcnn.visualize import draw_instances, select, semantic_label_map, to_uint8, wandb_boxes, wandb_class_labels


class LastCheckpoint(L.Callback):
    """Keeps ``<dirpath>/last.ckpt`` current, for resuming a run that was stopped or killed.

    It is saved at the end of every training epoch, at the end of training and, with
    ``every_n_train_steps``, every that many optimizer steps, so a killed run loses at most that many
    steps: Lightning resumes a checkpoint saved mid-epoch with the same global step, epoch, optimizer
    and lr-scheduler state. (``ModelCheckpoint(every_n_train_steps=N, save_last=True)`` alone stops
    saving at epoch ends and leaves ``last.ckpt`` at the last multiple of N.) Best-by-metric
    checkpoints stay with Lightning's ``ModelCheckpoint``.

    Args:
        dirpath: folder of the checkpoint.
        every_n_train_steps: also save every that many optimizer steps; ``None`` or 0: epoch ends only.
        filename: checkpoint file name.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None, filename: str = "last.ckpt"):
        super().__init__()
        self.path = Path(dirpath) / filename
        self.every_n_train_steps = every_n_train_steps or 0
        self._saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.global_step == self._saved_step:
            return
        # Every rank calls it (it ends in a barrier); rank zero writes the file.
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)


class Throughput(L.Callback):
    """Logs ``train/images_per_sec``: images of the global batch per second of wall time.

    The time between the ends of consecutive training batches (data loading included) is averaged
    over the last ``window`` steps; time spent in validation is not counted.

    Args:
        window: steps to average over.
    """

    def __init__(self, window: int = 20):
        super().__init__()
        self.window = window
        self._steps: deque[tuple[int, float]] = deque(maxlen=window)
        self._last: float | None = None

    # The first batch of an epoch and after a validation is not timed: the gap before it is not training.
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            images = len(batch[0]) * trainer.world_size
            self._steps.append((images, now - self._last))
            seconds = sum(s for _, s in self._steps)
            if seconds > 0:
                pl_module.log("train/images_per_sec", sum(n for n, _ in self._steps) / seconds, batch_size=len(batch[0]))
        self._last = now


class PredictionOverlays(L.Callback):
    """After every validation, logs the predictions on the first ``num_images`` validation images to W&B.

    Each image is logged twice: ``val/predictions`` is the plain image with W&B's interactive overlays
    (predicted and ground-truth masks as class label maps, predicted boxes with class names and
    scores), and ``val/overlays`` is the picture ``mrcnn.visualize.draw_instances`` draws, where each
    instance has its own colour. The images are the same at every validation, so the panels show
    how the predictions change during training. Does nothing without a ``WandbLogger``.

    Args:
        num_images: how many validation images, from the first.
        score_threshold: detections scoring below it are not shown.
        mask_threshold: mask probabilities above it are foreground.
    """

    def __init__(self, num_images: int = 4, score_threshold: float = 0.5, mask_threshold: float = 0.5):
        super().__init__()
        self.num_images = num_images
        self.score_threshold = score_threshold
        self.mask_threshold = mask_threshold

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        # Rank zero alone runs a few extra forward passes: the inner model, not the DDP wrapper,
        # in eval mode, so no collective is involved and the other ranks need not wait.
        if not loggers or trainer.sanity_checking or not trainer.is_global_zero or self.num_images <= 0:
            return
        loader = trainer.val_dataloaders
        dataset = (loader[0] if isinstance(loader, (list, tuple)) else loader).dataset
        samples = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        images = [image for image, _ in samples]
        with torch.no_grad():
            detections, _ = pl_module.model([image.to(pl_module.device) for image in images])
        self._log(loggers, trainer.global_step, images, [target for _, target in samples], detections, pl_module.class_names)

    def _log(self, loggers, step, images, targets, detections, class_names) -> None:
        import wandb

        interactive, drawn = [], []
        class_labels = wandb_class_labels(class_names)
        for image, target, detection in zip(images, targets, detections):
            detection = select(detection, self.score_threshold)
            size = tuple(image.shape[-2:])
            pixels = to_uint8(image).permute(1, 2, 0).numpy()
            masks = {
                "predictions": {"mask_data": semantic_label_map(detection, size, self.mask_threshold), "class_labels": class_labels},
                "ground_truth": {"mask_data": semantic_label_map(target, size), "class_labels": class_labels},
            }
            interactive.append(wandb.Image(pixels, masks=masks, boxes={"predictions": wandb_boxes(detection, class_names)}))
            overlay = draw_instances(image, detection, class_names, self.score_threshold, self.mask_threshold)
            drawn.append(wandb.Image(overlay.permute(1, 2, 0).numpy()))
        for logger in loggers:
            logger.log_metrics({"val/predictions": interactive, "val/overlays": drawn}, step=step)
