"""The same command with the same seed gives the same numbers, bit for bit: losses, AP and checkpoint.

A short run of the default recipe (augmentation, validation with its sanity check, the default callbacks, the
CSV logger), shrunk to the tiny model: 2 epochs of 2 steps, validated after each. It is repeated in this process,
with loader workers in a new ``run.py`` process, and stopped at step 1 then resumed; every repetition must
match the first exactly. Any random source on the run's path that is not drawn from the run's seed (an
unseeded generator, a time-based seed, a worker's own state) makes these runs differ.
"""

import csv
import os
from pathlib import Path

import lightning as L
import pytest
import torch

from mrcnn.engine.callbacks import TrainingInterrupted
from mrcnn.engine.train import train
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.runs import run_py

STEPS = 4  # 2 epochs of 4 images in batches of 2
STOP_AT = 1  # mid-epoch 0: the resumed run crosses an epoch end and a validation
ARGS = [
    *TINY_MODEL,
    "data.num_train_images=4",
    "data.num_val_images=2",
    "data.datamodule.batch_size=2",
    "trainer.max_epochs=2",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
]
LOSSES = (
    "train/loss",
    "train/rpn_class_loss",
    "train/rpn_bbox_loss",
    "train/fastrcnn_class_loss",
    "train/fastrcnn_bbox_loss",
    "train/maskrcnn_mask_loss",
)


def run_in_process(run_dir: Path, *overrides: str) -> dict:
    """Trains with ``ARGS + overrides`` in this process; what the run logged and saved (:func:`read_run`)."""
    train(compose_config([*ARGS, *overrides], run_dir=str(run_dir)))
    return read_run(run_dir)


def read_run(run_dir: Path, final: bool = True) -> dict:
    """``losses`` (step -> the logged training losses, as logged), ``metrics`` (the final COCO metrics; with
    ``final``) and the last checkpoint's ``weights``, ``optimizer`` and ``step``."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {
        "losses": {int(row["step"]): tuple(row[key] for key in LOSSES) for row in rows},
        "metrics": (run_dir / "metrics.json").read_text() if final else None,
        "weights": checkpoint["state_dict"],
        "optimizer": checkpoint["optimizer_states"][0]["state"],
        "step": checkpoint["global_step"],
    }


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_run(run: dict, reference: dict) -> None:
    """Bit-identical logged losses at every step, final metrics and last checkpoint (weights and momentum)."""
    assert run["losses"] == reference["losses"]
    assert run["metrics"] == reference["metrics"]
    assert run["step"] == reference["step"] == STEPS
    assert_same_tensors(run["weights"], reference["weights"])
    assert_same_tensors(
        {(p, k): v for p, s in run["optimizer"].items() for k, v in s.items()},
        {(p, k): v for p, s in reference["optimizer"].items() for k, v in s.items()},
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run, without loader workers, in this process."""
    run = run_in_process(tmp_path_factory.mktemp("reference"))
    assert sorted(run["losses"]) == list(range(STEPS))
    return run


def test_the_same_run_twice_in_one_process_is_bit_identical(tmp_path, reference):
    assert_same_run(run_in_process(tmp_path), reference)


def test_a_run_with_two_loader_workers_in_a_new_process_is_bit_identical(tmp_path, reference):
    # A new process (its own hash seed, library state and start time) with 2 workers and this process's thread
    # count. The batches do not depend on the workers: each item's augmentation follows from (seed, epoch, index).
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run_py([*ARGS, "data.datamodule.num_workers=2", f"hydra.run.dir={tmp_path}"], env=env)
    assert_same_run(read_run(tmp_path), reference)


def test_how_often_a_run_validates_leaves_its_training_alone(tmp_path, reference):
    # Validation computes its losses with the model's samplers, which draw from training's generators: without the
    # sanity check and the validation after epoch 0, the training draws, losses and weights must not change. (Keys
    # like these may change when a run is resumed.)
    run = run_in_process(tmp_path, "+trainer.num_sanity_val_steps=0", "trainer.check_val_every_n_epoch=2")
    assert run["losses"] == reference["losses"]
    assert_same_tensors(run["weights"], reference["weights"])


def test_a_run_stopped_at_step_k_and_resumed_equals_the_uninterrupted_run(tmp_path, reference):
    # Stopped by Ctrl-C at step 1 (last.ckpt saved there), with loader workers; resumed without them.
    with pytest.raises(TrainingInterrupted):
        run_in_process(
            tmp_path,
            "data.datamodule.num_workers=2",
            "+callbacks.interrupt._target_=tests.helpers.runs.InterruptAt",
            f"+callbacks.interrupt.step={STOP_AT}",
        )
    stopped = read_run(tmp_path, final=False)
    assert stopped["step"] == STOP_AT
    assert stopped["losses"] == {step: reference["losses"][step] for step in range(STOP_AT)}
    resumed = run_in_process(tmp_path, f"resume={tmp_path}")
    # The CSV history of the resumed run continues the stopped one's: every step, each as the uninterrupted run.
    assert_same_run(resumed, reference)


