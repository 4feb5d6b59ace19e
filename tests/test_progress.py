"""The progress bar: short loss names, AP in percent like the final table."""

from types import SimpleNamespace

import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from mrcnn.engine.progress import SHORT_NAMES, ProgressBar, percent
from mrcnn.lit_module import LossWatch
from mrcnn.modeling.mask_rcnn import LOSS_KEYS


def test_the_bar_shows_every_loss_short_and_ap_in_percent(monkeypatch):
    logged = {f"train/{k}": 0.5 for k in LOSS_KEYS}
    logged.update({"train/loss": 2.5, "lr": 0.01, "val/segm_AP": 0.0823, "val/bbox_AP": -1.0, "v_num": 3})
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: dict(logged))
    shown = ProgressBar().get_metrics(None, None)
    assert {SHORT_NAMES[f"train/{k}"] for k in LOSS_KEYS} <= set(shown) and shown["loss"] == 2.5
    assert len({SHORT_NAMES[f"train/{k}"] for k in LOSS_KEYS}) == 5  # five distinct names
    # As the final table prints them: in percent, one decimal; pycocotools' -1 (nothing to score) as "-". The bar
    # shows exactly that text (it pads numbers: 8.2 would read 8.200, and -1 -1.000).
    assert shown["mask_AP"] == "8.2%" and shown["box_AP"] == "-"
    bar = Tqdm(total=1, disable=True)
    bar.set_postfix({"mask_AP": shown["mask_AP"], "box_AP": shown["box_AP"], "small": percent(0.003)})
    assert bar.postfix == "mask_AP=8.2%, box_AP=-, small=0.3%"
    assert shown["lr"] == 0.01 and shown["v_num"] == 3


def test_the_bar_shows_the_losses_the_loss_watch_read_and_the_steps_learning_rate():
    # During training the module logs nothing with prog_bar=True (Lightning would read it on the host after every
    # step): the bar takes the latest losses read from the host copies, and the learning rate the step used.
    watch = LossWatch()
    watch.push({k: torch.tensor(float(i)) for i, k in enumerate(LOSS_KEYS)}, step=7)
    watch.check()
    assert watch.latest_step == 7
    trainer = SimpleNamespace(progress_bar_metrics={}, loggers=[], logger=None)
    shown = ProgressBar().get_metrics(trainer, SimpleNamespace(loss_watch=watch, step_lr=0.0125))
    assert [shown[SHORT_NAMES[f"train/{k}"]] for k in LOSS_KEYS] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert shown["loss"] == 10.0 and shown["lr"] == 0.0125
    assert list(shown)[:6] == [
        *(SHORT_NAMES[f"train/{k}"] for k in LOSS_KEYS),
        "loss",
    ]  # the paper's order, then the sum


def test_a_run_resumed_in_the_middle_of_an_epoch_shows_the_epoch_and_its_length(tmp_path):
    # Lightning calls no on_train_epoch_start for the epoch a resumed run continues: the bar read "Training: 3/?".
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Shown(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            bar = trainer.progress_bar_callback.train_progress_bar
            self.seen = (bar.desc, bar.total, bar.n)

    def trainer(*callbacks):
        return L.Trainer(
            max_steps=6,
            limit_train_batches=8,
            limit_val_batches=0,
            logger=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,  # Lightning's own checkpoint of the resumed fit
            callbacks=[ProgressBar(), *callbacks],
        )

    uninterrupted, resumed = Shown(), Shown()
    saves = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=3, save_top_k=-1)
    trainer(saves, uninterrupted).fit(BoringModel())
    trainer(resumed).fit(BoringModel(), ckpt_path=tmp_path / "step=3.ckpt")
    assert resumed.seen == uninterrupted.seen == ("Epoch 0: ", 6, 6)  # the 6 steps of max_steps, all done
