"""The sweep's cost estimate: the number of jobs, the steps of one, and the log lines (mrcnn/engine/sweep_cost.py)."""

import logging
from types import SimpleNamespace

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from mrcnn.engine import launch
from mrcnn.engine.callbacks import CostEstimate
from mrcnn.engine.sweep_cost import (
    estimate_line,
    jobs_at_once,
    planned_steps,
    sweep_job_count,
    sweep_jobs,
    sweep_position,
)
from tests.helpers.config import compose_config
from tests.helpers.runs import training_only_trainer


def test_the_job_count_is_the_sweepers_product_and_the_command_line_replaces_a_swept_key():
    params = {"seed": "0,1,2", "model/pooler": "roi_pool,roi_warp,roi_align"}
    assert sweep_job_count(params, ["experiment=ablation_roialign"]) == 9
    assert sweep_job_count(params, ["model/pooler=roi_pool,roi_align", "seed=0"]) == 2
    assert sweep_job_count(params, ["model/backbone=c5", "model/pooler=roi_pool,roi_align"]) == 6
    assert sweep_job_count(None, ["seed=0,1"]) == 2


def test_planned_steps_of_the_recorded_recipes_and_the_paper():
    # ablation_roialign on the CPU: 3 epochs of 2,000 images at batch 8.
    assert planned_steps(compose_config(["experiment=ablation_roialign"])) == 750
    assert planned_steps(compose_config(["experiment=ablation_roialign", "setting=gpu"])) == 2000
    paper = compose_config(["setting=paper", "data.root=/coco", "model.backbone_weights=/r50.pth"])
    assert planned_steps(paper) == 160_000


def test_planned_steps_stop_where_lightning_stops():
    # 2,000 images at batch 8 on one process: 250 steps an epoch. Whichever limit comes first ends the job.
    base = ["data.datamodule.batch_size=8", "trainer.max_epochs=4"]
    assert planned_steps(compose_config([*base, "trainer.max_steps=100000"])) == 1000
    assert planned_steps(compose_config([*base, "trainer.max_steps=300"])) == 300
    # Accumulated windows: the last, short one of each epoch steps too (Lightning: 84 a epoch, not 83.3).
    assert planned_steps(compose_config([*base, "trainer.accumulate_grad_batches=3"])) == 4 * 84
    # Devices as a list, a count in a string; Lightning's own choice ("auto", -1) is not known before it runs.
    assert planned_steps(compose_config([*base, "trainer=ddp_cpu", "trainer.devices=[0,1]"])) == 500
    assert planned_steps(compose_config([*base, "trainer=ddp_cpu", "trainer.devices='2'"])) == 500
    for devices in ("auto", "-1"):
        assert planned_steps(compose_config([*base, f"trainer.devices={devices}"])) is None
        assert planned_steps(compose_config([*base, f"trainer.devices={devices}", "trainer.max_steps=300"])) == 300


def test_the_estimate_says_jobs_x_steps_x_step_time_and_what_is_left():
    start = estimate_line(9, None, 750, 0, 0.36, "recorded")
    assert "sweep 9 jobs x 750 steps x 0.36 s = 40.5 min, 40.5 min left" in start
    running = estimate_line(9, 2, 750, 250, 0.4, "measured over the last 20 steps")
    # This job: 500 steps x 0.4 s; the sweep: that plus 6 more jobs of 750 steps.
    assert "job 3/9" in running and "3.3 min left of this job" in running and "33.3 min left" in running
    assert "no step time recorded" in estimate_line(9, None, 750, 0, None, "")


