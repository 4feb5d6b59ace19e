"""Behaviour of the detection collate function and the LightningDataModule."""

import logging
import os
import signal
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from mrcnn.data.datamodule import InstanceDataModule, ResumableDataLoader, collate_detection
from mrcnn.data.samplers import EPOCH_ORDER, EpochSampler
from mrcnn.data.shapes import ShapesDataset
from mrcnn.data.transforms import photometric_transforms, train_transforms
from tests.helpers.data import IdsDataset, ParentIdsDataset
from tests.helpers.runs import alive


def _datamodule(num_workers=0, **kwargs):
    return InstanceDataModule(
        train_dataset=ShapesDataset(num_images=10, image_size=64, seed=0, split="train"),
        val_dataset=ShapesDataset(num_images=7, image_size=64, seed=0, split="val"),
        test_dataset=ShapesDataset(num_images=5, image_size=64, seed=0, split="test"),
        batch_size=4,
        num_workers=num_workers,
        **kwargs,
    )


def test_collate_keeps_samples_unstacked():
    dataset = ShapesDataset(num_images=3, image_size=32)
    images, targets = collate_detection([dataset[i] for i in range(3)])
    assert isinstance(images, tuple) and isinstance(targets, tuple)
    assert len(images) == len(targets) == 3
    assert all(image.shape == (3, 32, 32) for image in images)
    assert [t["image_id"] for t in targets] == [1, 2, 3]


def test_class_names_and_num_classes():
    dm = _datamodule()
    assert dm.class_names == ["circle", "triangle", "square", "ring", "crescent", "star"]
    assert dm.num_classes == 6


def test_batch_sizes():
    dm = _datamodule(val_batch_size=3)
    train = list(dm.train_dataloader())
    # 10 images at batch 4: the incomplete last batch is dropped in training.
    assert [len(images) for images, _ in train] == [4, 4]
    assert all(len(images) == len(targets) for images, targets in train)
    val = list(dm.val_dataloader())
    assert [len(images) for images, _ in val] == [3, 3, 1]
    assert [len(images) for images, _ in dm.test_dataloader()] == [3, 2]
    # Training shuffles, evaluation keeps the dataset order.
    val_ids = [t["image_id"] for _, targets in val for t in targets]
    assert val_ids == list(range(1, 8))


def test_the_images_full_batches_leave_out_of_each_epoch_are_said_once(caplog):
    def datamodule(images, batch_size, world=None):
        module = InstanceDataModule(IdsDataset(images), IdsDataset(2), batch_size=batch_size)
        if world:
            module.trainer = SimpleNamespace(world_size=world, global_rank=0, _accelerator_connector=None)
        return module

    with caplog.at_level(logging.INFO, logger="mrcnn.data.datamodule"):
        seven = datamodule(7, 3)
        seven.train_dataloader(), seven.train_dataloader()
    assert (
        caplog.text.count("each epoch trains on 6 of the training set's 7 images (full batches of 3); the other 1") == 1
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mrcnn.data.datamodule"):
        datamodule(7, 3, world=2).train_dataloader()  # 4 a process (padded to 8): one batch of 3 each
        datamodule(12, 3, world=2).train_dataloader()  # nothing left out: nothing said
    assert caplog.messages == [
        "each epoch trains on 6 of the training set's 7 images (full batches of 3 on each of 2 processes); the other "
        "1 are left out of that epoch's shuffled order"
    ]


def test_a_training_set_smaller_than_one_batch_is_an_error_not_a_run_of_no_steps():
    # Lightning would warn, skip training and report the untrained model's AP as the run's.
    small = InstanceDataModule(
        ShapesDataset(num_images=3, image_size=32), ShapesDataset(num_images=2, split="val"), batch_size=4
    )
    with pytest.raises(ValueError, match=r"the training set has 3 image\(s\), fewer than one batch .*batch_size=4\)"):
        small.train_dataloader()
    # Per process under DDP: 6 images over 2 processes are 3 each.
    ddp = InstanceDataModule(
        ShapesDataset(num_images=6, image_size=32), ShapesDataset(num_images=2, split="val"), batch_size=4
    )
    ddp.trainer = SimpleNamespace(world_size=2, global_rank=1, _accelerator_connector=None)
    with pytest.raises(ValueError, match=r"has 6 image\(s\) \(3 a process over 2\), fewer than one batch"):
        ddp.train_dataloader()
    # One full batch is enough; the grouped sampler fills its last batch with repeated images.
    assert (
        len(
            InstanceDataModule(
                ShapesDataset(num_images=4), ShapesDataset(num_images=2), batch_size=4
            ).train_dataloader()
        )
        == 1
    )
    grouped = InstanceDataModule(
        ShapesDataset(num_images=3), ShapesDataset(num_images=2), batch_size=4, aspect_ratio_grouping=True
    )
    assert len(grouped.train_dataloader()) == 1


def test_missing_test_dataset_raises():
    dm = InstanceDataModule(ShapesDataset(num_images=2), ShapesDataset(num_images=2, split="val"))
    assert dm.val_batch_size == dm.batch_size
    with pytest.raises(ValueError, match="test_dataset"):
        dm.test_dataloader()


def test_workers_give_the_same_content():
    in_process = list(_datamodule(num_workers=0).val_dataloader())
    dm = _datamodule(num_workers=2, persistent_workers=True)
    with_workers = list(dm.val_dataloader())
    assert len(in_process) == len(with_workers)
    for (images_a, targets_a), (images_b, targets_b) in zip(in_process, with_workers):
        assert all(torch.equal(a, b) for a, b in zip(images_a, images_b))
        for a, b in zip(targets_a, targets_b):
            assert a["image_id"] == b["image_id"]
            assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["boxes"], b["boxes"])
            assert torch.equal(a["labels"], b["labels"])
    # Workers also serve training batches of the right size.
    train = list(dm.train_dataloader())
    assert [len(images) for images, _ in train] == [4, 4]


