"""The LightningDataModule: already-built datasets in, detection dataloaders out."""

from __future__ import annotations

import lightning
from torch.utils.data import DataLoader, Dataset

__all__ = ["InstanceDataModule", "collate_detection"]


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


class InstanceDataModule(lightning.LightningDataModule):
    """Serves instance-segmentation datasets that follow the project's data contract.

    The datasets are built outside (Hydra's ``_target_``) and passed in, so any
    dataset with ``class_names`` works here. Under DDP Lightning wraps the
    samplers in a ``DistributedSampler`` itself (``use_distributed_sampler``).

    Args:
        train_dataset: training dataset; also the source of ``class_names``.
        val_dataset: validation dataset.
        test_dataset: optional test dataset.
        batch_size: training images per batch, per device.
        val_batch_size: validation/test images per batch; defaults to ``batch_size``.
        num_workers: dataloader worker processes (0 loads in the main process).
        pin_memory: pin host memory for faster copies to the GPU.
        persistent_workers: keep workers alive between epochs (only used when
            ``num_workers > 0``).
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

    @property
    def class_names(self) -> list[str]:
        """Foreground class names; label ``i + 1`` is ``class_names[i]``."""
        return list(self.train_dataset.class_names)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes K (background excluded)."""
        return len(self.class_names)

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            # Full batches only in training, so every epoch has the same number of steps
            # and no step sees a lone image; evaluation must see every image.
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_detection,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise ValueError("InstanceDataModule has no test_dataset; pass one to run testing")
        return self._loader(self.test_dataset, self.val_batch_size, train=False)