def test_a_run_stopped_during_its_last_step_is_complete_and_writes_its_results(tmp_path, reference):
    # Ctrl-C during the last step: the step ends, Lightning validates the final weights, and the stop takes effect.
    # The run is complete: its results are those of the uninterrupted run, and it still exits as stopped (130).
    with pytest.raises(TrainingInterrupted) as stop:
        run_in_process(
            tmp_path,
            "+callbacks.interrupt._target_=tests.helpers.runs.InterruptAt",
            f"+callbacks.interrupt.step={STEPS}",
        )
    assert stop.value.finished and stop.value.code == 130
    assert_same_run(read_run(tmp_path), reference)


def test_a_run_stopped_by_max_steps_mid_epoch_and_extended_equals_the_uninterrupted_run(tmp_path, reference):
    # trainer.max_steps ends the first run mid-epoch; the extended run goes on with that epoch's next batch.
    train(compose_config([*ARGS, f"trainer.max_steps={STOP_AT}", "final_eval=false"], run_dir=str(tmp_path)))
    assert read_run(tmp_path, final=False)["step"] == STOP_AT
    resumed = run_in_process(tmp_path, f"resume={tmp_path}")
    assert_same_run(resumed, reference)


@pytest.mark.parametrize(
    "schedule",
    [
        # last.ckpt: a link to the best checkpoint, saved at the validation after the epoch; LastCheckpoint's own save.
        ["trainer.check_val_every_n_epoch=1"],
        ["trainer.check_val_every_n_epoch=2"],
        # As setting=paper: max_steps alone. Lightning trained on, but with epoch 1 in another epoch's order.
        ["trainer.max_epochs=-1"],
    ],
    ids=["saved-at-its-validation", "saved-at-its-end", "no-max-epochs"],
)
def test_a_run_that_max_steps_ends_at_an_epochs_end_extended_equals_the_uninterrupted_run(tmp_path, schedule):
    # trainer.max_steps ends the first run with epoch 0, and the run is extended with trainer.max_steps set again
    # (trainer.max_epochs: ARGS'): Lightning resumed epoch 1 as if its batches were taken, and trained no step.
    # Milestones at a fixed step: the learning rate does not depend on the planned length, which the extension changes.
    setting = ["scheduler=warmup_step_at", "scheduler.milestone_steps=[3]", *schedule]
    reference = run_in_process(tmp_path / "reference", *setting, f"trainer.max_steps={STEPS}")
    train(compose_config([*ARGS, *setting, "trainer.max_steps=2", "final_eval=false"], run_dir=str(tmp_path / "run")))
    assert read_run(tmp_path / "run", final=False)["step"] == 2
    resumed = run_in_process(tmp_path / "run", *setting, f"resume={tmp_path / 'run'}", f"trainer.max_steps={STEPS}")
    # Bit for bit, and logged at the same steps.
    assert_same_run(resumed, reference)


def test_a_run_stopped_mid_epoch_by_should_stop_and_resumed_equals_the_uninterrupted_run(tmp_path, reference):
    # A callback sets trainer.should_stop mid-epoch, as trainer.max_time's timer and early stopping do. Lightning
    # validates at such a stop, then ends the epoch there: the resumed run must go on with the epoch's next batch
    # (not start the next epoch), with the random states from before that extra validation.
    stop = ["+callbacks.stop._target_=tests.helpers.runs.ShouldStopAt", f"+callbacks.stop.step={STOP_AT}"]
    train(compose_config([*ARGS, *stop, "final_eval=false"], run_dir=str(tmp_path)))
    assert read_run(tmp_path, final=False)["step"] == STOP_AT
    resumed = run_in_process(tmp_path, f"resume={tmp_path}")
    assert_same_run(resumed, reference)


def test_a_run_that_max_steps_ends_just_before_a_validation_resumes_with_the_epochs_next_batch(tmp_path):
    # Validated after every batch: max_steps ends the run at a batch a validation follows, where last.ckpt cannot be
    # saved (Lightning would take it for one saved after the validation); it is saved when the epoch ends early.
    every_batch = ["trainer.val_check_interval=1"]
    reference = run_in_process(tmp_path / "reference", *every_batch)
    train(
        compose_config(
            [*ARGS, *every_batch, f"trainer.max_steps={STOP_AT}", "final_eval=false"], run_dir=str(tmp_path / "run")
        )
    )
    assert read_run(tmp_path / "run", final=False)["step"] == STOP_AT
    resumed = run_in_process(tmp_path / "run", *every_batch, f"resume={tmp_path / 'run'}")
    # Bit for bit, and logged at the same steps (Lightning's restart counts that batch's step again for the loggers).
    assert_same_run(resumed, reference)


