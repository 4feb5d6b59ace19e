"""Aspect-ratio grouping: batches of images with the same orientation, sharded over DDP ranks.

The model pads every batch to its largest image; a batch that mixes a portrait and a
landscape image is mostly padding. Grouping batches by orientation (as torchvision's
detection references and Detectron2 do) avoids that.

Lightning only wraps plain samplers for DDP, not custom batch samplers: with
:class:`GroupedBatchSampler` the Trainer must run with
``use_distributed_sampler=False``, and the sampler shards by rank itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["GroupedBatchSampler", "epoch_order", "orientation_groups"]


def orientation_groups(image_sizes: Iterable[tuple[int, int]]) -> list[int]:
    """Group id per image: 0 for landscape or square (``width >= height``), 1 for portrait.

    Args:
        image_sizes: ``(height, width)`` of each image.
    """
    return [0 if width >= height else 1 for height, width in image_sizes]


def _default_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class GroupedBatchSampler(Sampler[list[int]]):
    """Yields batches of indices that all share one group id, this rank's share of them.

    Every epoch, on every rank alike: walk ``sampler``'s order of all indices, put
    each index in its group's buffer and emit a batch whenever a buffer holds
    ``batch_size`` indices; complete each group's last, short batch by repeating
    indices of the same group. Then pad the list of batches to a multiple of
    ``num_replicas`` by repeating its first batches, and give rank ``r`` batches
    ``r, r + num_replicas, ...``. So every index is used at least once per epoch
    across all ranks (more only through padding), every batch has ``batch_size``
    indices of one group, and every rank gets the same number of batches (DDP
    needs that, or the ranks' gradient all-reduces fall out of step).

    Args:
        sampler: the order of all dataset indices for the epoch, identical on every
            rank (e.g. ``DistributedSampler(dataset, num_replicas=1, rank=0,
            shuffle=True, seed=s)``, whose ``set_epoch`` reshuffles). Lightning calls
            ``set_epoch`` on ``batch_sampler.sampler`` at each epoch.
        group_ids: group of each dataset index (e.g. :func:`orientation_groups`).
        batch_size: indices per batch.
        num_replicas: number of DDP ranks; defaults to torch.distributed's world size
            when it is initialized, else 1.
        rank: this process's rank; defaults to torch.distributed's rank, else 0.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Iterable[int],
        group_ids: Sequence[int],
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        world, own_rank = _default_world()
        self.num_replicas = world if num_replicas is None else int(num_replicas)
        self.rank = own_rank if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        self.sampler = sampler
        self.group_ids = [int(g) for g in group_ids]
        self.batch_size = int(batch_size)
        counts: dict[int, int] = {}
        for g in self.group_ids:
            counts[g] = counts.get(g, 0) + 1
        self._total_batches = sum(math.ceil(n / self.batch_size) for n in counts.values())

    def set_epoch(self, epoch: int) -> None:
        """Passes the epoch on to ``sampler`` (if it reshuffles by epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _all_batches(self) -> list[list[int]]:
        """The epoch's batches for all ranks, before sharding."""
        buffers: dict[int, list[int]] = {}
        seen: dict[int, list[int]] = {}  # per group, its indices this epoch (for completing short batches)
        batches = []
        for index in self.sampler:
            group = self.group_ids[index]
            buffers.setdefault(group, []).append(index)
            seen.setdefault(group, []).append(index)
            if len(buffers[group]) == self.batch_size:
                batches.append(buffers.pop(group))
        for group in sorted(buffers):
            batch, pool = buffers[group], seen[group]
            # Repeat the group's indices from its first one on (cycling when the group is tiny).
            batch += [pool[i % len(pool)] for i in range(self.batch_size - len(batch))]
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        if not batches:
            return
        padded = len(self) * self.num_replicas
        batches += [batches[i % len(batches)] for i in range(padded - len(batches))]
        yield from batches[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        """Batches per rank and epoch (the same on every rank)."""
        return math.ceil(self._total_batches / self.num_replicas)


def epoch_order(num_items: int, shuffle: bool = True, seed: int = 0) -> Sampler[int]:
    """A sampler of all ``num_items`` indices, reshuffled by ``set_epoch`` from ``seed``, identical on every rank.

    It is torch's ``DistributedSampler`` with a single replica: a permutation drawn
    from ``seed + epoch``, which is exactly what every rank of a
    :class:`GroupedBatchSampler` must agree on.
    """
    return torch.utils.data.DistributedSampler(range(num_items), num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
