"""LastCheckpoint: every-N saves (at N, 2N, ...; one skipped because a validation follows is made a batch later), the
save where max_steps ends a run mid-epoch, and the processes' agreement on a stop signal."""

import signal
from types import SimpleNamespace

from mrcnn.engine.callbacks import LastCheckpoint


def saved_steps(every, val_check_batch, steps=13, start=0, max_steps=-1):
    callback = LastCheckpoint("/tmp/unused", every_n_train_steps=every, stop_on_signal=False)
    saved = []
    callback._save = lambda trainer: saved.append(trainer.global_step)
    callback._agree_to_stop = lambda trainer: None
    trainer = SimpleNamespace(
        global_step=start, num_training_batches=100, val_check_batch=val_check_batch, max_steps=max_steps
    )
    callback._periodic_base = start
    for batch_idx in range(steps):
        trainer.global_step = start + batch_idx + 1  # after the optimizer step of this batch
        callback.on_train_batch_end(trainer, None, None, None, batch_idx)
    return saved


def test_every_n_steps_and_a_skipped_save_is_made_at_the_next_batch():
    assert saved_steps(every=4, val_check_batch=100) == [4, 8, 12]
    # A validation every 4 batches: the save at step 4 would come right before it, so it comes at step 5.
    assert saved_steps(every=4, val_check_batch=4) == [5, 9, 13]
    # A resumed fit counts from where it started.
    assert saved_steps(every=4, val_check_batch=100, steps=6, start=6) == [8, 12]


def test_a_run_that_max_steps_ends_mid_epoch_is_saved_at_its_last_batch():
    # Where the loader's position is the steps done; by the end of training Lightning counts the epoch complete.
    assert saved_steps(every=0, val_check_batch=100, steps=7, max_steps=7) == [7]
    assert saved_steps(every=4, val_check_batch=100, steps=6, max_steps=6) == [4, 6]


