"""The progress bar: the five losses under short names beside their sum, and AP in percent as everywhere else."""

from lightning.pytorch.callbacks import TQDMProgressBar

# Logged key -> what the bar shows. Losses keep their values; AP is shown in percent, like the final
# table and the reports (the logged value stays pycocotools' fraction).
SHORT_NAMES = {
    "train/loss": "loss",
    "train/rpn_class_loss": "rpn_cls",
    "train/rpn_bbox_loss": "rpn_box",
    "train/fastrcnn_class_loss": "cls",
    "train/fastrcnn_bbox_loss": "box",
    "train/maskrcnn_mask_loss": "mask",
    "val/bbox_AP": "box_AP%",
    "val/segm_AP": "mask_AP%",
    "val/cityscapes_AP": "cityscapes_AP%",
}
PERCENT = ("val/bbox_AP", "val/segm_AP", "val/cityscapes_AP")


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with :data:`SHORT_NAMES` and AP in percent; other metrics as logged."""

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        shown = {}
        for key, value in metrics.items():
            if key in PERCENT and isinstance(value, (int, float)) and value >= 0:
                value = round(100 * value, 1)
            shown[SHORT_NAMES.get(key, key)] = value
        return shown
