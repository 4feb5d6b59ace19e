"""LightningModule: schedule, lr scaling, loss logging, the non-finite guard."""

import csv
import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import CSVLogger

from mrcnn.engine.callbacks import Throughput
from mrcnn.engine.progress import ProgressBar
from mrcnn.evaluation import CocoEvaluator
from mrcnn.lit_module import LossWatch, check_finite, warmup_multistep_schedule
from mrcnn.modeling.mask_rcnn import LOSS_KEYS
from mrcnn.modeling.roi_heads import RoIHeads
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.runs import NotReadyEvent, training_only_trainer


def test_warmup_then_step_decay():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_multistep_schedule(
        optimizer, total_steps=100, warmup_steps=10, warmup_factor=0.1, milestones=(0.5, 0.8)
    )
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[10] == pytest.approx(1.0) and lrs[49] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.1) and lrs[79] == pytest.approx(0.1)
    assert lrs[80] == pytest.approx(0.01) and lrs[99] == pytest.approx(0.01)


def test_a_warmup_that_outlasts_a_short_run_or_its_first_drop_is_named_with_the_peak_reached(caplog):
    def schedule(total_steps, warmup_steps, milestones=(0.667, 0.889)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mrcnn.lit_module"):
            warmup_multistep_schedule(optimizer, total_steps, warmup_steps, 0.001, milestones)
        return caplog.text

    # 15 steps (6 images, batch 2, 5 epochs) under the default 200-step warmup: the first drop is at step 10, where
    # the learning rate has reached 0.001 + 0.999 * 9 / 200 of the one asked for.
    text = schedule(15, 200)
    assert (
        "scheduler.warmup_steps=200 does not end before the learning rate's first drop, at step 10 of this 15-step"
        in text
    )
    assert f"peaks at {0.001 + 0.999 * 9 / 200:.3g} times" in text and "below 10 for a run this short" in text
    assert "does not end before this 15-step run does" in schedule(15, 200, milestones=())
    # A 1-step run (or a first drop at step 1): no warmup at all.
    assert "Set scheduler.warmup_steps=0 (no warmup) for a run this short" in schedule(2, 200)
    # A warmup that ends before the first drop, or none, says nothing (debug=fast: 2 of 4 steps, the drop at 3).
    assert schedule(4, 2) == schedule(1000, 200) == schedule(15, 0) == ""
    assert "first drop, at step 3" in schedule(4, 3)


def test_check_finite_names_the_step_and_the_bad_losses():
    losses = {k: torch.tensor(1.0) for k in LOSS_KEYS}
    check_finite(losses, 3)
    losses["fastrcnn_bbox_loss"] = torch.tensor(float("nan"))
    losses["maskrcnn_mask_loss"] = torch.tensor(float("inf"))
    with pytest.raises(FloatingPointError, match=r"step 7: fastrcnn_bbox_loss=nan, maskrcnn_mask_loss=inf"):
        check_finite(losses, 7)


def _fit(tmp_path, overrides, max_steps=2):
    cfg = compose_config(
        [*TINY_MODEL, "data.num_train_images=8", "data.num_val_images=4", "data.datamodule.batch_size=2", *overrides],
        run_dir=str(tmp_path),
    )
    L.seed_everything(0)
    datamodule = instantiate(cfg.data.datamodule)
    module = instantiate(cfg.module)
    trainer = training_only_trainer(max_steps=max_steps)
    return datamodule, module, trainer


def test_lr_scales_linearly_with_the_global_batch(tmp_path):
    datamodule, module, trainer = _fit(tmp_path, ["base_lr=0.02"], max_steps=1)
    trainer.fit(module, datamodule=datamodule)
    # base lr 0.02 at a global batch of 16; this run's global batch is 2.
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.02 * 2 / 16)


def test_bare_dataloaders_are_a_clear_error_not_an_attribute_error(tmp_path):
    # The learning rate needs the batch size when the optimizer is built, before Lightning has the training loader.
    datamodule, module, trainer = _fit(tmp_path, [], max_steps=1)
    with pytest.raises(ValueError, match="give fit\\(\\) a datamodule with a batch_size attribute"):
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())


def test_a_nan_input_stops_training_with_the_step_and_loss_names(tmp_path):
    datamodule, module, trainer = _fit(tmp_path, [])

    class Poisoned(torch.utils.data.Dataset):
        def __init__(self, base):
            self.base, self.class_names = base, base.class_names

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            image, target = self.base[i]
            return image * float("nan"), target

    datamodule.train_dataset = Poisoned(datamodule.train_dataset)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0: .*rpn_class_loss=nan"):
        trainer.fit(module, datamodule=datamodule)


