"""A job never writes into a folder that holds another run's output: only that run's resume may go on there."""

import os

import pytest
import torch

from mrcnn.engine.config_checks import newest_checkpoint
from mrcnn.engine.launch import (
    DDP_JOB_DIR_ENV,
    RUN_OUTPUTS,
    RunDirIsFree,
    check_run_dir_is_free,
    keep_run_record,
    restore_run_record,
)
from tests.helpers.config import TINY_MODEL, compose_config

# One file of each kind RUN_OUTPUTS names.
OUTPUTS = ("checkpoints/last.ckpt", "csv/metrics.csv", "metrics.json")


def run_folder(path, outputs=OUTPUTS):
    """A run's folder: Hydra's record and log, and ``outputs``."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (path / "run.log").write_text("")
    for name in outputs:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("x")
    return path


def test_each_kind_of_output_stops_every_mode_but_the_runs_own_resume(tmp_path, monkeypatch):
    assert len(OUTPUTS) == len(RUN_OUTPUTS)
    for name in OUTPUTS:
        run = run_folder(tmp_path / name.replace("/", "_"), [name])
        for mode in ("train", "evaluate", "predict"):
            with pytest.raises(FileExistsError, match=rf"the job's folder {run} holds another run's output \({name}\)"):
                check_run_dir_is_free(run, mode)
    run = run_folder(tmp_path / "run")
    # The run's own resume goes on, from last.ckpt or another of its checkpoints, written any way.
    (run / "checkpoints" / "epoch0-step4.ckpt").write_text("x")
    for ckpt in ("checkpoints/last.ckpt", "checkpoints/epoch0-step4.ckpt", "checkpoints/../checkpoints/last.ckpt"):
        check_run_dir_is_free(run, "train", str(run / ckpt))
    # A checkpoint of another folder, or evaluating / predicting the run's own, would write over its record.
    other = run_folder(tmp_path / "other")
    with pytest.raises(FileExistsError, match=rf"Continue that run with resume={run} hydra\.run\.dir={run}"):
        check_run_dir_is_free(run, "train", str(other / "checkpoints" / "last.ckpt"))
    # A run that saved no last.ckpt (stopped by a second Ctrl-C before its first save) has nothing to resume.
    unsaved = run_folder(tmp_path / "unsaved", ["csv/metrics.csv"])
    with pytest.raises(
        FileExistsError, match=r"holds another run's output \(csv/metrics.csv\).*saved no checkpoint to continue"
    ) as refused:
        check_run_dir_is_free(unsaved, "train")
    assert "resume=" not in str(refused.value)
    # One without last.ckpt but with other checkpoints is continued from its newest; a finished one is not deleted.
    (unsaved / "checkpoints").mkdir()
    # Newest by the step in the name (epoch10 sorts before epoch9 as text), written in any order.
    for name in ("epoch10-step100.ckpt", "epoch9-step90.ckpt", "epoch1-step8.ckpt"):
        (unsaved / "checkpoints" / name).write_text("x")
    with pytest.raises(
        FileExistsError, match=rf"newest checkpoint with ckpt_path={unsaved}/checkpoints/epoch10-step100"
    ):
        check_run_dir_is_free(unsaved, "train")
    finished = run_folder(tmp_path / "finished", ["csv/metrics.csv", "metrics.json"])
    with pytest.raises(FileExistsError, match=r"\. Write to a new folder") as refused:
        check_run_dir_is_free(finished, "train")
    assert "delete the folder" not in str(refused.value)
    for mode in ("evaluate", "predict"):
        with pytest.raises(FileExistsError, match=rf"mode={mode} would write its own record over that run's"):
            check_run_dir_is_free(run, mode, str(run / "checkpoints" / "last.ckpt"))
    # A sweep's job is told to move the sweep.
    with pytest.raises(FileExistsError, match=r"Write the sweep to a new folder: leave hydra\.sweep\.dir out"):
        check_run_dir_is_free(run, "train", sweep_job=True)
    # A training job SLURM requeued (the same command again) is the folder's own run: it continues from its
    # last.ckpt (checkpoint_path chooses it), or starts over where its first start saved none.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    check_run_dir_is_free(run, "train", sweep_job=True)
    check_run_dir_is_free(run_folder(tmp_path / "requeued", ["csv/metrics.csv"]), "train")
    with pytest.raises(FileExistsError, match=r"record over that run's\. Write to a new folder"):
        check_run_dir_is_free(run, "evaluate")  # nothing of its own to continue
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    # Only the job's first process checks: it writes these files, and a resumed run's first process writes the
    # continued csv/metrics.csv before the others reach their check.
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.setenv(name, "1")
        check_run_dir_is_free(run, "evaluate")
        monkeypatch.setenv(name, "0")
    with pytest.raises(FileExistsError):
        check_run_dir_is_free(run, "evaluate")
    # A folder with Hydra's record and log only (a job that failed before writing), or none at all, is free.
    check_run_dir_is_free(run_folder(tmp_path / "failed", []), "train")
    check_run_dir_is_free(tmp_path / "new", "train")


def refusal(call) -> str:
    """What ``call()`` exits with (the callback's refusal), or ``""`` when it goes on."""
    try:
        call()
    except SystemExit as stop:
        return str(stop.code)
    return ""


def test_the_composed_folder_is_checked_before_hydra_writes_its_record(tmp_path, monkeypatch):
    # Hydra calls RunDirIsFree with the composed config: the folder, mode, resume and ckpt_path as the command line,
    # the config files and their interpolations set them.
    monkeypatch.delenv(DDP_JOB_DIR_ENV, raising=False)
    monkeypatch.setenv("RUN_FOLDER", str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)  # a folder named by the time (outputs/<date>/<time>) is created here
    run = run_folder(tmp_path / "run")
    callback = RunDirIsFree()

    def run_start(*overrides):
        return refusal(lambda: callback.on_run_start(compose_config(overrides, return_hydra_config=True)))

    def multirun_start(*overrides):
        return refusal(lambda: callback.on_multirun_start(compose_config(overrides, return_hydra_config=True)))

    for overrides in (
        [f"hydra.run.dir={run}"],
        ["hydra.run.dir=${oc.env:RUN_FOLDER}", "seed=1"],
        [f"hydra.run.dir={run}", f"weights={run}/checkpoints/last.ckpt"],
        ["mode=evaluate", f"resume={run}", f"hydra.run.dir={run}"],
        ["mode=predict", f"ckpt_path={run}/checkpoints/last.ckpt", f"hydra.run.dir={run}"],
        [f"resume={run_folder(tmp_path / 'elsewhere')}", f"hydra.run.dir={run}"],
        ["experiment=ablation_mask_loss", "hydra.mode=RUN", f"hydra.run.dir={run}"],
    ):
        assert refusal_message(run) in run_start(*overrides), overrides
    # A resume of a folder that is not there (a typo, in resume= and hydra.run.dir= both, as the stop message's
    # command has them): answered before Hydra creates the folder, which would then pass for a run stopped before
    # its first checkpoint.
    typo = tmp_path / "rn"
    for overrides in (
        [f"resume={typo}", f"hydra.run.dir={typo}"],
        [f"resume={typo}"],
        ["mode=evaluate", f"resume={typo}"],
    ):
        assert run_start(*overrides) == (
            f"FileNotFoundError: resume={typo}: there is no {typo}/checkpoints/last.ckpt. resume= takes the folder of "
            "a run (outputs/<date>/<time>, or a sweep job's folder), and this is none."
        )
        assert not typo.exists() and not (tmp_path / "outputs").exists()
    # Its own resume, from last.ckpt or a checkpoint named inside it; a folder not named (a new one by the time).
    assert run_start(f"resume={run}", f"hydra.run.dir={run}") == ""
    assert run_start(f"ckpt_path={run}/checkpoints/last.ckpt", f"hydra.run.dir={run}", "trainer.max_epochs=9") == ""
    assert run_start("seed=1", f"resume={run}") == ""
    # A training job SLURM requeued continues its folder's run (mrcnn.engine.config_checks.requeued_checkpoint).
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert run_start(f"hydra.run.dir={run}") == ""
    assert refusal_message(run) in run_start("mode=evaluate", f"hydra.run.dir={run}", f"weights={run}/x.pth")
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    # A sweep into a folder whose jobs hold output (any depth: Hydra's subdir may be nested) would reuse their folders;
    # its hydra.run.dir does not count, and each of its jobs checks its own folder when its mode starts.
    sweep = tmp_path / "sweep"
    run_folder(sweep / "model" / "0", ["csv/metrics.csv"])
    message = f"FileExistsError: hydra.sweep.dir={sweep} holds runs' output (model/0/csv/metrics.csv)"
    for overrides in (["seed=1"], ["experiment=ablation_mask_loss"]):
        assert multirun_start(*overrides, f"hydra.sweep.dir={sweep}").startswith(message)
        assert multirun_start(*overrides, f"hydra.sweep.dir={sweep}", f"hydra.run.dir={tmp_path / 'new'}")
        assert multirun_start(*overrides, f"hydra.run.dir={run}") == ""
    assert run_start("seed=1", f"hydra.sweep.dir={sweep}") == ""
    assert multirun_start(f"hydra.sweep.dir={run_folder(tmp_path / 'stopped', [])}") == ""
    # A DDP child runs in its job's folder; a job's other processes leave the check to the first.
    monkeypatch.setenv(DDP_JOB_DIR_ENV, str(run))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_start(f"hydra.run.dir={run}") == multirun_start(f"hydra.sweep.dir={sweep}") == ""
    monkeypatch.delenv(DDP_JOB_DIR_ENV)
    assert run_start(f"hydra.run.dir={run}") == multirun_start(f"hydra.sweep.dir={sweep}") == ""


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch, caplog):
    # Three runs whose folder, named by the time, comes out the same (here: by the year): each takes its own, made
    # atomically before Hydra writes there, and says so. A folder given by name stays as given.
    monkeypatch.delenv(DDP_JOB_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    callback = RunDirIsFree()
    folders = []
    for seed in range(3):
        config = compose_config([f"seed={seed}", "hydra.run.dir=runs/${now:%Y}"], return_hydra_config=True)
        callback.on_run_start(config)
        folders.append(str(config.hydra.run.dir))
    year = folders[0].split("/")[1]
    assert folders == [f"runs/{year}", f"runs/{year}-2", f"runs/{year}-3"]
    assert all((tmp_path / folder).is_dir() for folder in folders)
    assert f"runs/{year} was taken by a run started in the same second: this run writes to runs/{year}-3" in caplog.text
    named = compose_config([f"hydra.run.dir={tmp_path / 'named'}"], return_hydra_config=True)
    callback.on_run_start(named)
    assert named.hydra.run.dir == str(tmp_path / "named") and not (tmp_path / "named").exists()
    # A job's other processes run in the folder their first process took.
    monkeypatch.setenv("LOCAL_RANK", "1")
    child = compose_config(["hydra.run.dir=runs/${now:%Y}"], return_hydra_config=True)
    callback.on_run_start(child)
    assert child.hydra.run.dir == f"runs/{year}" and sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        year,
        f"{year}-2",
        f"{year}-3",
    ]