def test_persistent_workers_only_with_workers():
    assert _datamodule(num_workers=0, persistent_workers=True).train_dataloader().persistent_workers is False


def test_workers_draw_different_augmentations():
    # Forked workers start from copies of one albumentations random state; each
    # must re-seed, or worker 0 and worker 1 would flip exactly the same positions.
    plain = ShapesDataset(num_images=40, image_size=32)
    augmented = ShapesDataset(num_images=40, image_size=32, transforms=train_transforms(hflip_prob=0.5))
    loader = torch.utils.data.DataLoader(augmented, batch_size=1, num_workers=2, collate_fn=collate_detection)
    flipped = [not torch.equal(images[0], plain[i][0]) for i, (images, _) in enumerate(loader)]
    # Batches alternate between the two workers.
    assert flipped[0::2] != flipped[1::2]
    assert 0 < sum(flipped) < len(flipped)


@pytest.mark.parametrize("grouping", [False, True], ids=["plain", "grouped"])
def test_training_batches_do_not_depend_on_loader_workers_and_change_with_the_epoch(grouping):
    # Each item's augmentation is drawn from (seed, epoch, index), whichever process loads it: the batches with
    # 2 workers are those without; a new epoch draws anew.
    def epochs(num_workers):
        dm = InstanceDataModule(
            ShapesDataset(num_images=8, image_size=32, transforms=photometric_transforms()),
            ShapesDataset(num_images=2, image_size=32, split="val"),
            batch_size=2,
            num_workers=num_workers,
            aspect_ratio_grouping=grouping,
            seed=5,
        )
        loader = dm.train_dataloader()
        passes = []
        for epoch in (0, 1):
            _set_sampler_epoch(loader, epoch)
            passes.append(
                {int(t["image_id"]): image for images, targets in loader for image, t in zip(images, targets)}
            )
        return passes

    without, with_workers = epochs(0), epochs(2)
    for a, b in zip(without, with_workers):
        assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)
    # The same image, augmented in epoch 0 and in epoch 1: not all alike (flip, jitter).
    assert any(not torch.equal(without[0][i], without[1][i]) for i in without[0])


def test_loaders_leave_the_global_torch_generator_alone():
    # Iterating a loader (training or validation, with workers or not) draws its workers' seeds from its own
    # generator: the model's random draws (RPN and RoI sampling) are the same with or without a validation pass.
    dm = _datamodule(num_workers=0)
    torch.manual_seed(0)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())