def test_loss_watch_stops_on_a_non_finite_loss_naming_the_step_it_happened_at():
    watch = LossWatch()
    good = {k: torch.tensor(1.0) for k in LOSS_KEYS}
    watch.push(good, 4)
    watch.check()
    watch.push({**good, "rpn_bbox_loss": torch.tensor(float("inf"))}, 5)
    with pytest.raises(FloatingPointError, match=r"step 5: rpn_bbox_loss=inf"):
        watch.check(wait=True)


class RoIHeadsWithExtraLoss(RoIHeads):
    """Test-only: the standard RoI heads plus a loss of their own (a penalty on the box head's first weights)."""

    def forward(self, features, proposals, image_shapes, targets=None, proposal_valid=None):
        detections, losses = super().forward(features, proposals, image_shapes, targets, proposal_valid)
        if targets is not None:
            losses["box_weight_penalty"] = 10.0 * self.box_head.fc6.weight.pow(2).mean()
        return detections, losses


def test_a_loss_a_head_adds_counts_in_the_total_and_in_every_log(tmp_path):
    target = f"{__name__}.{RoIHeadsWithExtraLoss.__name__}"
    datamodule, module, _ = _fit(tmp_path, [f"model.net.roi_heads._target_={target}"])
    logger = CSVLogger(tmp_path, name="csv", version="")
    trainer = training_only_trainer(max_steps=1, logger=logger, log_every_n_steps=1, limit_val_batches=1)
    trainer.fit(module, datamodule=datamodule)
    logged = trainer.logged_metrics
    assert float(logged["train/box_weight_penalty"]) > 0
    losses = [f"train/{k}" for k in (*LOSS_KEYS, "box_weight_penalty")]
    assert set(losses) <= set(logged)
    assert float(logged["train/loss"]) == pytest.approx(sum(float(logged[k]) for k in losses), rel=1e-6)
    # The progress bar shows it under its logged name, beside the five short ones.
    bar = ProgressBar().get_metrics(trainer, module)
    assert "train/box_weight_penalty" in bar and "mask" in bar
    assert trainer.optimizers[0].param_groups[0]["lr"] != module.step_lr  # the scheduler has stepped since
    assert bar["lr"] == float(logged["lr"])  # the step's learning rate, not the next one's (warmup changes it)
    # Validation sums and logs it too.
    trainer.validate(module, datamodule=datamodule, verbose=False)
    logged = trainer.logged_metrics
    assert "val/box_weight_penalty" in logged
    logger.save()
    columns = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/box_weight_penalty", "val/box_weight_penalty", "train/loss"} <= set(columns)
    assert float(logged["val/loss"]) == pytest.approx(
        sum(float(logged[f"val/{k}"]) for k in (*LOSS_KEYS, "box_weight_penalty")), rel=1e-5
    )