def refusal_message(run) -> str:
    return f"FileExistsError: the job's folder {run} holds another run's output"


def test_a_job_whose_folder_holds_a_run_stops_before_it_writes_there(tmp_path):
    # What a sweep's job (its folder is not on the command line) meets: the same check, at the start of the mode.
    from mrcnn.engine.predict import predict
    from mrcnn.engine.train import evaluate, train

    run = run_folder(tmp_path / "run")
    torch.save({}, run / "checkpoints" / "last.ckpt")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    jobs = {
        train: [],
        evaluate: ["mode=evaluate", f"ckpt_path={tmp_path / 'other.ckpt'}"],
        predict: ["mode=predict", f"weights={tmp_path / 'other.ckpt'}", f"predict.input={tmp_path}"],
    }
    torch.save({}, tmp_path / "other.ckpt")
    for job, overrides in jobs.items():
        cfg = compose_config([*TINY_MODEL, *overrides], run_dir=str(run))
        with pytest.raises(FileExistsError, match=rf"the job's folder {run} holds another run's output"):
            job(cfg)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_job_that_failed_before_its_first_step_leaves_no_folder(tmp_path, monkeypatch):
    from mrcnn.engine.launch import discard_unused_output

    monkeypatch.delenv(DDP_JOB_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    # Hydra's record and log, and the CSV logger's hparams.yaml (written when fit starts): nothing of a run.
    failed = run_folder(tmp_path / "outputs" / "day" / "failed", [])
    (failed / "csv").mkdir()
    (failed / "csv" / "hparams.yaml").write_text("a: 1\n")
    assert discard_unused_output(failed) and not (tmp_path / "outputs").exists()
    for kept in ("csv/metrics.csv", "checkpoints/last.ckpt", "wandb/run.txt"):
        run = run_folder(tmp_path / kept.replace("/", "_"), [kept, "csv/hparams.yaml"])
        assert not discard_unused_output(run) and (run / kept).is_file()


def test_a_continued_run_that_saved_nothing_leaves_the_runs_record_as_it_was(tmp_path, monkeypatch):
    # Hydra writes the job's record over the run's before the job starts; a job that fails before its first save
    # (its config refused, a Ctrl-C) has not continued the run, whose record must still say how it was trained.
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID", DDP_JOB_DIR_ENV):
        monkeypatch.delenv(key, raising=False)
    run = run_folder(tmp_path / "run")
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    for saves_a_checkpoint in (False, True):
        keep_run_record(run)
        (run / ".hydra" / "overrides.yaml").write_text("- resume=run\n")  # what Hydra writes for the job
        (run / ".hydra" / "resolved.yaml").write_text("seed: 0\n")  # a file the run had not written
        if saves_a_checkpoint:
            (run / "checkpoints" / "last.ckpt").write_text("the continued run")
        assert restore_run_record(run) is not saves_a_checkpoint
        record = {path.name: path.read_text() for path in (run / ".hydra").iterdir()}
        if saves_a_checkpoint:  # the job continued the run: its record stands
            assert record["overrides.yaml"] == "- resume=run\n" and "resolved.yaml" in record
        else:
            assert record == {"overrides.yaml": "- seed=0\n", "config.yaml": "seed: 0\n"}
    assert not restore_run_record(run)  # once per job


def test_the_newest_checkpoint_is_the_one_of_the_largest_step_else_the_last_written(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert newest_checkpoint(tmp_path) is None

    def write(name: str, mtime: int) -> None:
        (folder / name).write_text("x")
        os.utime(folder / name, (mtime, mtime))

    # Written in another order than their steps (a copied folder), named as this project and as Lightning name them.
    write("epoch10-step100.ckpt", 1)
    write("epoch=9-step=90.ckpt", 3)
    write("epoch1-step8.ckpt", 2)
    assert newest_checkpoint(tmp_path) == folder / "epoch10-step100.ckpt"
    # A name without a step: the one written last.
    write("mine.ckpt", 0)
    assert newest_checkpoint(tmp_path) == folder / "epoch=9-step=90.ckpt"