def test_the_callback_logs_the_recorded_then_the_measured_estimate(caplog):
    from lightning.pytorch.demos.boring_classes import BoringModel

    callback = CostEstimate(step_time_s=0.5, step_time_note="recorded for the test", measure_steps=5, job=1, jobs=3)
    trainer = training_only_trainer(max_steps=30, callbacks=[callback])
    with caplog.at_level(logging.INFO, logger="mrcnn.engine.callbacks"):
        trainer.fit(BoringModel())
    lines = [r.getMessage() for r in caplog.records if r.name == "mrcnn.engine.callbacks"]
    assert lines[0].startswith("cost estimate (job 2/3, 0.5 s/step, recorded for the test): step 0/30")
    assert "sweep 3 jobs x 30 steps x 0.5 s = 45 s" in lines[0]
    measured = [line for line in lines if "measured over the last" in line]
    assert measured and all("job 2/3" in line for line in measured)


def test_a_step_of_accumulated_batches_is_timed_whole():
    # The remaining steps are optimizer steps: with two batches a step, a step takes two batches' time.
    from types import SimpleNamespace

    callback = CostEstimate(measure_steps=1000)
    callback.step_seconds = lambda: 1.0
    trainer = SimpleNamespace(global_step=0, is_global_zero=False, estimated_stepping_batches=10)
    callback.job = callback.jobs = 0
    callback.on_train_start(trainer, None)
    for batch_idx in range(8):
        trainer.global_step += batch_idx % 2
        callback.on_train_batch_end(trainer, None, None, None, batch_idx)
    # Four steps; the first is not timed: its first batch is the fit's (StepTimer times none before it).
    assert list(callback._times) == [2.0, 2.0, 2.0]


def test_jobs_that_run_side_by_side_are_counted_in_rounds():
    # 9 jobs, 4 at a time: 3 rounds of 750 steps x 0.4 s (5 min each).
    start = estimate_line(9, None, 750, 0, 0.4, "recorded", at_once=4)
    assert "sweep 9 jobs x 750 steps x 0.4 s = 45.0 min of job time, 15.0 min left with 4 running at once" in start
    # Job 3 (first round): the rest of its own 5 min, then two more rounds; job 6 (second round): one more.
    assert "13.3 min left with 4" in estimate_line(9, 2, 750, 250, 0.4, "measured", at_once=4)
    assert "8.3 min left with 4" in estimate_line(9, 5, 750, 250, 0.4, "measured", at_once=4)
    assert "3.3 min left with 4" in estimate_line(9, 8, 750, 250, 0.4, "measured", at_once=4)
    # More slots than jobs: every job at once. One slot: the serial line, as Hydra's basic launcher runs them.
    assert "5.0 min left with 9 running at once" in estimate_line(9, None, 750, 0, 0.4, "recorded", at_once=256)
    assert estimate_line(9, 2, 750, 250, 0.4, "m", at_once=1) == estimate_line(9, 2, 750, 250, 0.4, "m")


def test_the_launcher_says_how_many_jobs_run_at_once():
    def launcher(*overrides):
        return compose_config(list(overrides), return_hydra_config=True).hydra.launcher

    assert jobs_at_once(launcher(), 6) == 1  # Hydra's basic launcher: one after another
    assert jobs_at_once(launcher("hydra/launcher=slurm", "trainer=ddp"), 6) == 6  # a job array, 256 at a time
    slurm = launcher("hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.array_parallelism=4")
    assert jobs_at_once(slurm, 6) == 4
    assert jobs_at_once(launcher("hydra/launcher=submitit_local"), 6) == 6  # every job started at once
    assert jobs_at_once(None, 6) == 1


def test_a_sweep_job_reads_its_launcher_from_the_sweeps_record(tmp_path):
    sweep = compose_config(
        ["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.array_parallelism=2"],
        return_hydra_config=True,
    )
    sweep.hydra.sweep.dir = str(tmp_path)
    sweep.hydra.overrides.task = ["seed=0,1,2"]
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(sweep))
    job = OmegaConf.merge(sweep, {"hydra": {"mode": "MULTIRUN", "job": {"num": 2}}})
    HydraConfig.instance().set_config(job)
    try:
        assert sweep_position() == (2, 3, 2, frozenset())
    finally:
        HydraConfig.instance().cfg = None
    assert sweep_position() == (None, None, 1, frozenset())


