"""Training samplers: an order from (seed, epoch, rank) alone, resumable part-way through an epoch.

:class:`EpochSampler` shuffles all indices (a permutation drawn from ``(seed, epoch)``, dealt out to
the ranks as torch's ``DistributedSampler`` does); :class:`GroupedBatchSampler` batches
images by orientation, sharded over DDP ranks. Both reproduce an epoch's order from
their ``epoch`` alone and can start their next pass part-way (``skip``): what
:class:`~mrcnn.data.datamodule.ResumableDataLoader` needs to continue a checkpointed
epoch at the batch where it stopped.

Aspect-ratio grouping: the model pads every batch to its largest image; a batch that
mixes a portrait and a landscape image is mostly padding. Grouping batches by
orientation (as torchvision's detection references and Detectron2 do) avoids that.

Lightning only wraps plain samplers for DDP, not custom batch samplers: with
:class:`GroupedBatchSampler` the Trainer must run with
``use_distributed_sampler=False``, and the sampler shards by rank itself.

Evaluation: :class:`SameSizeBatches` batches images of one size together, so that no image's detections depend on
the other images of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

__all__ = [
    "EPOCH_ORDER",
    "EpochSampler",
    "GroupedBatchSampler",
    "SameSizeBatches",
    "SampleIndex",
    "epoch_order",
    "order_seed",
    "orientation_groups",
]


class SampleIndex(int):
    """A dataset index that also says which draw of the training stream it is: ``(seed, epoch, repeat)``.

    It is an ``int`` everywhere (list indexing, arithmetic, comparisons, ``json``), so every dataset takes it;
    a dataset that augments reads ``seed``, ``epoch`` and ``repeat`` from it (``getattr``) and draws the
    augmentation of this item from ``(seed, epoch, index, repeat)`` alone
    (:class:`mrcnn.data.transforms.InstanceTransform`). The draw is then the same whichever process loads the
    item, in whatever order, with any number of loader workers, and in a run resumed part-way through the epoch: no
    random state of a worker has to be kept. :class:`EpochSampler` yields these, and :class:`GroupedBatchSampler`
    numbers the repeats it makes.

    Args:
        index: the dataset index.
        seed: the training order's seed (the run's seed).
        epoch: the epoch of this pass.
        repeat: how many times the epoch's order (all ranks together) used this index before: 0 for its first use.
            An index used again in one epoch (DDP's padding to equal shares, a group's short batch completed) is
            augmented anew each time, as a random draw would be, not as an exact copy of its first use.
    """

    seed: int
    epoch: int
    repeat: int

    def __new__(cls, index: int, seed: int = 0, epoch: int = 0, repeat: int = 0):
        self = super().__new__(cls, index)
        self.seed, self.epoch, self.repeat = int(seed), int(epoch), int(repeat)
        return self

    def again(self, repeat: int) -> SampleIndex:
        """This index's use number ``repeat`` in the same epoch."""
        return SampleIndex(int(self), self.seed, self.epoch, repeat)

    def __repr__(self) -> str:
        again = f", repeat={self.repeat}" if self.repeat else ""
        return f"SampleIndex({int(self)}, seed={self.seed}, epoch={self.epoch}{again})"


def orientation_groups(image_sizes: Iterable[tuple[int, int]]) -> list[int]:
    """Group id per image: 0 for landscape or square (``width >= height``), 1 for portrait.

    Args:
        image_sizes: ``(height, width)`` of each image.
    """
    return [0 if width >= height else 1 for height, width in image_sizes]


# How an epoch's order is drawn, saved with a loader's position: a checkpoint saved part-way through an epoch by a
# version that drew it otherwise (torch's seed + epoch, before this name existed) resumes into another order.
EPOCH_ORDER = "order_seed"


