"""MaskRCNNModule: the LightningModule that trains, validates and logs a Mask R-CNN."""

import bisect
import collections
import logging
import math
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from mrcnn.cityscapes_eval import CityscapesEvaluator
from mrcnn.data.datamodule import InstanceDataModule
from mrcnn.data.transforms import drop_crowd
from mrcnn.engine import loggers as engine_loggers
from mrcnn.engine.launch import note_loop_start
from mrcnn.engine.model_record import (
    MODEL_RECORD_KEY,
    ModelRecord,
    check_classes,
    model_record,
    set_frozen_bn_eps,
    warn_if_input_size_differs,
)
from mrcnn.evaluation import CocoEvaluator
from mrcnn.modeling.mask_rcnn import LOSS_KEYS, check_targets

log = logging.getLogger(__name__)


def warmup_multistep_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 1000,
    warmup_factor: float = 0.001,
    milestones: tuple[float, ...] | None = (0.667, 0.889),
    gamma: float = 0.1,
    milestone_steps: tuple[int, ...] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ``lr * warmup_factor``, then step decay by ``gamma`` at each milestone.

    Args:
        total_steps: optimizer steps of the whole run.
        milestones: fractions of ``total_steps`` (the 1x schedule's 60k and 80k of 90k are 0.667, 0.889),
            so the schedule keeps its shape when the run is shortened or lengthened.
        milestone_steps: the milestones as optimizer steps instead (the paper's 120k of 160k), fixed whatever
            the run's length; give these or ``milestones``, not both.
    """
    if milestone_steps is not None and milestones:
        raise ValueError(
            f"scheduler: give milestones (fractions of the run, {list(milestones)}) or milestone_steps "
            f"(optimizer steps, {list(milestone_steps)}), not both"
        )
    if milestone_steps is not None:
        steps = sorted(int(s) for s in milestone_steps)
    else:
        steps = sorted(int(round(m * total_steps)) for m in milestones or ())

    def factor(step: int) -> float:
        decay = gamma ** bisect.bisect_right(steps, step)
        if step < warmup_steps:
            alpha = step / warmup_steps
            return decay * (warmup_factor * (1 - alpha) + alpha)
        return decay

    # A short run (a small dataset, a smoke run) may end, or drop the learning rate, before the warmup does: the
    # learning rate then never reaches the one the run asked for, without a word.
    first_drop = min([s for s in steps if s > 0] + [total_steps])
    if 0 < first_drop <= warmup_steps:
        peak = max(factor(step) for step in range(first_drop))
        log.warning(
            "scheduler.warmup_steps=%d does not end before %s: the learning rate peaks at %.3g times the one asked "
            "for (base_lr scaled to the batch). Set %s for a run this short",
            warmup_steps,
            f"the learning rate's first drop, at step {first_drop} of this {total_steps}-step run"
            if first_drop < total_steps
            else f"this {total_steps}-step run does",
            peak,
            f"scheduler.warmup_steps below {first_drop}" if first_drop > 1 else "scheduler.warmup_steps=0 (no warmup)",
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MaskRCNNModule(L.LightningModule):
    """Trains a ``MaskRCNN`` on the sum of every loss it returns, and reports each loss and COCO box/mask AP.

    Args:
        model: a built ``mrcnn.modeling.mask_rcnn.MaskRCNN``.
        optimizer: ``functools.partial`` of an optimizer taking ``(params, lr=...)`` (Hydra ``_partial_``).
        scheduler: ``functools.partial`` taking ``(optimizer, total_steps=...)``, stepped every iteration.
        base_lr: learning rate at a global batch of ``base_batch_size``.
        base_batch_size: reference global batch (16 in the paper); the lr scales linearly with
            the actual global batch (per-device batch x devices x nodes x gradient accumulation).
        class_names: foreground class names, for reports.
        channels_last: store conv weights (and so activations) in NHWC, which tensor-core convolutions
            (cuDNN, bf16/fp16) run faster in; a no-op for the maths.
        compile: ``torch.compile`` the backbone (FPN included) and the box and mask heads, in place
            (``nn.Module.compile``), so state-dict keys and checkpoints stay the same with it on or off.
            The RPN, poolers and post-processing hold data-dependent control flow and stay eager.
        compile_kwargs: extra ``torch.compile`` arguments (e.g. ``{"mode": "max-autotune"}``). The heads
            always get ``dynamic=True``: their batch is the varying number of RoIs.
        cityscapes_eval_workers: with Cityscapes validation data, the official Cityscapes instance AP
            (``mrcnn.cityscapes_eval``) is computed beside the COCO-style AP by this many processes (0: the
            main process); ``None`` switches it off.

    A checkpoint carries the class names, the label -> category id map of the training data, the
    FrozenBatchNorm eps and the input size (``mrcnn.engine.model_record``); loading it checks the classes against
    the data's and restores the rest.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable,
        scheduler: Callable | None = None,
        base_lr: float = 0.02,
        base_batch_size: int = 16,
        class_names: list[str] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        cityscapes_eval_workers: int | None = 0,
    ):
        super().__init__()
        self.model = model
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            kwargs = dict(compile_kwargs or {})
            # Compiled at their first calls: the sanity check and the first steps wait minutes, without a word.
            log.info(
                "module.compile=true: the backbone and the box and mask heads are compiled at their first calls, so "
                "the first steps (and the validation sanity check) take minutes"
            )
            self.model.backbone.compile(**kwargs)
            # The heads' row counts change from step to step (among the RoI buckets): one dynamic graph for all of
            # them, where static ones would compile once per count (tests/modeling/test_compile.py).
            for head in (self.model.roi_heads.box_head, self.model.roi_heads.mask_head):
                head.compile(**{**kwargs, "dynamic": True})
        elif compile_kwargs:
            log.warning(
                "module.compile_kwargs=%s is read only with module.compile=true: nothing is compiled", compile_kwargs
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.base_lr = base_lr
        self.base_batch_size = base_batch_size
        self.class_names = list(class_names) if class_names else None
        self.label_to_category_id: dict[int, int] | None = None
        self.cityscapes_eval_workers = cityscapes_eval_workers
        self.evaluator = CocoEvaluator()
        self.cityscapes_evaluator: CityscapesEvaluator | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_metrics_step = -1
        self.loss_watch = LossWatch()
        self.step_lr: float | None = None  # the learning rate of the latest training step
        self.scaled_lr: float | None = None  # base_lr scaled to the global batch (configure_optimizers)
        # Why the last evaluation had nothing to score (CocoEvaluator.nothing_to_score), or None.
        self.nothing_to_score: str | None = None

    def on_train_start(self) -> None:
        note_loop_start()  # from here a failed run keeps its folder and log
        # A resumed run's optimizer comes back with the learning rate of the step it was saved at, as the saved run's
        # schedule gave it; the schedule's milestones are fractions of this run's length, which an extended run
        # (a larger trainer.max_steps) changes. The learning rate of this step, from this run's schedule (the same
        # value when the length did not change). Its base is this run's too (configure_optimizers: base_lr scaled to
        # the global batch), not the one the checkpoint's scheduler state brings back: the same, unless a
        # resume_allow_config_change run changed the batch or base_lr, a change that would otherwise be dropped.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                continue
            if self.scaled_lr is not None:
                scheduler.base_lrs = [self.scaled_lr] * len(scheduler.base_lrs)
                for group in scheduler.optimizer.param_groups:
                    group["initial_lr"] = self.scaled_lr
            # Closed form: base_lr * factor(step).
            lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs

    def on_train_epoch_end(self) -> None:
        # The last steps' losses have not been looked at yet (LossWatch reads each one when the GPU has it ready).
        self.loss_watch.check(wait=True)

    def on_validation_start(self) -> None:
        note_loop_start()
        # Lightning validates before on_train_epoch_end: the weights of a step whose loss was not finite, not read yet
        # on a GPU, would be validated and could be saved as the best checkpoint. Read them all first.
        self.loss_watch.check(wait=True)

    def on_train_end(self) -> None:
        self.loss_watch.check(wait=True)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, InstanceDataModule):
            return
        # The classes and category ids come from the data (and go into every checkpoint).
        self.class_names = datamodule.class_names
        self.label_to_category_id = datamodule.label_to_category_id or None
        # The dataset knows how its labels map to category ids and, for COCO json data, the ground
        # truth pycocotools should score against (crowd regions as ignore regions).
        if stage in ("fit", "validate", "test"):
            split = "test" if stage == "test" else "val"
            self.evaluator = CocoEvaluator(**datamodule.evaluator_kwargs(split))
            if self.cityscapes_eval_workers is not None:
                self.cityscapes_evaluator = CityscapesEvaluator.for_dataset(
                    datamodule.eval_dataset(split), self.cityscapes_eval_workers
                )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODEL_RECORD_KEY] = model_record(self.model, self.class_names, self.label_to_category_id).to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning calls this before it loads the weights: a checkpoint of other classes stops here,
        # naming them, instead of failing on a tensor shape.
        record = checkpoint.get(MODEL_RECORD_KEY)
        if not record:
            return
        record = ModelRecord.from_dict(record)
        check_classes(record.class_names, self.class_names, "the checkpoint")
        # The data's, when the run has data (setup); the checkpoint's otherwise (mode=predict).
        self.class_names = self.class_names or record.class_names
        self.label_to_category_id = self.label_to_category_id or record.label_to_category_id
        set_frozen_bn_eps(self.model, record.frozen_bn_eps)
        warn_if_input_size_differs(record, self.model, "the checkpoint")

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        return self.model(images, targets)

    # ---- training -------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Targets are cleaned and checked here, on the host before the copy to the device, where reading their values
        # costs nothing; in a step on a GPU each read would make the step wait (issue 22).
        if self._trainer is None:
            return batch
        trainer = self.trainer
        if trainer.training:
            images, targets = batch
            batch = (images, model_targets(targets))
        elif trainer.validating or trainer.sanity_checking or trainer.testing:
            images, targets = batch
            # The evaluator's targets (crowd regions and all) stay on the host, where it reads them: a trip to the
            # device and back would copy every full-size mask twice and wait for each read.
            batch = (images, model_targets(targets), HostOnly(list(targets)))
        return batch

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        # Crowd regions were dropped and the targets checked before the batch reached the device.
        _, losses = self.model(list(images), list(targets), targets_checked=True)
        # Every loss the model returns counts: the five of LOSS_KEYS and any a head adds.
        losses = in_display_order(losses)
        total = sum(losses.values())
        self.loss_watch.push(losses, self.global_step)
        self.loss_watch.check()
        self.step_lr = self.optimizers().param_groups[0]["lr"]  # the bar shows it beside this step's losses
        # Only on the steps whose metrics the loggers write: a self.log call costs host time whether or not they do.
        if engine_loggers.writes_train_metrics(self.trainer):
            self._log_train_step(losses, total, len(images))
        return total

    def _log_train_step(self, losses: dict[str, Tensor], total: Tensor, batch_size: int) -> None:
        # Not prog_bar=True: Lightning reads every progress-bar metric on the host after every step, which would make
        # each GPU step wait for the last one to finish. The bar shows the loss watch's host copies instead
        # (mrcnn.engine.progress.ProgressBar); loggers read these values only at their logging steps.
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=batch_size)
        self.log("train/loss", total, batch_size=batch_size)
        # A host tensor: Lightning keeps a metric on its value's device, where a float would be copied to the GPU
        # (a copy from pageable memory, which waits for the GPU's queue) every step.
        self.log("lr", torch.tensor(self.step_lr, dtype=torch.float64), batch_size=batch_size)

    # ---- validation / test ----------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> list[dict[str, Tensor]]:
        """Detections for a batch ``(images, anything)``: per image boxes, labels, scores, masks."""
        images, _ = batch
        detections, _ = self.model(list(images))
        return detections

    def _eval_step(self, batch, stage: str) -> None:
        if len(batch) == 3:  # from on_before_batch_transfer: the model's targets checked, the evaluator's on the host
            images, checked, host_targets = batch
            targets = host_targets.value
        else:  # a step called without Lightning's transfer hooks
            images, targets = batch
            checked = model_targets(targets)
        detections, losses = self.model(list(images), list(checked), targets_checked=True)
        batch_size = len(images)
        losses = in_display_order(losses)
        self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, batch_size=batch_size, sync_dist=True)
        self.log(f"{stage}/loss", sum(losses.values()), batch_size=batch_size, sync_dist=True)
        self.evaluator.update(detections, list(targets))

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def on_test_epoch_start(self) -> None:
        self.evaluator.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_ap("val")

    def on_test_epoch_end(self) -> None:
        self._log_ap("test")

    def _log_ap(self, stage: str) -> None:
        # Every rank calls compute(): it gathers all ranks' predictions, so all get the same numbers.
        metrics = self.evaluator.compute()
        nothing_to_score = self.evaluator.nothing_to_score
        if self.cityscapes_evaluator is not None:
            # The same detections, scored by Cityscapes' own protocol (cityscapes_AP, cityscapes_AP50, per class).
            metrics.update(self.cityscapes_evaluator.compute(self.evaluator.results_json(), self.evaluator.image_ids()))
        self.evaluator.reset()
        if self._trainer is not None and self._trainer.sanity_checking:
            # A few batches, scored so that a broken evaluation fails before the first epoch, not after it: never the
            # run's metrics. (A run resumed from the end of its last epoch is sanity-checked at its final step, where
            # train() takes metrics of the current step for the final validation's.)
            return
        self.nothing_to_score = nothing_to_score
        self.last_metrics = metrics
        self.last_metrics_step = self.global_step
        for key, value in metrics.items():
            # Identical on every rank; sync_dist only keeps Lightning's DDP check quiet.
            self.log(f"{stage}/{key}", value, prog_bar=key in ("segm_AP", "bbox_AP", "cityscapes_AP"), sync_dist=True)

    # ---- optimization ---------------------------------------------------------------------
    def global_batch_size(self) -> int:
        datamodule = self.trainer.datamodule
        # InstanceDataModule, and any other datamodule that states its per-device batch (the benchmarks' prepared
        # batches): the training loader is not built yet when the optimizer is configured.
        if isinstance(datamodule, InstanceDataModule) or hasattr(datamodule, "batch_size"):
            per_device = datamodule.batch_size
        else:
            loader = self.trainer.train_dataloader  # (None here when fit() was given bare dataloaders)
            per_device = getattr(loader, "batch_size", None)
            if per_device is None:
                raise ValueError(
                    "MaskRCNNModule scales its learning rate by the global batch (base_lr at base_batch_size), so it "
                    "must know the batch size when the optimizer is built: give fit() a datamodule with a batch_size "
                    "attribute (mrcnn.data.datamodule.InstanceDataModule), not bare dataloaders"
                )
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        lr = self.base_lr * self.global_batch_size() / self.base_batch_size
        self.scaled_lr = lr
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params, lr=lr)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LossWatch:
    """Stops training on a non-finite loss, and keeps the latest losses for the progress bar, without making any GPU
    step wait for the host.

    Each step's losses are copied to the host asynchronously (``non_blocking``, into pinned memory) behind a CUDA
    event; :meth:`check` reads the copies whose event has completed (usually the previous step's), and ``wait=True``
    reads all (at the end of an epoch). A bad loss stops training at most a few steps late, with the message of
    :func:`check_finite` naming the step it happened at. On the CPU each step is read at once.

    Attributes:
        latest: the losses of the latest step read, as Python floats (``{}`` before the first).
        latest_step: that step (-1 before the first).
    """

    def __init__(self):
        self.pending: collections.deque = collections.deque()
        self.latest: dict[str, float] = {}
        self.latest_step = -1

    def push(self, losses: dict[str, Tensor], step: int) -> None:
        values = torch.stack([v.detach().float() for v in losses.values()])
        event = None
        if values.is_cuda:
            values = values.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.pending.append((step, list(losses), values, event))

    def check(self, wait: bool = False) -> None:
        """Check every pending step whose copy has arrived (all of them with ``wait``), oldest first."""
        while self.pending:
            step, names, values, event = self.pending[0]
            if event is not None:
                if not wait and not event.query():
                    return
                event.synchronize()
            self.pending.popleft()
            check_finite(dict(zip(names, values)), step)
            self.latest, self.latest_step = dict(zip(names, values.tolist())), step