@pytest.mark.parametrize("world", [1, 2], ids=["one-process", "ddp"])
def test_the_workers_of_a_ddp_process_are_not_forked_from_it(world):
    # A DDP process's collective threads can hold the interpreter's runtime lock at a fork, and a worker forked then
    # hangs (mrcnn.data.datamodule.worker_context): there its workers come from a fork server. Alone, a process forks
    # them (the fastest start).
    dm = InstanceDataModule(ParentIdsDataset(4), ParentIdsDataset(2), batch_size=2, num_workers=1, seed=0)
    if world > 1:
        dm.trainer = SimpleNamespace(world_size=world, global_rank=1, _accelerator_connector=None)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        parents = {t["parent"] for _, targets in loader for t in targets}
        assert len(parents) == 1
        assert (parents.pop() == os.getpid()) == (world == 1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_the_fork_server_of_a_ddp_process_outlives_the_stop_signals_of_its_job(signum):
    # SLURM signals every process of a job, the fork server too: a server ended by it would end its workers, and the
    # pass the DDP process finishes before it stops would fail ("DataLoader worker ... exited unexpectedly").
    dm = InstanceDataModule(ParentIdsDataset(16), ParentIdsDataset(2), batch_size=2, num_workers=1, seed=0)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, _accelerator_connector=None)
    loader = dm.train_dataloader()
    batches = iter(loader)
    _, targets = next(batches)
    server = targets[0]["parent"]
    os.kill(server, signum)
    time.sleep(1.0)  # a server that took the signal's default action is gone by then
    assert alive(server)
    assert len([targets for _, targets in batches]) == len(loader) - 1 == 3  # the rest of the pass


# ---- resuming the training loader mid-epoch ------------------------------------------------


def _train_loader(grouping, num_workers=0, rank=0, world=1):
    dm = InstanceDataModule(
        IdsDataset(26), IdsDataset(2), batch_size=2, num_workers=num_workers, aspect_ratio_grouping=grouping, seed=5
    )
    if world > 1:
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, _accelerator_connector=None)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    return loader


def _ids(batches):
    return [[t["image_id"] for t in targets] for _, targets in batches]