def _agree_in_process(rank: int, store: str, out: str) -> None:
    """One of two processes: rank 1 received SIGTERM; both ask the callback which signal they all stop on, first with
    the default group a CPU job has (gloo), then as in a GPU job (NCCL reported)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    # A root device no tensor can be reduced on: the flag must be a host tensor whatever the training device.
    trainer = SimpleNamespace(
        world_size=2, global_step=0, received_sigterm=False, strategy=SimpleNamespace(root_device=torch.device("meta"))
    )
    results = []
    for backend in ("gloo", "nccl"):
        dist.get_backend = lambda group=None, backend=backend: backend
        callback = LastCheckpoint(dirpath=".")
        callback.on_train_start(trainer, None)
        try:
            callback.received_signal = int(signal.SIGTERM) if rank == 1 else 0
            results.append(f"{backend} {callback._agreed_signal(trainer)} {callback._flag_group is dist.group.WORLD}")
        finally:
            callback._restore_handlers()
    with open(f"{out}.{rank}", "w") as file:
        file.write("\n".join(results))
    # Both leave together: a process whose peer already tore its gloo groups down can abort in gloo (SIGABRT) as its
    # own groups are destroyed at exit.
    dist.barrier()
    dist.destroy_process_group()


def test_processes_agree_on_the_stop_signal_over_a_host_group(tmp_path):
    # After every step the processes agree on whether any received a stop signal. In a GPU job (NCCL) the flag goes
    # through a gloo group of its own, so reading the result never waits for the GPU; CPU processes (gloo) use the
    # default group.
    import torch.multiprocessing as mp

    mp.spawn(_agree_in_process, args=(str(tmp_path / "store"), str(tmp_path / "agreed")), nprocs=2)
    sigterm = int(signal.SIGTERM)
    for rank in (0, 1):
        lines = (tmp_path / f"agreed.{rank}").read_text().splitlines()
        assert lines == [f"gloo {sigterm} True", f"nccl {sigterm} False"]


def test_with_accumulated_gradients_saves_and_stops_wait_for_the_optimizer_step():
    # Two batches a step: a checkpoint holds no gradients, so a save (or a stop) between them would lose the first.
    callback = LastCheckpoint("/tmp/unused", every_n_train_steps=2, stop_on_signal=False)
    saved, asked = [], []
    callback._save = lambda trainer: saved.append(trainer.global_step)
    callback._agree_to_stop = lambda trainer: asked.append(trainer.global_step)
    trainer = SimpleNamespace(global_step=0, num_training_batches=100, val_check_batch=100, max_steps=-1)
    for batch_idx in range(9):
        callback.on_train_batch_start(trainer, None, None, batch_idx)
        trainer.global_step += batch_idx % 2  # the second batch of each pair steps
        callback.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert saved == [2, 4] and asked == [1, 2, 3, 4]


def test_a_loss_not_read_yet_that_is_not_finite_stops_the_run_before_it_is_saved():
    # On a GPU the module reads a step's losses when the GPU has them ready, a step or more later: the save of that
    # step's weights must not come first and replace the last good last.ckpt.
    import pytest
    import torch

    from mrcnn.lit_module import LossWatch
    from tests.helpers.runs import NotReadyEvent

    watch = LossWatch()
    watch.pending.append((6, ["rpn_class_loss"], torch.tensor([float("nan")]), NotReadyEvent()))
    watch.check()
    assert watch.pending  # not read during the step
    written = []
    trainer = SimpleNamespace(
        sanity_checking=False,
        fast_dev_run=False,
        global_step=7,
        checkpoint_callbacks=[],
        lightning_module=SimpleNamespace(loss_watch=watch),
        save_checkpoint=lambda path, weights_only: written.append(path),
    )
    with pytest.raises(FloatingPointError, match="step 6"):
        LastCheckpoint("/tmp/unused")._save(trainer)
    assert written == []


def test_cuda_random_states_restore_on_the_process_device_whatever_the_devices_visible(monkeypatch, caplog):
    # A run saved on a machine with 4 visible GPUs, resumed with one visible (CUDA_VISIBLE_DEVICES, a smaller
    # allocation): restoring every saved device's state would raise inside torch.
    import logging

    import torch

    from mrcnn.engine.callbacks import random_state, set_random_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(int(s[0]) for s in states[9]))
    state = random_state()
    # This version: the process's own device.
    set_random_state({**state, "cuda_device": torch.tensor([7], dtype=torch.uint8)})
    # Older checkpoints: one state per device visible then; the process's device is taken.
    set_random_state({**state, "cuda": [torch.tensor([d], dtype=torch.uint8) for d in (10, 11, 12, 13)]})
    assert restored == [7, 10]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    with caplog.at_level(logging.WARNING, logger="mrcnn.engine.callbacks"):
        set_random_state({**state, "cuda": [torch.tensor([d], dtype=torch.uint8) for d in (10, 11)]})
    assert restored == [7, 10] and "CUDA random states of 2 devices and this process trains on device 5" in caplog.text


def test_an_epoch_ended_early_is_saved_as_mid_epoch_and_a_stop_inside_an_accumulation_window_is_said(caplog):
    import logging

    callback = LastCheckpoint("/tmp/unused", stop_on_signal=False)
    seen = []
    progress = SimpleNamespace(total=SimpleNamespace(processed=1), current=SimpleNamespace(processed=1))
    # Saved with the epoch not counted as processed yet: Lightning resumes it after the last batch taken.
    callback._save = lambda trainer: seen.append((trainer.global_step, progress.total.processed))
    callback._agree_to_stop = lambda trainer: None
    fit_loop = SimpleNamespace(
        epoch_progress=progress,
        epoch_loop=SimpleNamespace(
            batch_progress=SimpleNamespace(current=SimpleNamespace(completed=3)),
            batch_idx=2,
            _batches_that_stepped=1,
            _should_check_val_fx=lambda fetcher: False,  # no validation was due after this batch
        ),
        _data_fetcher=object(),
    )
    trainer = SimpleNamespace(
        global_step=1,
        num_training_batches=6,
        accumulate_grad_batches=2,
        fit_loop=fit_loop,
        max_steps=-1,
        should_stop=True,
    )
    callback.on_train_batch_start(trainer, None, None, 2)  # the third batch: the first of a window, no step
    with caplog.at_level(logging.WARNING, logger="mrcnn.engine.callbacks"):
        callback.on_train_epoch_end(trainer, None)
    assert seen == [(1, 0)] and progress.total.processed == progress.current.processed == 1
    assert "stopped inside a gradient-accumulation window (trainer.accumulate_grad_batches=2)" in caplog.text
    # A complete epoch is saved as Lightning counts it.
    fit_loop.epoch_loop.batch_progress.current.completed = 6
    trainer.global_step = 3
    callback.on_train_epoch_end(trainer, None)
    assert seen[-1] == (3, 1)


def test_the_signal_message_says_when_the_save_comes(capfd):
    # During a validation the stop waits for its end, which may be minutes away: "after this step" would be untrue,
    # and a user waiting for it might press Ctrl-C again, which stops without saving.
    for validating, when in (
        (False, "after this step"),
        (True, "when this validation ends (after the next step, if the epoch goes on)"),
    ):
        callback = LastCheckpoint("/tmp/unused")
        callback._signal_trainer = SimpleNamespace(validating=validating)
        callback._on_signal(signal.SIGINT, None)
        assert callback.received_signal == signal.SIGINT
        assert capfd.readouterr().err == (
            f"\nSIGINT received: saving /tmp/unused/last.ckpt {when}, then stopping (Ctrl-C again to stop at once "
            "without saving)\n"
        )
