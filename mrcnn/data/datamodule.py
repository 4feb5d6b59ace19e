"""The LightningDataModule: already-built datasets in, detection dataloaders out."""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import warnings
from collections.abc import Iterator
from typing import Any

import lightning
import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from mrcnn.data.contract import (
    CountsTrainableAnnotations,
    HasCategoryIds,
    HasCocoGroundTruth,
    HasImageSizes,
    ReportsReadSkips,
)
from mrcnn.data.samplers import (
    EpochSampler,
    GroupedBatchSampler,
    SameSizeBatches,
    epoch_order,
    orientation_groups,
)
from mrcnn.errors import CommandError

log = logging.getLogger(__name__)

__all__ = [
    "InstanceDataModule",
    "ReportingDataLoader",
    "ResumableDataLoader",
    "collate_detection",
    "dataset_image_sizes",
    "report_read_skips",
]


def collate_detection(batch: list[tuple]) -> tuple[tuple, tuple]:
    """Groups a list of ``(image, target)`` samples into ``(images, targets)``.

    Images are not stacked: they may differ in size, and the model's transform
    resizes and pads them into one batch tensor itself.

    Args:
        batch: ``B`` samples ``(image [3, H_i, W_i], target dict)``.

    Returns:
        ``(images, targets)``: two tuples of length ``B``.
    """
    if not batch:
        return (), ()
    return tuple(zip(*batch))


def dataset_image_sizes(dataset: Dataset) -> list[tuple[int, int]]:
    """``(height, width)`` of every item, without decoding images: the dataset's ``image_sizes``
    (:class:`~mrcnn.data.contract.HasImageSizes`)."""
    if isinstance(dataset, HasImageSizes):
        return [tuple(size) for size in dataset.image_sizes]
    raise ValueError(
        f"aspect_ratio_grouping needs the image sizes, but {type(dataset).__name__} has no 'image_sizes' "
        "(mrcnn/data/contract.py)"
    )


