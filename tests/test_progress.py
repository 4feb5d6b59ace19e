"""The progress bar: short loss names, AP in percent like the final table."""

from lightning.pytorch.callbacks import TQDMProgressBar

from mrcnn.engine.progress import SHORT_NAMES, ProgressBar
from mrcnn.modeling.mask_rcnn import LOSS_KEYS


def test_the_bar_shows_every_loss_short_and_ap_in_percent(monkeypatch):
    logged = {f"train/{k}": 0.5 for k in LOSS_KEYS}
    logged.update({"train/loss": 2.5, "lr": 0.01, "val/segm_AP": 0.0823, "val/bbox_AP": -1.0, "v_num": 3})
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: dict(logged))
    shown = ProgressBar().get_metrics(None, None)
    assert {SHORT_NAMES[f"train/{k}"] for k in LOSS_KEYS} <= set(shown) and shown["loss"] == 2.5
    assert len({SHORT_NAMES[f"train/{k}"] for k in LOSS_KEYS}) == 5  # five distinct names
    assert shown["mask_AP%"] == 8.2  # as the final table prints it
    assert shown["box_AP%"] == -1.0  # pycocotools' "no ground truth" stays as it is
    assert shown["lr"] == 0.01 and shown["v_num"] == 3