def test_a_stop_where_the_step_count_but_not_the_batch_index_is_a_validation_interval_resumes_bit_exact(tmp_path):
    # 3 batches an epoch, validated every 2 batches of an epoch (and at its end). Step 4 is epoch 1's first batch:
    # a multiple of 2 as a step count, yet Lightning does not validate there, so the validation at the stop is one
    # the uninterrupted run does not have, and the random states come from before it.
    setting = ["data.num_train_images=6", "trainer.val_check_interval=2"]
    reference = run_in_process(tmp_path / "reference", *setting)
    stop = ["+callbacks.stop._target_=tests.helpers.runs.ShouldStopAt", "+callbacks.stop.step=4"]
    train(compose_config([*ARGS, *setting, *stop, "final_eval=false"], run_dir=str(tmp_path / "run")))
    assert read_run(tmp_path / "run", final=False)["step"] == 4
    resumed = run_in_process(tmp_path / "run", *setting, f"resume={tmp_path / 'run'}")
    assert resumed["step"] == reference["step"] == 6 and resumed["losses"] == reference["losses"]
    assert_same_tensors(resumed["weights"], reference["weights"])


def validation_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    """``(step, epoch, val/segm_AP)`` of every validation row of a run's ``csv/metrics.csv``, in file order."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return [(r["step"], r["epoch"], r["val/segm_AP"]) for r in csv.DictReader(file) if r.get("val/segm_AP")]


@pytest.mark.parametrize(
    "global_step, counted, started, completed, logged",
    [
        (12, 12, 1, 1, (11, 0)),  # the fit trained its last step, step 12, which ended epoch 0
        (12, 11, 1, 0, (11, 0)),  # resumed from a save during step 12 (before Lightning counted it), nothing to train
        (25, 25, 3, 3, (24, 2)),  # max_steps ended the fit in epoch 2, which Lightning then counts as completed
        (25, 24, 3, 2, (24, 2)),  # resumed from that fit's last save (mid-epoch 2), nothing left to train
        (0, 0, 0, 0, (0, 0)),  # nothing trained: nothing moved
    ],
)
def test_the_final_validation_is_logged_at_the_row_of_the_last_step(global_step, counted, started, completed, logged):
    # A stop during the last step saves there; its resume trains nothing and validates: it was logged at step 10.
    from types import SimpleNamespace

    from mrcnn.engine.train import logged_as_after_the_last_step

    progress = SimpleNamespace(current=SimpleNamespace(completed=completed, started=started))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=counted), epoch_progress=progress)
    trainer = SimpleNamespace(global_step=global_step, fit_loop=loop)
    with logged_as_after_the_last_step(trainer):
        assert (loop.epoch_loop._batches_that_stepped, progress.current.completed) == logged
    assert (loop.epoch_loop._batches_that_stepped, progress.current.completed) == (counted, completed)


class InterruptFinalValidation(L.Callback):
    """Test-only: Ctrl-C (a KeyboardInterrupt) at the first batch of a ``trainer.validate`` after the fit."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "validate":
            raise KeyboardInterrupt


def test_a_run_stopped_in_its_final_validation_and_resumed_logs_what_the_uninterrupted_run_logged(tmp_path):
    # max_steps ends the fit mid-epoch, so the run validates after it, apart; a Ctrl-C there saves nothing new, and
    # the resumed run, which has nothing left to train, validates the same weights from the same random states, in
    # the same CSV row (same step and epoch).
    setting = ["trainer.max_steps=3"]
    run_in_process(tmp_path / "reference", *setting)
    stop = ["+callbacks.stop._target_=tests.e2e.test_reproducibility.InterruptFinalValidation"]
    with pytest.raises(SystemExit) as stopped:
        run_in_process(tmp_path / "run", *setting, *stop)
    assert stopped.value.code == 130
    run_in_process(tmp_path / "run", *setting, f"resume={tmp_path / 'run'}")
    assert metric_rows(tmp_path / "run") == metric_rows(tmp_path / "reference")


def metric_rows(run_dir: Path) -> list[dict]:
    """Every row of a run's ``csv/metrics.csv`` but its timing column."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows and all(row.pop("train/images_per_sec", None) is not None for row in rows)
    return rows


def test_the_final_validation_is_logged_where_the_fits_own_would_be_and_a_resume_keeps_it(tmp_path):
    # One epoch of 2 steps. Validated in the fit after its last step: logged at step 1, in epoch 0.
    # Milestones at a fixed step: the learning rate does not depend on the planned length, which the extension changes.
    schedule = ["scheduler=warmup_step_at", "scheduler.milestone_steps=[3]"]
    run_in_process(tmp_path / "in_fit", *schedule, "trainer.max_epochs=1")
    [in_fit] = validation_rows(tmp_path / "in_fit")
    assert in_fit[:2] == ("1", "0")
    # Not validated in the fit (every second epoch): the final validation of the same weights, in the same row.
    every_second = [*schedule, "trainer.check_val_every_n_epoch=2"]
    run_in_process(tmp_path / "run", *every_second, "trainer.max_epochs=1")
    assert validation_rows(tmp_path / "run") == [in_fit]
    # Extended to two epochs from its last.ckpt (step 2): the history keeps that validation, then the new one.
    run_in_process(tmp_path / "run", *every_second, "trainer.max_epochs=2", f"resume={tmp_path / 'run'}")
    assert [row[:2] for row in validation_rows(tmp_path / "run")] == [("1", "0"), ("3", "1")]
