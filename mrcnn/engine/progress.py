"""The progress bar: the five losses under short names beside their sum, and AP in percent as everywhere else."""

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

# Logged key -> what the bar shows. Losses keep their values; AP is shown in percent (:func:`percent`), like the
# final table and the reports (the logged value stays pycocotools' fraction).
SHORT_NAMES = {
    "train/loss": "loss",
    "train/rpn_class_loss": "rpn_cls",
    "train/rpn_bbox_loss": "rpn_box",
    "train/fastrcnn_class_loss": "cls",
    "train/fastrcnn_bbox_loss": "box",
    "train/maskrcnn_mask_loss": "mask",
    "val/bbox_AP": "box_AP",
    "val/segm_AP": "mask_AP",
    "val/cityscapes_AP": "cityscapes_AP",
}
PERCENT = ("val/bbox_AP", "val/segm_AP", "val/cityscapes_AP")


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with :data:`SHORT_NAMES` and AP in percent; other metrics as logged.

    The training losses and their sum come from the module's :class:`mrcnn.lit_module.LossWatch`: host copies of the
    latest step the GPU has finished (on a GPU usually the previous step; on the CPU the current one), and the
    learning rate of the latest step (``step_lr``). Lightning reads every progress-bar metric (``self.log(..., prog_bar=True)``)
    on the host after every step, which makes the step wait for the GPU, so the module logs none during training.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.fit_loop.restarted_mid_epoch:
            # Lightning (2.6) calls no on_train_epoch_start for the epoch a resumed run continues, where the bar gets
            # its title and length: it would read "Training: 23/?" instead of "Epoch 0: 23/30".
            self.on_train_epoch_start(trainer, pl_module)
            # The epoch's length as a run that had not stopped would show it: the batches done before the stop count
            # (under max_steps Lightning gives only the steps left).
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            self.train_progress_bar.total = convert_inf(
                min(trainer.num_training_batches, done + self.total_train_batches)
            )
            self.train_progress_bar.n = done

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        watch = getattr(pl_module, "loss_watch", None)
        if watch is not None and watch.latest:
            training = {f"train/{k}": v for k, v in watch.latest.items()}
            training["train/loss"] = sum(watch.latest.values())
            if getattr(pl_module, "step_lr", None) is not None:
                # The step's own: by the bar's update Lightning has already stepped the scheduler.
                training["lr"] = pl_module.step_lr
            metrics = {**training, **metrics}
        shown = {}
        for key, value in metrics.items():
            if key in PERCENT and isinstance(value, (int, float)):
                value = percent(value)
            shown[SHORT_NAMES.get(key, key)] = value
        return shown


def percent(fraction: float) -> str:
    """An AP as the bar shows it: ``0.0823`` -> ``"8.2%"``; pycocotools' -1 (nothing to score) -> ``"-"``.

    As the final table prints it. A string, which the bar shows as it is: it pads every number to three decimals
    (``0.3`` would read ``0.300``, like a fraction, and -1 ``-1.000``).
    """
    return f"{100 * fraction:.1f}%" if fraction >= 0 else "-"
