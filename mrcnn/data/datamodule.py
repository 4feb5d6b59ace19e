"""The LightningDataModule: already-built datasets in, detection dataloaders out."""

from __future__ import annotations

import os
from typing import Any

import lightning
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mrcnn.data.samplers import GroupedBatchSampler, epoch_order, orientation_groups

__all__ = ["InstanceDataModule", "collate_detection", "dataset_image_sizes"]


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
    """``(height, width)`` of every item, without decoding images.

    Uses the dataset's ``image_sizes`` list (COCO, Cityscapes) or, for datasets
    whose images all have one size, its ``image_size`` (shapes).
    """
    if hasattr(dataset, "image_sizes"):
        return [tuple(size) for size in dataset.image_sizes]
    if hasattr(dataset, "image_size"):
        return [tuple(dataset.image_size)] * len(dataset)
    raise ValueError(
        f"aspect_ratio_grouping needs the image sizes, but {type(dataset).__name__} has neither "
        "'image_sizes' nor 'image_size'"
    )


class InstanceDataModule(lightning.LightningDataModule):
    """Serves instance-segmentation datasets that follow the project's data contract.

    The datasets are built outside (Hydra's ``_target_``) and passed in, so any
    dataset with ``class_names`` works here.

    Under DDP every loader is sharded here, by the attached Trainer's world size
    and rank: training with a shuffling ``DistributedSampler`` (or the
    :class:`~mrcnn.data.samplers.GroupedBatchSampler`, which shards itself),
    validation and test with a non-shuffling one (the evaluator counts the images
    it repeats once). Lightning leaves a ``DistributedSampler`` alone, but it
    cannot wrap a custom batch sampler: with ``aspect_ratio_grouping`` the Trainer
    must be built with ``use_distributed_sampler=False``
    (``+trainer.use_distributed_sampler=false``); a clear error says so otherwise.
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
        seed: seed of the training order under DDP or with ``aspect_ratio_grouping``
            (reshuffled every epoch from ``seed + epoch``, identical on all ranks);
            ``None`` takes the seed given to ``lightning.seed_everything``.
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

    @property
    def class_names(self) -> list[str]:
        """Foreground class names; label ``i + 1`` is ``class_names[i]``."""
        return list(self.train_dataset.class_names)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K (background excluded)."""
        return len(self.class_names)

    def evaluator_kwargs(self, stage: str = "val") -> dict[str, Any]:
        """Keyword arguments for :class:`mrcnn.evaluation.CocoEvaluator` on the ``"val"`` or ``"test"`` split.

        ``class_names`` always; ``label_to_category_id`` when the dataset maps labels
        to its own category ids (COCO json ids, Cityscapes labelIds), so results
        carry the dataset's ids; ``coco_gt`` when the dataset has a COCO json ground
        truth (crowd regions as ignore regions, the json's areas), which makes the
        numbers pycocotools' numbers on that json.
        """
        if stage not in ("val", "test"):
            raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")
        dataset = self.test_dataset if stage == "test" else self.val_dataset
        if dataset is None:
            raise ValueError(f"InstanceDataModule has no {stage} dataset")
        kwargs: dict[str, Any] = {"class_names": list(dataset.class_names)}
        label_to_category_id = getattr(dataset, "label_to_category_id", None)
        if label_to_category_id is not None:
            kwargs["label_to_category_id"] = dict(label_to_category_id)
        coco_gt = getattr(dataset, "coco_gt", None)
        if coco_gt is not None:
            kwargs["coco_gt"] = coco_gt
        return kwargs

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

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_detection,
            **kwargs,
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        world, rank = self._world()
        sampler = None
        if world is not None and world > 1:
            # Shard evaluation ourselves: Lightning leaves a DistributedSampler alone, and it
            # works whether or not the Trainer injects samplers (use_distributed_sampler).
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        # Evaluation must see every image: no shuffling, no dropped last batch.
        return self._loader(dataset, batch_size=self.val_batch_size, shuffle=False, sampler=sampler)

    def grouped_batch_sampler(self) -> GroupedBatchSampler:
        """The training batch sampler used when ``aspect_ratio_grouping`` is on."""
        world, rank = self._world()
        group_ids = orientation_groups(dataset_image_sizes(self.train_dataset))
        order = epoch_order(len(self.train_dataset), shuffle=True, seed=self._seed())
        return GroupedBatchSampler(order, group_ids, self.batch_size, num_replicas=world, rank=rank)

    def train_dataloader(self) -> DataLoader:
        if not self.aspect_ratio_grouping:
            world, rank = self._world()
            sampler = None
            if world is not None and world > 1:
                # Shard here rather than leave it to Lightning, so the loader is the same
                # whether or not the Trainer injects samplers (use_distributed_sampler).
                sampler = DistributedSampler(
                    self.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=self._seed()
                )
            # Full batches only, so every epoch has the same number of steps and no
            # step sees a lone image.
            return self._loader(
                self.train_dataset, batch_size=self.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True
            )
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            connector = getattr(trainer, "_accelerator_connector", None)
            if getattr(connector, "use_distributed_sampler", False):
                raise ValueError(
                    "data.datamodule.aspect_ratio_grouping=true shards the training batches by rank itself; "
                    "Lightning cannot wrap a custom batch sampler for DDP. Build the Trainer with "
                    "use_distributed_sampler=False (on the command line +trainer.use_distributed_sampler=false, or "
                    "use_distributed_sampler: false in the trainer config; this datamodule shards all its loaders "
                    "itself), or turn the grouping off (data.datamodule.aspect_ratio_grouping=false)."
                )
        return self._loader(self.train_dataset, batch_sampler=self.grouped_batch_sampler())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise ValueError("InstanceDataModule has no test_dataset; pass one to run testing")
        return self._eval_loader(self.test_dataset)