def test_a_continued_sweep_counts_only_the_jobs_it_trains(tmp_path, monkeypatch):
    # 6 jobs of 750 steps x 0.4 s (5 min each); jobs 1, 4 and 5 finished before the sweep stopped: kept.
    line = estimate_line(6, 2, 750, 250, 0.4, "measured", kept={1, 4, 5})
    assert "sweep 3 jobs x 750 steps x 0.4 s = 15.0 min (3 of its 6 jobs finished before: kept)" in line
    assert "8.3 min left;" in line  # the rest of job 2, then job 3: the only one after it that trains (not 18.3)
    # Three at once: jobs 0, 2 and 3 all run in the first round.
    assert "3.3 min left with 3" in estimate_line(6, 2, 750, 250, 0.4, "measured", at_once=3, kept={1, 4, 5})
    # A job finds them in the sweep's folder: the folders after its own that hold results.
    sweep = compose_config(return_hydra_config=True)
    sweep.hydra.sweep.dir = str(tmp_path)
    sweep.hydra.overrides.task = ["seed=0,1,2,3,4,5", "continue_sweep=true"]
    (tmp_path / "multirun.yaml").write_text(OmegaConf.to_yaml(sweep))
    for num in (1, 2, 4, 5):  # job 2's metrics.json: this job's own from before, not kept (it runs)
        (tmp_path / str(num) / ".hydra").mkdir(parents=True)
        (tmp_path / str(num) / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        (tmp_path / str(num) / "metrics.json").write_text("{}")
    job = OmegaConf.merge(sweep, {"hydra": {"mode": "MULTIRUN", "job": {"num": 2}}})
    HydraConfig.instance().set_config(job)
    try:
        assert sweep_position() == (2, 6, 1, frozenset({4, 5}))
        # In the process that continued the sweep (Hydra's basic launcher), exactly the jobs it kept, before this
        # one too; continue_sweep given any way Hydra reads as true.
        records = {
            tmp_path / str(n): (n, {"hydra.yaml": f"hydra:\n  job:\n    num: {n}\n".encode()}) for n in (1, 4, 5)
        }
        monkeypatch.setattr(launch, "_finished_records", records)
        for given in ("continue_sweep=true", "++continue_sweep=True"):
            sweep.hydra.overrides.task = ["seed=0,1,2,3,4,5", given]
            HydraConfig.instance().set_config(
                OmegaConf.merge(sweep, {"hydra": {"mode": "MULTIRUN", "job": {"num": 2}}})
            )
            assert sweep_position() == (2, 6, 1, frozenset({1, 4, 5})), given
    finally:
        HydraConfig.instance().cfg = None


def test_the_callback_counts_the_jobs_that_run_at_once(caplog):
    callback = CostEstimate(step_time_s=1.0, job=0, jobs=4, at_once=2)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, estimated_stepping_batches=60)
    with caplog.at_level(logging.INFO, logger="mrcnn.engine.callbacks"):
        callback.on_train_start(trainer, None)
    # Two rounds of 60 s: this job's minute, then the round of jobs 3 and 4.
    assert "4.0 min of job time, 2.0 min left with 2 running at once" in caplog.text


def test_swept_values_an_interpolation_gives_are_resolved_as_hydras_sweeper_does(monkeypatch):
    # hydra.sweeper.params resolved (Hydra's BasicSweeper reads them so); the command line's overrides as written.
    monkeypatch.setenv("MRCNN_TEST_SEEDS", "0,1,2")
    params = OmegaConf.create({"seed": "${oc.env:MRCNN_TEST_SEEDS}"})
    assert sweep_job_count(params, []) == 3
    # (hydra.overrides.task: resolved item by item, the name would be 0,1,2, swept: 6 jobs)
    jobs = sweep_jobs(None, OmegaConf.create(["seed=0,1", "logger.csv.name=${oc.env:MRCNN_TEST_SEEDS}"]))
    assert [job[0] for job in jobs] == ["seed=0", "seed=1"] and all("MRCNN_TEST_SEEDS" in job[1] for job in jobs)