def model_targets(targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The targets the model learns from and scores losses on: without crowd regions (which are ignore regions for
    the evaluator only), checked (:func:`~mrcnn.modeling.mask_rcnn.check_targets`, which names a bad image)."""
    targets = [drop_crowd(t) for t in targets]
    check_targets(targets)
    return targets


class HostOnly:
    """A value that stays on the host when Lightning copies a batch to the device.

    Lightning moves every tensor it finds in a batch's lists, tuples, dicts and dataclasses (and anything with a
    ``to``), but leaves other objects as they are.

    Args:
        value: anything, e.g. a list of target dicts of host tensors.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def in_display_order(losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """All of ``losses``: the five of ``LOSS_KEYS`` first, in the paper's order, then any other a head returns, by name.

    The order is only for display (logs, bar, CSV columns); every loss counts in the total.
    """
    known = [k for k in LOSS_KEYS if k in losses]
    return {k: losses[k] for k in known + sorted(set(losses) - set(known))}


def check_finite(losses: dict[str, Tensor], step: int) -> None:
    """Stop on a non-finite loss, naming the step and every loss that went bad."""
    # One read per step (of host copies under LossWatch); the per-loss values are read only when something went wrong.
    if bool(torch.isfinite(torch.stack([v.detach() for v in losses.values()])).all()):
        return
    bad = {k: v.item() for k, v in losses.items() if not math.isfinite(v.item())}
    if bad:
        detail = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise FloatingPointError(
            f"non-finite loss at step {step}: {detail}. Lower the learning rate, lengthen the warmup, "
            "or use model.norm=gn when training from scratch."
        )
