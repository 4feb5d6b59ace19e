"""The CSV log a resumed run continues: the rows before its checkpoint, then its own (e2e: tests/e2e/test_resume.py)."""

import csv

from mrcnn.engine.checkpoints import ResumedRun
from mrcnn.engine.loggers import ContinuedCSVLogger, instantiate_logger
from tests.helpers.config import compose_config


def write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = sorted({key for row in rows for key in row})
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_metrics(path):
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


# What an interrupted run wrote: train rows of steps 0..5, a validation at step 3; its checkpoint is at step 4.
INTERRUPTED = [
    *({"step": s, "train/loss": 1.0 - s / 10} for s in range(4)),
    {"step": 3, "val/segm_AP": 0.1},
    *({"step": s, "train/loss": 0.5} for s in (4, 5)),
]


def test_a_resumed_log_keeps_the_rows_before_the_checkpoint_and_appends(tmp_path):
    metrics = tmp_path / "csv" / "metrics.csv"
    write_metrics(metrics, INTERRUPTED)
    logger = ContinuedCSVLogger(tmp_path, name="csv", version="")
    logger.continue_history(metrics, before_step=4)
    logger.log_hyperparams({"a": 1})
    logger.log_metrics({"train/loss": 0.25}, step=4)
    logger.log_metrics({"train/loss": 0.2, "lr": 0.01}, step=5)  # a new column
    logger.save()

    columns, rows = read_metrics(metrics)
    assert columns == ["lr", "step", "train/loss", "val/segm_AP"]
    assert [(r["step"], r["train/loss"], r["val/segm_AP"], r["lr"]) for r in rows] == [
        ("0", "1.0", "", ""),
        ("1", "0.9", "", ""),
        ("2", "0.8", "", ""),
        ("3", "0.7", "", ""),
        ("3", "", "0.1", ""),
        ("4", "0.25", "", ""),
        ("5", "0.2", "", "0.01"),
    ]


def test_a_run_resumed_into_a_new_folder_starts_with_the_resumed_runs_rows(tmp_path):
    write_metrics(tmp_path / "first" / "csv" / "metrics.csv", INTERRUPTED)
    cfg = compose_config([], run_dir=str(tmp_path / "second"))
    resumed = ResumedRun(
        checkpoint=tmp_path / "first" / "checkpoints" / "last.ckpt", global_step=4, run_dir=tmp_path / "first"
    )
    logger = instantiate_logger(cfg.logger.csv, cfg, resumed)
    logger.log_metrics({"train/loss": 0.25}, step=4)
    logger.save()

    _, rows = read_metrics(tmp_path / "second" / "csv" / "metrics.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "3", "4"]
    assert len(read_metrics(tmp_path / "first" / "csv" / "metrics.csv")[1]) == len(INTERRUPTED)  # left as it was


def test_a_run_resumed_in_its_folder_moved_since_keeps_its_history(tmp_path):
    # Trained at /cluster/outputs/run (its recorded run_dir), copied to here, resumed here: the history is here.
    import torch

    from mrcnn.engine.checkpoints import RUN_RECORD_KEY, read_resumed_run

    here = tmp_path / "laptop" / "run"
    write_metrics(here / "csv" / "metrics.csv", INTERRUPTED)
    checkpoint = here / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    record = {"config": {"run_dir": str(tmp_path / "cluster" / "run")}, "overrides": []}
    torch.save(
        {"global_step": 4, "state_dict": {}, "pytorch-lightning_version": "2.6.6", RUN_RECORD_KEY: record}, checkpoint
    )
    resumed = read_resumed_run(checkpoint)
    assert resumed.run_dir == tmp_path / "cluster" / "run" and resumed.folder == here
    cfg = compose_config([], run_dir=str(here))
    for found in (resumed, ResumedRun(checkpoint=checkpoint, global_step=4, run_dir=tmp_path / "gone")):
        write_metrics(here / "csv" / "metrics.csv", INTERRUPTED)
        logger = instantiate_logger(cfg.logger.csv, cfg, found)
        logger.log_metrics({"train/loss": 0.25}, step=4)
        logger.save()
        # (ResumedRun without a folder: this folder's own log, not an empty history over it.)
        assert [r["step"] for r in read_metrics(here / "csv" / "metrics.csv")[1]] == ["0", "1", "2", "3", "3", "4"]


def test_without_a_resume_it_starts_over_as_lightning_does(tmp_path):
    metrics = tmp_path / "csv" / "metrics.csv"
    write_metrics(metrics, INTERRUPTED)
    logger = ContinuedCSVLogger(tmp_path, name="csv", version="")
    logger.log_metrics({"train/loss": 0.25}, step=0)
    logger.save()
    assert [r["step"] for r in read_metrics(metrics)[1]] == ["0"]
