"""GroupedBatchSampler: orientation-pure batches, every index once per epoch across DDP ranks."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

from mrcnn.data.datamodule import InstanceDataModule, dataset_image_sizes
from mrcnn.data.samplers import (
    EpochSampler,
    GroupedBatchSampler,
    SameSizeBatches,
    epoch_order,
    orientation_groups,
)
from mrcnn.data.shapes import ShapesDataset


def _groups(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=generator) < 0.3).long().tolist()


def _epoch(group_ids, batch_size, num_replicas, epoch=0, seed=0):
    """Batches of every rank for one epoch."""
    per_rank = []
    for rank in range(num_replicas):
        order = epoch_order(len(group_ids), seed=seed)
        sampler = GroupedBatchSampler(order, group_ids, batch_size, num_replicas=num_replicas, rank=rank)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
        assert len(per_rank[-1]) == len(sampler)
    return per_rank


def test_orientation_groups():
    assert orientation_groups([(480, 640), (640, 480), (500, 500)]) == [0, 1, 0]


@pytest.mark.parametrize("n,batch_size,num_replicas", [(37, 4, 1), (37, 4, 3), (64, 2, 4), (5, 4, 2), (100, 3, 8)])
def test_every_index_once_per_epoch_across_ranks(n, batch_size, num_replicas):
    group_ids = _groups(n)
    per_rank = _epoch(group_ids, batch_size, num_replicas)
    # Every rank gets the same number of full batches (DDP steps must match) ...
    assert len({len(batches) for batches in per_rank}) == 1
    batches = [batch for rank_batches in per_rank for batch in rank_batches]
    assert all(len(batch) == batch_size for batch in batches)
    # ... each batch shares one orientation ...
    assert all(len({group_ids[i] for i in batch}) == 1 for batch in batches)
    # ... and every index is used, more than once only through padding.
    counts = Counter(i for batch in batches for i in batch)
    assert set(counts) == set(range(n))
    group_sizes = Counter(group_ids)
    full_batches = sum(-(-size // batch_size) for size in group_sizes.values())
    group_padding = full_batches * batch_size - n
    rank_padding = (len(per_rank[0]) * num_replicas - full_batches) * batch_size
    assert sum(counts.values()) - n == group_padding + rank_padding
    assert group_padding < batch_size * len(group_sizes) and rank_padding < batch_size * num_replicas
    # Each use of an index is numbered in the epoch (all ranks together): augmented anew, not as a copy.
    assert sorted((int(i), i.repeat) for i in indices_of(batches)) == sorted(
        (i, k) for i, count in counts.items() for k in range(count)
    )
    assert all((i.seed, i.epoch) == (0, 0) for i in indices_of(batches))


def indices_of(batches):
    return [i for batch in batches for i in batch]


def test_without_padding_each_index_exactly_once():
    group_ids = [0] * 24 + [1] * 8  # 6 + 2 batches of 4: divisible by 2 ranks
    per_rank = _epoch(group_ids, 4, 2)
    indices = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(indices) == list(range(32))
    assert [len(b) for b in per_rank] == [4, 4]


def test_ranks_share_one_shuffle_that_changes_by_epoch():
    group_ids = _groups(50)
    epoch0 = _epoch(group_ids, 4, 2, epoch=0)
    assert _epoch(group_ids, 4, 2, epoch=0) == epoch0
    epoch1 = _epoch(group_ids, 4, 2, epoch=1)
    assert epoch1 != epoch0
    assert _epoch(group_ids, 4, 2, seed=5) != epoch0


def test_defaults_without_torch_distributed():
    sampler = GroupedBatchSampler(range(10), [0] * 10, 4)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    # The short last batch is completed with the group's first indices of the epoch.
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    with pytest.raises(ValueError, match="rank"):
        GroupedBatchSampler(range(10), [0] * 10, 4, num_replicas=2, rank=2)
    # An order already split by rank would be split again: half the data, padded up to length.
    with pytest.raises(
        ValueError, match=r"order of all 16 indices.*got a sampler of 8 indices already split between 2"
    ):
        GroupedBatchSampler(EpochSampler(range(16), num_replicas=2, rank=0), [0] * 16, 2, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="got a sampler of 9 indices"):
        GroupedBatchSampler(range(9), [0] * 10, 4)


def test_epoch_sampler_deals_its_order_out_as_torchs_distributed_sampler_and_skips_for_one_pass():
    sampler = EpochSampler(range(10), seed=3)
    assert (sampler.num_replicas, sampler.rank, sampler.epoch) == (1, 0, 0)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    for drop_last, length in ((False, 4), (True, 3)):
        for rank in range(3):
            # torch's sampler over the positions of our order, unshuffled: its padding (or cut) and dealing out.
            torch_sampler = DistributedSampler(range(10), num_replicas=3, rank=rank, shuffle=False, drop_last=drop_last)
            ours = EpochSampler(range(10), num_replicas=3, rank=rank, seed=3, drop_last=drop_last)
            ours.set_epoch(2)
            assert list(ours) == [order[i] for i in torch_sampler] and len(ours) == len(torch_sampler) == length
            # The padding's indices (10 -> 12: the order's first two) are their second use in the epoch.
            assert [i.repeat for i in ours] == [int(p >= 10) for p in range(rank, 3 * length, 3)]
    # An order shorter than the ranks cycles: each use numbered.
    tiny = [list(EpochSampler(range(1), num_replicas=3, rank=rank)) for rank in range(3)]
    assert [[(int(i), i.repeat) for i in share] for share in tiny] == [[(0, 0)], [(0, 1)], [(0, 2)]]
    unshuffled = EpochSampler(range(10), num_replicas=3, rank=1, shuffle=False)
    assert list(unshuffled) == list(DistributedSampler(range(10), num_replicas=3, rank=1, shuffle=False))
    sampler.set_epoch(1)
    full = list(sampler)
    assert full != list(EpochSampler(range(10), seed=3))  # reshuffled by epoch
    sampler.skip(4)
    assert list(sampler) == full[4:]
    assert len(sampler) == 10  # the epoch's length, not the pass's
    assert list(sampler) == full  # the skip was for one pass


@pytest.mark.parametrize("num_replicas", [1, 3])
def test_grouped_sampler_skips_batches_of_its_own_shard_for_one_pass(num_replicas):
    group_ids = _groups(50)
    for rank in range(num_replicas):
        sampler = GroupedBatchSampler(epoch_order(50, seed=7), group_ids, 4, num_replicas=num_replicas, rank=rank)
        sampler.set_epoch(3)
        assert (sampler.epoch, sampler.seed) == (3, 7)
        full = list(sampler)
        sampler.skip(2)
        skipped = list(sampler)
        assert skipped == full[2:]
        assert [[i.repeat for i in batch] for batch in skipped] == [[i.repeat for i in batch] for batch in full[2:]]
        assert list(sampler) == full
    # Over an order without epochs (a plain range) there is no epoch or seed to report.
    plain = GroupedBatchSampler(range(8), [0] * 8, 4)
    assert (plain.epoch, plain.seed) == (0, None)


def _shapes_datamodule(**kwargs):
    train = ShapesDataset(num_images=12, image_size=(32, 48), seed=0)
    val = ShapesDataset(num_images=5, image_size=(32, 48), split="val")
    return InstanceDataModule(train, val, batch_size=4, val_batch_size=2, aspect_ratio_grouping=True, **kwargs)


def test_datamodule_grouped_loader_and_ddp_flag():
    dm = _shapes_datamodule()
    assert dataset_image_sizes(dm.train_dataset) == [(32, 48)] * 12
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, GroupedBatchSampler)
    assert [len(images) for images, _ in loader] == [4, 4, 4]
    assert all(image.shape == (3, 32, 48) for images, _ in loader for image in images)

    # Under DDP with Lightning's sampler injection on, a clear error says what to set.
    connector = SimpleNamespace(use_distributed_sampler=True)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, _accelerator_connector=connector)
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.train_dataloader()
    connector.use_distributed_sampler = False
    sampler = dm.train_dataloader().batch_sampler
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (2, 1, 2)
    # Lightning's per-epoch set_epoch reaches the shuffle through batch_sampler.sampler.
    assert hasattr(sampler.sampler, "set_epoch")
    val = dm.val_dataloader()
    assert isinstance(val.sampler, DistributedSampler) and not val.sampler.shuffle
    assert [t["image_id"] for _, targets in val for t in targets] == [2, 4, 1]  # rank 1 of 2 (padded)


def test_datamodule_shards_the_plain_loader_under_ddp():
    dm = _shapes_datamodule()
    dm.aspect_ratio_grouping = False
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0, _accelerator_connector=None)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 3
    assert [len(images) for images, _ in loader] == [4]


def test_runs_that_differ_in_their_seed_never_share_an_epochs_order():
    # torch's DistributedSampler draws epoch e of seed s from s + e: seed 1's first epoch would be seed 0's second,
    # and an ablation's seeds would train on the same orders shifted by an epoch.
    orders = {}
    for seed in range(5):
        for epoch in range(10):
            sampler = EpochSampler(range(50), seed=seed)
            sampler.set_epoch(epoch)
            orders[seed, epoch] = tuple(sampler)
    assert len(set(orders.values())) == len(orders)
    assert all(sorted(order) == list(range(50)) for order in orders.values())
    # Every rank of a run agrees on an epoch's order (drawn from the seed and epoch alone).
    again = EpochSampler(range(50), seed=4)
    again.set_epoch(9)
    assert tuple(again) == orders[4, 9]


def test_evaluation_batches_hold_images_of_one_size_and_every_process_runs_as_many():
    sizes = [(48, 64), (64, 48), (40, 40), (48, 64), (48, 64), (64, 48), (40, 40)]
    # The dataset's order within each size; the sizes in the order of their first image.
    assert list(SameSizeBatches(sizes, 2)) == [[0, 3], [4], [1, 5], [2, 6]]
    assert list(SameSizeBatches(sizes, 8)) == [[0, 3, 4], [1, 5], [2, 6]]
    assert list(SameSizeBatches(sizes, 1)) == [[0], [3], [4], [1], [5], [2], [6]]
    # Three processes: the 4 batches padded to 6 with the first ones repeated, each process 2 of them.
    shares = [list(SameSizeBatches(sizes, 2, num_replicas=3, rank=rank)) for rank in range(3)]
    assert shares == [[[0, 3], [2, 6]], [[4], [0, 3]], [[1, 5], [4]]]
    assert sorted({i for share in shares for batch in share for i in batch}) == list(range(7))
    assert all(len({sizes[i] for i in batch}) == 1 for share in shares for batch in share)
    # More processes than batches: each still gets one.
    assert [len(SameSizeBatches(sizes[:2], 4, num_replicas=3, rank=rank)) for rank in range(3)] == [1, 1, 1]