def _fit_logging(tmp_path, name, monkeypatch=None):
    """Two epochs of 4 steps, the loggers writing every 3rd step; returns the CSV rows, the steps at which the module's
    ``log`` was called and the trainer's ``callback_metrics`` at the end. With ``monkeypatch``: every step logs."""
    if monkeypatch is not None:
        import mrcnn.engine.loggers

        monkeypatch.setattr(mrcnn.engine.loggers, "writes_train_metrics", lambda trainer: True)
    datamodule, module, _ = _fit(tmp_path, [])
    logger = CSVLogger(tmp_path, name=name, version="")
    trainer = training_only_trainer(max_steps=8, logger=logger, log_every_n_steps=3, callbacks=[Throughput(window=2)])
    calls = []  # the batch index of every call of the module's log (log_dict calls it once per key)
    log = module.log

    def counted_log(*args, **kwargs):
        calls.append(trainer.fit_loop.epoch_loop.total_batch_idx)
        return log(*args, **kwargs)

    module.log = counted_log
    trainer.fit(module, datamodule=datamodule)
    with open(tmp_path / name / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    return rows, calls, {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


def test_training_logs_only_at_the_loggers_steps_and_writes_what_logging_every_step_writes(tmp_path, monkeypatch):
    rows, calls, epoch_end = _fit_logging(tmp_path, "gated")
    # The loggers write at steps 2 and 5 (every 3rd); the epochs' last batches (3, 7) log for callback_metrics. Every
    # logging step calls log 8 times: the five losses (one log_dict), their sum, the learning rate, the throughput.
    assert sorted(set(calls)) == [2, 3, 5, 7] and len(calls) == 4 * 8
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [2, 5]
    assert all(r["train/images_per_sec"] for r in rows if r["train/loss"])

    rows_every_step, calls_every_step, epoch_end_every_step = _fit_logging(tmp_path, "every_step", monkeypatch)
    # Every step logs (the throughput from each epoch's second step: the first is not timed).
    assert sorted(set(calls_every_step)) == list(range(8)) and len(calls_every_step) == 8 * 8 - 2
    # The same rows, values and columns (the throughput is wall time: present on the same rows only).
    rate = "train/images_per_sec"
    assert [{k: v for k, v in r.items() if k != rate} for r in rows] == [
        {k: v for k, v in r.items() if k != rate} for r in rows_every_step
    ]
    assert [bool(r[rate]) for r in rows] == [bool(r[rate]) for r in rows_every_step]
    # What a callback reads at the end (a checkpoint or early stop on a training loss): the last step's values.
    assert epoch_end.keys() == epoch_end_every_step.keys() and "train/maskrcnn_mask_loss" in epoch_end
    epoch_end.pop(rate), epoch_end_every_step.pop(rate)
    assert epoch_end == epoch_end_every_step


@pytest.mark.parametrize("stage", ["validating", "sanity_checking", "testing"])
def test_an_evaluation_batch_keeps_the_evaluators_targets_on_the_host(tmp_path, stage):
    _, module, trainer = _fit(tmp_path, [])
    module.trainer = trainer
    setattr(trainer, stage, True)
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[0, 2:10, 2:10] = masks[1, 12:30, 12:30] = 1
    target = {
        "boxes": torch.tensor([[2.0, 2.0, 10.0, 10.0], [12.0, 12.0, 30.0, 30.0]]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
        "iscrowd": torch.tensor([0, 1]),
        "image_id": torch.tensor(3),
    }
    batch = module.on_before_batch_transfer(((torch.rand(3, 32, 32),), (target,)), 0)
    # What Lightning does next; the meta device shows what moved.
    images, model_targets, host_targets = move_data_to_device(batch, torch.device("meta"))
    assert images[0].device.type == "meta"
    assert all(v.device.type == "meta" for v in model_targets[0].values())
    assert model_targets[0]["labels"].shape == (1,)  # the crowd region is no model target
    assert host_targets.value[0] is target  # the evaluator's, crowd region and all, never left the host

    target["boxes"][0, 2] = 1.0  # a box with a negative width: named here, on the host
    with pytest.raises(ValueError, match=r"image_id 3.*non-positive width"):
        module.on_before_batch_transfer(((torch.rand(3, 32, 32),), (target,)), 0)


def test_a_resume_that_changes_the_global_batch_trains_at_the_lr_of_the_new_batch(tmp_path):
    # resume_allow_config_change: the checkpoint's scheduler state holds the old run's base lr; the linear scaling
    # rule gives this run's batch its own.
    datamodule, module, trainer = _fit(tmp_path, ["base_lr=0.02"], max_steps=2)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    datamodule, module, trainer = _fit(tmp_path, ["base_lr=0.02", "data.datamodule.batch_size=4"], max_steps=3)
    trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "two.ckpt")
    [scheduler] = [config.scheduler for config in trainer.lr_scheduler_configs]
    assert scheduler.base_lrs == [pytest.approx(0.02 * 4 / 16)]
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.02 * 4 / 16)


def test_a_non_finite_loss_not_read_yet_stops_the_run_before_its_weights_are_validated():
    # On a GPU a step's losses are read a step or more late, and Lightning validates before the epoch's end hook.
    module = instantiate(compose_config(TINY_MODEL).module)
    module.loss_watch.pending.append((6, ["rpn_class_loss"], torch.tensor([float("nan")]), NotReadyEvent()))
    module.loss_watch.check()
    assert module.loss_watch.pending
    with pytest.raises(FloatingPointError, match="step 6"):
        module.on_validation_start()


def test_the_sanity_checks_scores_are_never_the_runs_metrics(tmp_path, monkeypatch):
    # A run resumed from the end of its last epoch is sanity-checked at its final step and trains no more: train()
    # takes metrics of the current step for the final validation's, and would report a batch's AP.
    datamodule, module, _ = _fit(tmp_path, [])
    trainer = training_only_trainer(max_epochs=1)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    datamodule, module, _ = _fit(tmp_path, [])
    trainer = training_only_trainer(max_epochs=1, num_sanity_val_steps=1, limit_val_batches=1.0)
    scored = []
    compute = CocoEvaluator.compute
    monkeypatch.setattr(CocoEvaluator, "compute", lambda self: scored.append(trainer.sanity_checking) or compute(self))
    trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "end.ckpt")
    assert trainer.global_step == 4 and scored == [True]  # the sanity check scored (an evaluation that fails, fails)
    assert module.last_metrics_step == -1 and module.last_metrics == {}


def test_the_global_batch_counts_every_process_and_accumulated_batch():
    # Two nodes of two processes, batches of 2, two batches a step: a global batch of 16, base_lr's own.
    module = instantiate(compose_config([*TINY_MODEL, "base_lr=0.02"]).module)
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=2), world_size=4, accumulate_grad_batches=2)
    assert module.global_batch_size() == 16
    module._trainer.world_size = 8
    assert module.global_batch_size() == 32