@pytest.mark.parametrize("grouping", [False, True], ids=["plain", "grouped"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_resumes_mid_epoch_on_every_rank(grouping, num_workers):
    world = 2
    for rank in range(world):
        # Uninterrupted, as Lightning drives it: set_epoch (on the sampler it finds), then the epoch's batches.
        loader = _train_loader(grouping, rank=rank, world=world)
        epochs = []
        for epoch in range(2):
            _set_sampler_epoch(loader, epoch)
            epochs.append(_ids(loader))
        assert epochs[0] != epochs[1] and len(epochs[1]) == len(loader) >= 4

        # Interrupted after 3 batches of epoch 1; workers fetch ahead, the state counts what was taken.
        loader = _train_loader(grouping, num_workers, rank=rank, world=world)
        _set_sampler_epoch(loader, 1)
        iterator = iter(loader)
        taken = _ids(next(iterator) for _ in range(3))
        assert taken == epochs[1][:3]
        state = loader.state_dict()
        assert state == {"epoch": 1, "batches": 3, "seed": 5, "order": EPOCH_ORDER}
        del iterator

        # Lightning saves rank zero's state; every rank loads it into a fresh loader, creates its
        # iterator and only then sets the epoch (the resumed epoch's iterator is made before set_epoch).
        if rank == 0:
            rank0_state = state
        resumed = _train_loader(grouping, num_workers, rank=rank, world=world)
        resumed.load_state_dict(rank0_state)
        assert resumed.state_dict() == rank0_state  # a checkpoint before the first resumed batch keeps it
        iterator = iter(resumed)
        _set_sampler_epoch(resumed, 1)
        assert _ids(iterator) == epochs[1][3:]
        assert resumed.state_dict() == {"epoch": 1, "batches": len(resumed), "seed": 5, "order": EPOCH_ORDER}
        # The next epoch is whole again.
        _set_sampler_epoch(resumed, 2)
        assert len(_ids(resumed)) == len(resumed)


def test_datamodule_state_reaches_the_next_train_loader():
    # Lightning restores the datamodule before the training loader exists (the fit loop's own copy of
    # the position is lost when configure_optimizers reads trainer.estimated_stepping_batches).
    def datamodule():
        return InstanceDataModule(IdsDataset(26), IdsDataset(2), batch_size=2, aspect_ratio_grouping=True, seed=5)

    def epoch1(loader):
        _set_sampler_epoch(loader, 1)
        return _ids(loader)

    full = epoch1(datamodule().train_dataloader())
    dm = datamodule()
    assert dm.state_dict() == {}
    loader = dm.train_dataloader()
    _set_sampler_epoch(loader, 1)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = dm.state_dict()
    assert state == {"train_loader": {"epoch": 1, "batches": 2, "seed": 5, "order": EPOCH_ORDER}}

    resumed = datamodule()
    resumed.load_state_dict(state)
    assert epoch1(resumed.train_dataloader()) == full[2:]
    # Only the next loader resumes, and a run's teardown drops a position no loader used.
    assert epoch1(resumed.train_dataloader()) == full
    resumed.load_state_dict(state)
    resumed.teardown("validate")
    assert epoch1(resumed.train_dataloader()) == full
    # Restored while its loader exists (strategies that restore after setup): that loader resumes.
    resumed.load_state_dict(state)
    assert epoch1(resumed._train_loader) == full[2:]


def test_train_loader_state_at_an_epoch_end_resumes_with_the_next_epoch():
    loader = _train_loader(grouping=False)
    _set_sampler_epoch(loader, 1)
    epoch1 = _ids(loader)
    finished = _train_loader(grouping=False)
    finished.load_state_dict({"epoch": 0, "batches": len(finished), "seed": 5, "order": EPOCH_ORDER})
    assert finished.state_dict() == {"epoch": 1, "batches": 0, "seed": 5, "order": EPOCH_ORDER}
    assert _ids(finished) == epoch1


@pytest.mark.parametrize("grouping", [False, True], ids=["plain", "grouped"])
def test_a_mid_epoch_position_saved_by_a_version_that_drew_orders_otherwise_is_warned_about(grouping):
    old = {"epoch": 1, "batches": 2, "seed": 5}  # saved before the order was recorded: drawn from seed + epoch
    with pytest.warns(
        UserWarning, match=r"resumes epoch 1 after 2 batches, but .* drew that epoch's order as seed \+ epoch"
    ):
        _train_loader(grouping).load_state_dict(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_loader(grouping).load_state_dict({**old, "order": EPOCH_ORDER})  # this version's: nothing to say
        _train_loader(grouping).load_state_dict({**old, "batches": 0})  # an epoch's start: its order is whole


def test_set_epoch_between_iter_and_the_first_batch_counts_with_workers():
    # Lightning creates the first epoch's iterator of a fit before it sets that epoch.
    loader = _train_loader(grouping=False)
    _set_sampler_epoch(loader, 3)
    epoch3 = _ids(loader)
    loader = _train_loader(grouping=False, num_workers=2)
    iterator = iter(loader)
    _set_sampler_epoch(loader, 3)
    assert _ids(iterator) == epoch3


def test_resuming_with_another_seed_warns():
    loader = _train_loader(grouping=False)
    with pytest.warns(UserWarning, match="seed 5"):
        loader.load_state_dict({"epoch": 0, "batches": 1, "seed": 6, "order": EPOCH_ORDER})


def test_resumable_loader_with_an_order_that_cannot_skip_is_a_plain_loader():
    # E.g. after Lightning swapped in a SequentialSampler for overfit_batches.
    loader = ResumableDataLoader(IdsDataset(4), batch_size=2, collate_fn=collate_detection)
    assert _ids(loader) == [[1, 2], [3, 4]] and loader.state_dict() == {}
    loader.load_state_dict({})
    with pytest.warns(UserWarning, match="SequentialSampler cannot resume"):
        loader.load_state_dict({"epoch": 0, "batches": 1, "seed": 0})
    assert _ids(loader) == [[1, 2], [3, 4]]
    # A torch BatchSampler over an EpochSampler skips whole batches of indices.
    loader = ResumableDataLoader(
        IdsDataset(8), batch_size=2, sampler=EpochSampler(range(8), seed=1), collate_fn=collate_detection
    )
    full = _ids(loader)
    loader.load_state_dict({"epoch": 0, "batches": 1, "seed": 1, "order": EPOCH_ORDER})
    assert _ids(loader) == full[1:]
    assert isinstance(loader, DataLoader)