def order_seed(seed: int, epoch: int) -> int:
    """The seed of the training order of ``epoch`` in a run seeded ``seed``: the pair hashed, not ``seed + epoch``.

    torch's ``DistributedSampler`` draws epoch ``e`` from ``seed + e``, so a run seeded ``s`` trains on the orders of
    the run seeded ``s + 1``, shifted by one epoch: the seeds of an ablation (0, 1, 2) shared all but one of their
    epochs' orders, and their spread left out what the data order adds. numpy's ``SeedSequence`` mixes the pair
    into a 32-bit seed (what torch's CPU generator reads of its seed), so every pair draws an order of its own.
    """
    return int(np.random.SeedSequence([int(seed) % 2**64, int(epoch)]).generate_state(1)[0])


def _default_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSampler(DistributedSampler):
    """torch's ``DistributedSampler`` whose next pass can start part-way through the epoch, and whose epochs'
    orders do not repeat across seeds.

    The epoch's order is a permutation drawn from :func:`order_seed` of ``(seed, epoch)`` (``set_epoch``), padded
    to a multiple of ``num_replicas`` (or cut, with ``drop_last``) and dealt out to the ranks as torch's sampler
    does, so it depends only on ``(seed, epoch, rank)``. Each index comes as a :class:`SampleIndex` carrying
    ``(seed, epoch)``, from which datasets draw the item's augmentation. Being a ``DistributedSampler``, Lightning leaves it
    alone under DDP and calls its ``set_epoch`` at every epoch start.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas: number of DDP ranks; defaults to torch.distributed's world size
            when it is initialized, else 1.
        rank: this process's rank; defaults to torch.distributed's rank, else 0.
        shuffle, seed, drop_last: as for ``DistributedSampler``.
    """

    def __init__(
        self,
        dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        world, own_rank = _default_world()
        super().__init__(
            dataset,
            num_replicas=world if num_replicas is None else int(num_replicas),
            rank=own_rank if rank is None else int(rank),
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self._skip = 0

    order = EPOCH_ORDER  # how each epoch's order is drawn (saved with a loader's position)

    def skip(self, count: int) -> None:
        """Makes the next pass leave out the first ``count`` indices of this rank's epoch order."""
        self._skip = int(count)

    def __iter__(self) -> Iterator[SampleIndex]:
        count = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(order_seed(self.seed, self.epoch))
            indices = torch.randperm(count, generator=generator).tolist()
        else:
            indices = list(range(count))
        # torch's DistributedSampler from here: every rank gets as many indices (the first ones repeated, or the
        # last ones left out with drop_last), rank r those at r, r + num_replicas, ...
        padding = self.total_size - count
        if padding > 0:
            indices += (indices * math.ceil(padding / count))[:padding]
        # The order's position p holds a use of its index that is number p // count (the padding cycles the order).
        positions = range(self.rank, self.total_size, self.num_replicas)
        start, self._skip = self._skip, 0
        return iter([SampleIndex(indices[p], self.seed, self.epoch, p // count) for p in positions[start:]])


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

    The order is reproducible from ``sampler``'s epoch (``epoch``, ``set_epoch``) and
    a pass can start part-way (``skip``), for resuming mid-epoch.

    Args:
        sampler: the order of all dataset indices for the epoch, identical on every
            rank (e.g. :func:`epoch_order`, whose ``set_epoch`` reshuffles). Lightning
            calls ``set_epoch`` on ``batch_sampler.sampler`` at each epoch.
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
        # Each rank takes its share of the batches here: an order already split by rank (a DistributedSampler, an
        # EpochSampler under DDP) would split twice, and the epoch would use 1 / world of the data, padded up to length.
        split = int(getattr(sampler, "num_replicas", 1) or 1)
        if split > 1 or (hasattr(sampler, "__len__") and len(sampler) != len(group_ids)):
            raise ValueError(
                f"GroupedBatchSampler needs the order of all {len(group_ids)} indices, the same on every rank, and "
                f"splits the batches between ranks itself; it got a sampler of "
                f"{len(sampler) if hasattr(sampler, '__len__') else 'unknown'} indices"
                + (f" already split between {split} ranks" if split > 1 else "")
                + " (use mrcnn.data.samplers.epoch_order)"
            )
        self.sampler = sampler
        self.group_ids = [int(g) for g in group_ids]
        self.batch_size = int(batch_size)
        counts: dict[int, int] = {}
        for g in self.group_ids:
            counts[g] = counts.get(g, 0) + 1
        self._total_batches = sum(math.ceil(n / self.batch_size) for n in counts.values())
        self._skip = 0

    @property
    def epoch(self) -> int:
        """``sampler``'s epoch (0 if it has none)."""
        return int(getattr(self.sampler, "epoch", 0))

    @property
    def seed(self) -> int | None:
        """``sampler``'s seed (``None`` if it has none)."""
        return getattr(self.sampler, "seed", None)

    @property
    def order(self) -> str | None:
        """How ``sampler`` draws an epoch's order (``None`` if it does not say)."""
        return getattr(self.sampler, "order", None)

    def set_epoch(self, epoch: int) -> None:
        """Passes the epoch on to ``sampler`` (if it reshuffles by epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def skip(self, count: int) -> None:
        """Makes the next pass leave out this rank's first ``count`` batches of the epoch."""
        self._skip = int(count)

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
        start, self._skip = self._skip, 0
        batches = self._all_batches()
        if not batches:
            return
        padded = len(self) * self.num_replicas
        batches += [batches[i % len(batches)] for i in range(padded - len(batches))]
        yield from _number_repeats(batches)[self.rank :: self.num_replicas][start:]

    def __len__(self) -> int:
        """Batches per rank and epoch (the same on every rank)."""
        return math.ceil(self._total_batches / self.num_replicas)


def _number_repeats(batches: list[list[int]]) -> list[list[int]]:
    """``batches`` with each later use of a :class:`SampleIndex` in them numbered (:meth:`SampleIndex.again`), in
    order; plain ints, which carry no draw, are left as they are."""
    uses: dict[int, int] = {}
    numbered = []
    for batch in batches:
        row = []
        for index in batch:
            used = uses.get(int(index), 0)
            uses[int(index)] = used + 1
            row.append(index.again(used) if used and isinstance(index, SampleIndex) else index)
        numbered.append(row)
    return numbered


def epoch_order(num_items: int, shuffle: bool = True, seed: int = 0) -> EpochSampler:
    """A sampler of all ``num_items`` indices, reshuffled by ``set_epoch`` from ``seed``, identical on every rank.

    It is an :class:`EpochSampler` with a single replica: a permutation drawn from
    ``(seed, epoch)`` alone, which is exactly what every rank of a :class:`GroupedBatchSampler`
    must agree on.
    """
    return EpochSampler(range(num_items), num_replicas=1, rank=0, shuffle=shuffle, seed=seed)


class SameSizeBatches(Sampler[list[int]]):
    """Evaluation batches whose images all have one size, this rank's share of them.

    The model pads a batch's images to its largest (height and width rounded up to 32), and the padding reaches the
    backbone: its convolutions at each image's border, and GroupNorm's statistics everywhere. In a batch of mixed
    sizes an image's detections would depend on the images beside it, and a checkpoint's AP on the batch size and on
    the number of processes. Images of one size are padded alike in any batch of them and alone: their detections
    are those of a batch of one, whatever the batch size.

    Within each size the images keep the dataset's order; the sizes come in the order of their first image. The list
    of batches is padded to a multiple of ``num_replicas`` by repeating its first batches (the evaluator counts a
    repeated image once), and rank ``r`` takes batches ``r, r + num_replicas, ...``: every rank runs as many batches,
    so DDP's collectives stay in step.

    Args:
        image_sizes: ``(height, width)`` of every dataset index.
        batch_size: at most this many indices a batch.
        num_replicas: the number of DDP processes.
        rank: this process's rank.
    """

    def __init__(
        self, image_sizes: Sequence[tuple[int, int]], batch_size: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(image_sizes):
            by_size.setdefault(tuple(size), []).append(index)
        batches = [
            indices[start : start + batch_size]
            for indices in by_size.values()
            for start in range(0, len(indices), batch_size)
        ]
        if batches and len(batches) % num_replicas:
            padded = math.ceil(len(batches) / num_replicas) * num_replicas
            batches = [batches[i % len(batches)] for i in range(padded)]
        self.batches = batches[rank::num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return (list(batch) for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)
