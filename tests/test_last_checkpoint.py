"""LastCheckpoint's every-N saves: at N, 2N, ...; one skipped because a validation follows is made a batch later."""

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