def init_worker(worker_id: int, rank: int = 0) -> None:
    """Starts a loader worker: it ignores SIGINT, SIGTERM and SIGUSR2, then seeds itself as Lightning would.

    Ctrl-C, a cluster's SIGTERM and the SIGUSR2 SLURM sends before a time limit under the SLURM launcher
    reach every process of a job, loader workers included (SIGUSR2's default action ends a process). A worker killed
    by one makes the main process fail at once (torch: "DataLoader worker ... is killed by signal")
    instead of finishing its step and saving ``last.ckpt`` (``mrcnn.engine.callbacks.LastCheckpoint``); the
    workers end with the main process anyway. A loader with its own ``worker_init_fn`` does not get
    Lightning's seeding one, so it is called here, with the same arguments.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)


def worker_context(world_size: int | None, num_workers: int, preload: tuple[str, ...] = ()):
    """How a loader's worker processes start: from a fork server in a process of a job of several, else as torch
    starts them (forked from the loading process, on Linux).

    A DDP process runs its process group's threads (gloo's, NCCL's watchdog), and a collective's tensor that Python
    let go of first is freed by one of them a moment after the collective returns. Freeing it takes a Python thread
    state, made under the interpreter's runtime lock without the GIL; a worker forked at that moment inherits the
    lock held and hangs inside ``os.fork`` (CPython gh-112275; seen here on Python 3.11.7). Its loader then waits for
    it forever, and the job's other processes wait in their next collective. A pass's workers start right after
    collectives (Lightning's epoch-end checks, the first validation's). Measured with
    ``benchmarks/fork_after_collectives.py``: 8 hangs in 40,000 forks right after all-reduces, with the test suite
    running beside it, and none in 40,000 workers started from a fork server alike; and in this project's CI, in a
    DDP test with loader workers. A fork server is a process of one thread, started by the loader's first pass; the
    workers are forked from it. It ignores the stop signals SLURM sends every process of a job, as the workers do
    (:mod:`mrcnn.data.fork_server`), and ends with the process that started it.

    The workers then import what the dataset needs and receive it pickled (once per ``fit`` with
    ``persistent_workers``, as every data config with workers sets), and the fork server imports the script's
    ``__main__`` module (``run.py`` is import-safe; a script of your own needs ``if __name__ == "__main__":``, as for
    any start method but fork). Alone, a process has none of these threads: its workers are forked from it.

    Args:
        world_size: the job's number of processes (``None``: not known, one).
        num_workers: the loader's worker processes.
        preload: modules the fork server imports when it starts (the dataset's), so that each worker does not.

    Returns:
        The multiprocessing context for ``DataLoader(multiprocessing_context=...)``; ``None`` for torch's default.
    """
    if num_workers == 0 or (world_size or 1) <= 1 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    # Imported once, by the fork server (a single thread), instead of by every worker. The list counts when the server
    # starts (a process's first such loader); a module left out is imported by each worker. The first after the
    # script: mrcnn.data.fork_server makes the server ignore the stop signals a job's processes get together.
    context.set_forkserver_preload(["__main__", "mrcnn.data.fork_server", "torch", __name__, *preload])
    return context


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch goes into Lightning checkpoints.

    ``state_dict()`` is ``{"epoch", "batches", "seed"}``: the epoch of the current pass
    and how many of its batches the training loop has taken, counted as they leave the
    loader's iterator in the main process (not as workers produce them, which runs
    ahead). Lightning's fit loop stores the state of every training loader that has
    ``state_dict`` / ``load_state_dict`` in the checkpoint
    (``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``) and, when it
    resumes an unfinished epoch, calls ``load_state_dict`` before it iterates the loader.
    The next pass then leaves out the batches already taken, without loading them, so
    training goes on with exactly the batches the uninterrupted run would have seen.
    Under DDP rank zero's state is saved and every rank skips as many batches of its own
    shard (the ranks take batches in lockstep).

    The order comes from the custom batch sampler, else from the sampler (the loader's
    ``BatchSampler`` cuts it into consecutive batches); it must reproduce an epoch's
    order from its ``epoch`` alone (``epoch``, ``set_epoch``, e.g. from ``(seed, epoch)``)
    and start its next pass part-way (``skip(count)``):
    :class:`~mrcnn.data.samplers.EpochSampler`,
    :class:`~mrcnn.data.samplers.GroupedBatchSampler`. Lightning calls ``set_epoch`` at
    every epoch start; outside Lightning call it yourself, or every pass repeats one order.
    With any other sampler it is a plain ``DataLoader`` with an empty state. Given a
    ``generator``, each pass re-seeds it from the sampler's ``(seed, epoch)`` before the
    loader draws its workers' base seed from it, so the workers of an epoch are seeded
    alike in a resumed run as in the uninterrupted one.

    The underlying iterator (and with it the workers' first requests) is only created
    at the first ``next()``, so a ``set_epoch`` between ``iter()`` and the first batch
    still counts: Lightning creates the iterator of the first epoch of a ``fit`` (the
    resumed one too) before it sets that epoch.
    """

    # Plain class defaults, so the DataLoader constructor (and Lightning's re-instantiation
    # of loaders from their arguments) stays untouched.
    _pass_epoch: int | None = None  # epoch of the current pass (None before the first batch)
    _taken: int = 0  # batches of that epoch taken from the loader, those skipped on resume included
    _resume_at: tuple[int, int] | None = None  # (epoch, batches) loaded from a checkpoint, not yet resumed
    _pass_id: int = 0  # which pass counts (no reference to its iterator: that would keep its workers alive)

    def _order(self, resumable: bool = True) -> tuple[Any, int]:
        """The object that decides the order, and how many of its items make a batch.

        With ``resumable``, ``None`` instead of an order that cannot resume (e.g. the
        ``SequentialSampler`` Lightning swaps in for ``overfit_batches``).
        """
        batch_sampler = self.batch_sampler
        if batch_sampler is None:
            source, per_batch = self.sampler, 1
        elif type(batch_sampler) is BatchSampler:
            source, per_batch = batch_sampler.sampler, batch_sampler.batch_size
        else:
            source, per_batch = batch_sampler, 1
        if resumable and not all(hasattr(source, name) for name in ("epoch", "set_epoch", "skip")):
            return None, per_batch
        return source, per_batch

    def __iter__(self) -> Iterator:
        return _ResumableIterator(self)

    def _start_pass(self) -> tuple[int, Iterator]:
        """Starts a pass: skips what a loaded state says was taken; its id and the real iterator."""
        source, per_batch = self._order()
        epoch, skip = (None, 0) if source is None else (int(source.epoch), 0)
        if self._resume_at is not None:
            if self._resume_at[0] == epoch:
                skip = self._resume_at[1]
            self._resume_at = None
        if source is not None:
            source.skip(skip * per_batch)
            if self.generator is not None:
                # The iterator draws its workers' base seed from this generator: from (seed, epoch) as well, so
                # the workers of an epoch are seeded alike in a resumed run, and the main process's torch random
                # state (the model's sampling) is not drawn from at all.
                seed = getattr(source, "seed", None) or 0
                self.generator.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
        self._pass_epoch, self._taken, self._pass_id = epoch, skip, self._pass_id + 1
        return self._pass_id, super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches", "seed", "order"}``: the current pass's epoch and the batches taken from it, and how
        the sampler draws an epoch's order (``EPOCH_ORDER``).

        Empty when the sampler cannot resume.
        """
        source, _ = self._order()
        if source is None:
            return {}
        if self._resume_at is not None:
            epoch, batches = self._resume_at
        elif self._pass_epoch is None:
            epoch, batches = int(source.epoch), 0
        else:
            epoch, batches = self._pass_epoch, self._taken
        return {
            "epoch": epoch,
            "batches": batches,
            "seed": getattr(source, "seed", None),
            "order": getattr(source, "order", None),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The next pass continues ``state_dict``'s epoch after its ``batches`` (the next epoch if that one was done)."""
        source, _ = self._order()
        if not state_dict:
            return
        if source is None:
            warnings.warn(
                f"the training loader's {type(self._order(resumable=False)[0]).__name__} cannot resume part-way: "
                "this epoch starts again from its first batch",
                stacklevel=2,
            )
            return
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        seed = getattr(source, "seed", None)
        if state_dict.get("seed") != seed:
            warnings.warn(
                f"the training loader resumes with seed {seed}, but the checkpoint's order was drawn with seed "
                f"{state_dict.get('seed')}: the batches after the resume are not those the interrupted run would "
                "have seen",
                stacklevel=2,
            )
        order = getattr(source, "order", None)
        if batches and state_dict.get("order") != order:
            # A checkpoint of a version that drew epochs' orders otherwise (torch's seed + epoch, recorded as None).
            warnings.warn(
                f"the training loader resumes epoch {epoch} after {batches} batches, but the checkpoint's version drew "
                f"that epoch's order as {state_dict.get('order') or 'seed + epoch'}, this one as {order}: for the rest "
                "of this epoch some images come twice and others not at all; the epochs after it are whole",
                stacklevel=2,
            )
        source.set_epoch(epoch)
        self._resume_at = (epoch, batches)
        self._pass_epoch, self._taken, self._pass_id = None, 0, self._pass_id + 1


class _ResumableIterator:
    """Iterates a :class:`ResumableDataLoader`: creates its real iterator at the first ``next()`` and counts batches."""

    def __init__(self, loader: ResumableDataLoader):
        self._loader = loader
        self._pass_id = 0
        self._iterator: Iterator | None = None

    def __iter__(self) -> _ResumableIterator:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._pass_id, self._iterator = self._loader._start_pass()
        try:
            batch = next(self._iterator)
        except StopIteration:
            report_read_skips(self._loader.dataset)
            raise
        if self._loader._pass_id == self._pass_id:
            self._loader._taken += 1
        return batch


class ReportingDataLoader(DataLoader):
    """A ``DataLoader`` that reports its dataset's read-time skips (:func:`report_read_skips`) after every pass."""

    def __iter__(self) -> Iterator:
        yield from super().__iter__()
        report_read_skips(self.dataset)


def report_read_skips(dataset: Dataset | None) -> None:
    """Logs the annotations a dataset left out while reading items (``dataset.report_read_skips()``), if it has any.

    Such skips happen in DataLoader workers (e.g. COCO polygons that rasterise to an
    empty mask); the dataset gathers them from the workers and logs one line when new
    ones were found. Datasets without the method (shapes) have none
    (:class:`~mrcnn.data.contract.ReportsReadSkips`).
    """
    if isinstance(dataset, ReportsReadSkips):
        dataset.report_read_skips()


def check_something_to_learn(dataset: Dataset) -> None:
    """Stops when a training set's targets hold no annotation at all (:class:`~mrcnn.data.contract.CountsTrainableAnnotations`).

    A json whose every annotation was skipped (box-only exports without segmentations, ids of an unknown form)
    would otherwise train the whole schedule on background alone, its only sign a warning at the start.
    """
    if isinstance(dataset, CountsTrainableAnnotations) and dataset.num_trainable_annotations == 0:
        why = getattr(dataset, "skip_report", "") or "it has none"
        raise CommandError(f"the training set {dataset!r} has no annotation to train on: {why}")


class InstanceDataModule(lightning.LightningDataModule):
    """Serves instance-segmentation datasets that follow the project's data contract.

    The datasets are built outside (Hydra's ``_target_``) and passed in: any dataset
    that follows the contract of :mod:`mrcnn.data.contract` works here.

    The training loader is a :class:`ResumableDataLoader`: its order depends only on
    ``(seed, epoch, rank)`` and a run resumed from a mid-epoch checkpoint continues
    with the batches the interrupted run would have seen next.

    Under DDP every loader is sharded here, by the attached Trainer's world size
    and rank: training with a shuffling :class:`~mrcnn.data.samplers.EpochSampler` (or the
    :class:`~mrcnn.data.samplers.GroupedBatchSampler`, which shards itself),
    validation and test with a non-shuffling one (the evaluator counts the images
    it repeats once). Lightning leaves a ``DistributedSampler`` alone, but it
    cannot wrap a custom batch sampler: with ``aspect_ratio_grouping`` the Trainer
    must be built with ``use_distributed_sampler=False`` (``trainer=ddp`` and ``ddp_cpu`` set it; elsewhere
    ``++trainer.use_distributed_sampler=false``); a clear error says so otherwise.
    That setting is right for every loader of this module.

    Args:
        train_dataset: training dataset; also the source of ``class_names``.
        val_dataset: validation dataset; the source of the evaluator's settings
            (:meth:`evaluator_kwargs`).
        test_dataset: optional test dataset.
        batch_size: training images per batch, per device.
        val_batch_size: validation/test images per batch; defaults to ``batch_size``.
        num_workers: dataloader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster copies to the GPU.
        persistent_workers: keep workers alive between epochs (only used when
            ``num_workers > 0``).
        aspect_ratio_grouping: batch landscape and portrait training images
            separately (every batch then has ``batch_size`` images, a group's last
            batch completed by repeating images of that group).
        seed: seed of the training order (reshuffled every epoch from ``(seed, epoch)``,
            identical on all ranks); ``None`` takes the seed given to
            ``lightning.seed_everything``.
    """

    def __init__(
        self,
        train_dataset: Dataset,
        val_dataset: Dataset,
        test_dataset: Dataset | None = None,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        aspect_ratio_grouping: bool = False,
        seed: int | None = None,
    ):
        super().__init__()
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.test_dataset = test_dataset
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.aspect_ratio_grouping = aspect_ratio_grouping
        self.seed = seed
        self._train_loader: ResumableDataLoader | None = None  # the last one built
        self._train_loader_state: dict[str, Any] | None = None  # from a checkpoint, for the next one
        self._told_left_out = False  # the images full batches leave out of each epoch: said once

    @property
    def class_names(self) -> list[str]:
        """Foreground class names; label ``i + 1`` is ``class_names[i]``."""
        return list(self.train_dataset.class_names)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K (background excluded)."""
        return len(self.class_names)

    @property
    def label_to_category_id(self) -> dict[int, int] | None:
        """The training data's ``{label: category id}``, when it has one (:class:`~mrcnn.data.contract.HasCategoryIds`)."""
        if isinstance(self.train_dataset, HasCategoryIds) and self.train_dataset.label_to_category_id is not None:
            return {int(k): int(v) for k, v in self.train_dataset.label_to_category_id.items()}
        return None

    def eval_dataset(self, stage: str = "val") -> Dataset | None:
        """The ``"val"`` or ``"test"`` dataset."""
        if stage not in ("val", "test"):
            raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")
        return self.test_dataset if stage == "test" else self.val_dataset

    def evaluator_kwargs(self, stage: str = "val") -> dict[str, Any]:
        """Keyword arguments for :class:`mrcnn.evaluation.CocoEvaluator` on the ``"val"`` or ``"test"`` split.

        ``class_names`` always; ``label_to_category_id`` when the dataset maps labels
        to its own category ids (COCO json ids, Cityscapes labelIds), so results
        carry the dataset's ids; ``coco_gt`` when the dataset has a COCO json ground
        truth (crowd regions as ignore regions, the json's areas), which makes the
        numbers pycocotools' numbers on that json.
        """
        dataset = self.eval_dataset(stage)
        if dataset is None:
            raise ValueError(f"InstanceDataModule has no {stage} dataset")
        kwargs: dict[str, Any] = {"class_names": list(dataset.class_names)}
        if isinstance(dataset, HasCategoryIds) and dataset.label_to_category_id is not None:
            kwargs["label_to_category_id"] = dict(dataset.label_to_category_id)
        if isinstance(dataset, HasCocoGroundTruth) and dataset.coco_gt is not None:
            kwargs["coco_gt"] = dataset.coco_gt
        return kwargs

    # ------------------------------------------------------------------ resuming

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (``checkpoint["InstanceDataModule"]["train_loader"]``)."""
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Gives a checkpoint's training loader position to the training loader (the next one built, or the current).

        Lightning's fit loop restores the states of stateful training loaders itself, but only when
        it builds the loader after the checkpoint is restored; ``trainer.estimated_stepping_batches``
        in ``configure_optimizers`` (this project's lr schedule) builds it before, and the position
        is dropped (Lightning issue 20550). Lightning restores the datamodule's state before that
        (after it, with strategies that restore after setup): the position reaches the loader either
        way. Loading it twice is harmless.
        """
        state = state_dict.get("train_loader")
        if state and self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._train_loader_state = state or None

    def teardown(self, stage: str) -> None:
        # A position restored for one run (e.g. trainer.validate(ckpt_path=...)) is not for the next fit.
        self._train_loader_state = None
        # Skips found in a pass that did not run to its end (max_steps, limit_*_batches, an interrupt).
        for dataset in (self.train_dataset, self.val_dataset, self.test_dataset):
            report_read_skips(dataset)

    # ------------------------------------------------------------------ loaders

    def _seed(self) -> int:
        # Like Lightning's own samplers: the seed given to seed_everything unless one is set here.
        return int(os.environ.get("PL_GLOBAL_SEED", 0)) if self.seed is None else int(self.seed)

    def _world(self) -> tuple[int | None, int | None]:
        """(world size, rank) from the attached Trainer; ``(None, None)`` without one."""
        trainer = self.trainer
        if trainer is None:
            return None, None
        return trainer.world_size, trainer.global_rank

    def _loader(self, dataset: Dataset, loader_class: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        world, rank = self._world()
        return loader_class(
            dataset,
            num_workers=self.num_workers,
            # Pinned memory only speeds up copies to a GPU; without one torch warns and ignores it.
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            multiprocessing_context=worker_context(world, self.num_workers, (type(dataset).__module__,)),
            collate_fn=collate_detection,
            worker_init_fn=functools.partial(init_worker, rank=rank or 0),
            # Its own generator for the workers' base seed (the training loader re-seeds it each epoch): a
            # loader drawing it from torch's global generator would shift the model's random draws (RPN and
            # RoI sampling) by one at each pass, validation and sanity check included, and a resumed run, which
            # runs a sanity check the uninterrupted run did not, would draw differently from then on.
            generator=torch.Generator().manual_seed(self._seed()),
            **kwargs,
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        world, rank = self._world()
        sizes = dataset_image_sizes(dataset) if isinstance(dataset, HasImageSizes) else None
        if sizes and self.val_batch_size > 1 and len(set(sizes)) > 1 and not self._lightning_injects_samplers():
            # Images of one size a batch: an image's detections, and the AP, do not depend on the batch size or the
            # number of processes (the padding to a batch's largest image reaches GroupNorm's statistics).
            batches = SameSizeBatches(sizes, self.val_batch_size, num_replicas=world or 1, rank=rank or 0)
            return self._loader(dataset, ReportingDataLoader, batch_sampler=batches)
        sampler = None
        if world is not None and world > 1:
            # Shard evaluation ourselves: Lightning leaves a DistributedSampler alone, and it
            # works whether or not the Trainer injects samplers (use_distributed_sampler).
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        # Evaluation must see every image: no shuffling, no dropped last batch.
        return self._loader(
            dataset, ReportingDataLoader, batch_size=self.val_batch_size, shuffle=False, sampler=sampler
        )

    def grouped_batch_sampler(self) -> GroupedBatchSampler:
        """The training batch sampler used when ``aspect_ratio_grouping`` is on."""
        world, rank = self._world()
        group_ids = orientation_groups(dataset_image_sizes(self.train_dataset))
        order = epoch_order(len(self.train_dataset), shuffle=True, seed=self._seed())
        return GroupedBatchSampler(order, group_ids, self.batch_size, num_replicas=world, rank=rank)

    def train_dataloader(self) -> ResumableDataLoader:
        check_something_to_learn(self.train_dataset)
        if self.aspect_ratio_grouping:
            self._check_grouping_under_ddp()
            loader = self._loader(self.train_dataset, ResumableDataLoader, batch_sampler=self.grouped_batch_sampler())
        else:
            world, rank = self._world()
            # Shard here rather than leave it to Lightning (which leaves a DistributedSampler
            # alone), so the loader is the same whether or not the Trainer injects samplers
            # (use_distributed_sampler), and the order depends only on (seed, epoch, rank).
            sampler = EpochSampler(
                self.train_dataset, num_replicas=world or 1, rank=rank or 0, shuffle=True, seed=self._seed()
            )
            # Full batches only, so every epoch has the same number of steps and no
            # step sees a lone image.
            loader = self._loader(
                self.train_dataset, ResumableDataLoader, batch_size=self.batch_size, sampler=sampler, drop_last=True
            )
            if len(loader) == 0:
                # Lightning would only warn, skip training and report the untrained model's AP as the run's.
                per_process = f" ({len(sampler)} a process over {world})" if (world or 1) > 1 else ""
                raise CommandError(
                    f"the training set has {len(self.train_dataset)} image(s){per_process}, fewer than one batch "
                    f"(data.datamodule.batch_size={self.batch_size}): training would take no step. Lower the batch "
                    "size, add images, or turn on data.datamodule.aspect_ratio_grouping (it fills a last batch "
                    "with repeated images)."
                )
            trained = len(loader) * self.batch_size * (world or 1)
            if trained < len(self.train_dataset) and not self._told_left_out:
                # Full batches only: the rest of each epoch's order is left out (other images each epoch).
                self._told_left_out = True
                log.info(
                    "each epoch trains on %d of the training set's %d images (full batches of %d%s); the other %d "
                    "are left out of that epoch's shuffled order",
                    trained,
                    len(self.train_dataset),
                    self.batch_size,
                    f" on each of {world} processes" if (world or 1) > 1 else "",
                    len(self.train_dataset) - trained,
                )
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    def _lightning_injects_samplers(self) -> bool:
        """Whether the attached Trainer runs several processes and would wrap this module's samplers for DDP
        (``use_distributed_sampler``), which it cannot do for a custom batch sampler."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return False
        return bool(getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False))

    def _check_grouping_under_ddp(self) -> None:
        if self._lightning_injects_samplers():
            raise CommandError(
                "data.datamodule.aspect_ratio_grouping=true shards the training batches by rank itself; "
                "Lightning cannot wrap a custom batch sampler for DDP. Build the Trainer with "
                "use_distributed_sampler=False (trainer=ddp and trainer=ddp_cpu set it; on the command line "
                "++trainer.use_distributed_sampler=false, or use_distributed_sampler: false in the trainer "
                "config; this datamodule shards all its loaders itself), or turn the grouping off "
                "(data.datamodule.aspect_ratio_grouping=false)."
            )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise ValueError("InstanceDataModule has no test_dataset; pass one to run testing")
        return self._eval_loader(self.test_dataset)
