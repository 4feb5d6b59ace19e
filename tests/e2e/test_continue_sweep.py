"""A stopped sweep continued with continue_sweep=true: finished jobs kept, a stopped one resumed, the rest run."""

import csv
import json
import shlex

import pytest

from mrcnn.reporting.report import collect
from tests.e2e.test_run import run_before_torch
from tests.helpers.runs import TINY_RUN, run_py

# Job 0 trains its 4 steps; job 1 is stopped by Ctrl-C at step 2 (InterruptAt), which ends the sweep.
SWEEP = [
    "-m",
    *TINY_RUN,
    "data.num_train_images=8",
    "data.num_val_images=2",
    "data.datamodule.batch_size=2",
    "+callbacks.interrupt._target_=tests.helpers.runs.InterruptAt",
    "+callbacks.interrupt.step=99,2",
]


def train_steps(job) -> list[int]:
    with open(job / "csv" / "metrics.csv", newline="") as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]


# Slow (about 50 s: three tiny trainings through run.py). The default suite checks the refusals below, and a job
# started again in its folder continuing from its last.ckpt (tests/test_slurm_requeue.py, SLURM's requeue).
@pytest.mark.slow
def test_a_stopped_sweep_continues_where_it_stopped(tmp_path):
    sweep = tmp_path / "sweep"
    stopped = run_py([*SWEEP, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, check=False)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    finished = (sweep / "0" / "metrics.json").read_bytes()
    record = {path.name: path.read_bytes() for path in (sweep / "0" / ".hydra").iterdir()}
    assert not (sweep / "1" / "metrics.json").exists() and (sweep / "1" / "checkpoints" / "last.ckpt").exists()
    # The stop names the command that continues the sweep: the one this test runs next.
    command = " ".join(shlex.quote(arg) for arg in [*SWEEP[1:], f"hydra.sweep.dir={sweep}", "continue_sweep=true"])
    assert (
        f"Continue the sweep (this job, and those after it) with: python run.py -m {command}\n"
        in (sweep / "1" / "run.log").read_text()
    )

    result = run_py([*SWEEP, f"hydra.sweep.dir={sweep}", "continue_sweep=true"], cwd=tmp_path)
    log = result.stdout + result.stderr
    assert "job 0 finished when the sweep ran before" in log and "kept, not run again" in log
    assert "cost estimate (sweep): 1 jobs x 4 steps" in log and "(1 of the sweep's 2 jobs finished before: kept" in log
    assert f"this job continues from {sweep / '1' / 'checkpoints' / 'last.ckpt'}" in log
    assert (sweep / "0" / "metrics.json").read_bytes() == finished  # not run again
    assert {path.name: path.read_bytes() for path in (sweep / "0" / ".hydra").iterdir()} == record  # nor re-recorded
    assert json.loads((sweep / "1" / "metrics.json").read_text())["global_step"] == 4
    assert train_steps(sweep / "1") == [0, 1, 2, 3]  # the stopped start's two steps, then the continued start's
    # The report of the continued sweep counts both jobs as run (job 0's record has no continue_sweep=true).
    left_out = []
    collect(sweep, ["callbacks.interrupt.step"], left_out=left_out)
    assert left_out == []


def test_continue_sweep_needs_the_stopped_sweeps_folder_and_command(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    result = run_before_torch(tmp_path, ["-m", "seed=0,1", f"hydra.sweep.dir={sweep}", "continue_sweep=true"])
    assert result.returncode != 0 and f"hydra.sweep.dir={sweep} holds no sweep to continue" in result.stderr
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task: ['seed=0,1', data.min_size=64]\n")
    result = run_before_torch(tmp_path, ["-m", "seed=0,1", f"hydra.sweep.dir={sweep}", "continue_sweep=true"])
    assert result.returncode != 0, result.stderr[-2000:]
    assert f"the sweep in {sweep} ran with the overrides seed=0,1 data.min_size=64, this command gives seed=0,1" in (
        result.stderr
    )
    # The same command, but a job folder ran another job under its number (the experiment's sweep changed since).
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task: ['seed=0,1']\n")
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  job: {num: 0}\n  overrides:\n    task: [seed=0, base_lr=0.99]\n"
    )
    result = run_before_torch(tmp_path, ["-m", "seed=0,1", f"hydra.sweep.dir={sweep}", "continue_sweep=true"])
    assert result.returncode != 0, result.stderr[-2000:]
    assert f"{sweep / '0'} ran job #0 with seed=0 base_lr=0.99, which is #0 seed=0 now" in result.stderr
    # A single run continues with resume=.
    result = run_before_torch(tmp_path, ["continue_sweep=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode != 0 and "a single run continues with resume=<its folder>" in result.stderr
    assert "Traceback" not in result.stderr and "torch loaded: False" in result.stdout
