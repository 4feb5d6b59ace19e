"""Ablation reports: grouping a sweep's jobs into variants, mean and spread over seeds, table, chart."""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hydra.core.utils import JobStatus

from mrcnn.reporting.report import NOT_STARTED, collect, markdown_table, our_setting, write_report
from mrcnn.reporting.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]


def fake_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def metrics(ap):
    return {"segm_AP": ap, "segm_AP50": ap + 0.2, "segm_AP75": ap - 0.1, "bbox_AP": ap + 0.05}


@pytest.fixture
def sweep(tmp_path):
    fake_job(tmp_path, "0", ["model/pooler=roi_pool", "seed=0"], metrics(0.20))
    fake_job(tmp_path, "1", ["model/pooler=roi_pool", "seed=1"], metrics(0.30))
    fake_job(tmp_path, "2", ["model/pooler=roi_align", "seed=0"], metrics(0.40))
    fake_job(tmp_path, "3", ["model/pooler=roi_align", "seed=1"], metrics(0.40))
    fake_job(tmp_path, "4", ["model/pooler=roi_align", "seed=2"], None)  # failed job: skipped
    return tmp_path


def test_collect_groups_by_variant_and_averages_over_seeds(sweep):
    variants = collect(sweep, ["model/pooler"], order=["model/pooler=roi_pool", "model/pooler=roi_align"])
    assert [v.name for v in variants] == ["model/pooler=roi_pool", "model/pooler=roi_align"]
    pool, align = variants
    assert pool.seeds == ["0", "1"] and len(align.runs) == 2
    assert pool.mean("segm_AP") == pytest.approx(0.25)
    assert pool.std("segm_AP") == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.2, 0.3
    assert align.std("segm_AP") == 0.0


def test_markdown_table_has_the_papers_columns_and_numbers(sweep):
    variants = collect(sweep, ["model/pooler"], order=["model/pooler=roi_pool", "model/pooler=roi_align"])
    table = markdown_table(variants, "Table 2c", paper={"model/pooler=roi_align": [30.3, 51.2, 31.5, float("nan")]})
    lines = table.splitlines()
    assert lines[0] == "**Table 2c**"
    assert "| variant | AP | AP50 | AP75 | AP^bb | seeds | paper AP |" in table
    pool_row = next(line for line in lines if line.startswith("| model/pooler=roi_pool"))
    assert "25.0 ± 7.1" in pool_row and "45.0 ± 7.1" in pool_row and "| 2 |" in pool_row
    align_row = next(line for line in lines if line.startswith("| model/pooler=roi_align"))
    assert "40.0 ± 0.0" in align_row and "30.3 | 51.2 | 31.5 | - |" in align_row


def test_write_report_and_the_rebuild_command(sweep):
    paths = write_report(sweep, ["model/pooler"], "RoI pooling")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(paths["json"].read_text())
    assert {v["variant"] for v in summary["variants"]} == {"model/pooler=roi_pool", "model/pooler=roi_align"}
    # The failed job is named in the report, not only in the log.
    why = "no metrics.json: failed or not finished"
    assert summary["left_out"] == [{"job": "4", "variant": "model/pooler=roi_align", "why": why}]
    assert f"**Left out of the table: 1 job(s)**: `4` model/pooler=roi_align ({why})." in paths["md"].read_text()
    paths["md"].unlink()
    result = subprocess.run(
        [sys.executable, "-m", "mrcnn.reporting", str(sweep), "--keys", "model/pooler", "--title", "again"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # Grouped by keys the sweep did not record: beside the sweep's report files, never over them.
    assert not paths["md"].exists()
    regrouped = sweep / "report_by_model-pooler.md"
    assert "**again**" in regrouped.read_text() and "roi_align" in result.stdout
    assert (sweep / "report_by_model-pooler.json").is_file() and (sweep / "report_by_model-pooler.png").is_file()


def test_the_rebuild_command_never_overwrites_the_sweeps_report_and_names_a_missing_folder(sweep, tmp_path):
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  callbacks:\n    ablation_report:\n      _target_: mrcnn.reporting.report.AblationReportCallback\n"
        "      variant_keys: [model/pooler]\n      title: Own\n"
    )
    own = write_report(sweep, ["model/pooler"], "Own")["md"]
    before = own.read_text()
    # The command in this process (test_write_report_and_the_rebuild_command runs it as its own process).
    report_main([str(sweep), "--keys", "seed"])
    assert own.read_text() == before and (sweep / "report_by_seed.md").is_file()
    missing = tmp_path / "no_such_sweep"
    # A mistyped folder is answered before torch loads (seconds): the module says which modules it imported.
    check = (
        "import runpy, sys\n"
        "try:\n"
        f"    sys.argv = ['mrcnn.reporting', {str(missing)!r}]\n"
        "    runpy.run_module('mrcnn.reporting', run_name='__main__')\n"
        "finally:\n"
        "    print('torch loaded:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"{missing}: no such folder" in result.stderr
    assert "torch loaded: False" in result.stdout, result.stdout


def test_the_rebuild_command_on_a_single_runs_folder_says_it_is_not_a_sweeps(tmp_path, capsys):
    # A folder of `python run.py` (hydra.mode=RUN) has no multirun.yaml: the message said that file had no
    # ablation_report callback, naming a file that is not there.
    run = tmp_path / "outputs" / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit) as stop:
        report_main([str(run)])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"{run} is a single run's folder, not a sweep's: it has no multirun.yaml" in error
    assert f"a single run's numbers are in {run / 'metrics.json'}" in error
    assert "has no ablation_report callback" not in error
    # A folder of jobs without multirun.yaml needs --keys, and is not said to have a file it lacks.
    (run / "job").mkdir()
    (run / ".hydra" / "config.yaml").rename(run / "job" / "config.yaml")
    with pytest.raises(SystemExit):
        report_main([str(run)])
    error = capsys.readouterr().err
    assert f"--keys is needed: {run} has no multirun.yaml" in error and "ablation_report" not in error
    # A sweep's folder whose multirun.yaml has no report callback still asks for --keys.
    (tmp_path / "multirun.yaml").write_text("hydra:\n  callbacks: {}\n")
    with pytest.raises(SystemExit):
        report_main([str(tmp_path)])
    assert f"--keys is needed: {tmp_path / 'multirun.yaml'} has no ablation_report callback" in capsys.readouterr().err


def test_the_rebuild_command_reads_the_report_settings_from_the_sweep(sweep):
    # What the report callback of a sweep records in multirun.yaml (as experiment=ablation_* writes it).
    (sweep / "multirun.yaml").write_text(
        "hydra:\n"
        "  callbacks:\n"
        "    ablation_report:\n"
        "      _target_: mrcnn.reporting.report.AblationReportCallback\n"
        "      variant_keys: [model/pooler]\n"
        "      title: From the sweep\n"
        "      order: [model/pooler=roi_pool, model/pooler=roi_align]\n"
        "      paper:\n"
        "        model/pooler=roi_align: [30.3, 51.2, 31.5, .nan]\n"
    )
    report_main([str(sweep)])
    lines = (sweep / "report.md").read_text().splitlines()
    assert lines[0] == "**From the sweep**"
    rows = [line for line in lines if line.startswith("| model/pooler=")]
    assert rows[0].startswith("| model/pooler=roi_pool") and rows[1].startswith("| model/pooler=roi_align")
    assert "30.3 | 51.2 | 31.5 | - |" in rows[1]


def test_a_rebuild_with_fewer_keys_keeps_the_papers_numbers_and_order_where_they_map_one_to_one(tmp_path, capsys):
    # The sweep ran C4 jobs and recorded its report by backbone and pooler, with Table 2d's C5 rows as well.
    for i, pooler in enumerate(("roi_pool", "roi_align")):
        fake_job(tmp_path, str(i), ["model/backbone=c4", f"model/pooler={pooler}", "seed=0"], metrics(0.2 + 0.1 * i))
    paper = {
        f"model/backbone={backbone}, model/pooler={pooler}": [value, 50.0, 30.0, math.nan]
        for backbone, pooler, value in (("c4", "roi_align", 30.3), ("c4", "roi_pool", 26.9), ("c5", "roi_align", 30.9))
    }
    order = ["model/backbone=c4, model/pooler=roi_align", "model/backbone=c4, model/pooler=roi_pool"]
    callback = {"variant_keys": ["model/backbone", "model/pooler"], "title": "T", "order": order, "paper": paper}
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"callbacks": {"ablation_report": callback}}}))
    report_main([str(tmp_path), "--keys", "model/pooler"])
    summary = json.loads((tmp_path / "report_by_model-pooler.json").read_text())
    assert [v["variant"] for v in summary["variants"]] == ["model/pooler=roi_align", "model/pooler=roi_pool"]
    assert [v["paper"][0] for v in summary["variants"]] == [30.3, 26.9]  # C4's rows, the backbone the jobs ran


def test_the_rebuild_command_needs_keys_without_a_recorded_callback(sweep):
    result = subprocess.run(
        [sys.executable, "-m", "mrcnn.reporting", str(sweep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--keys is needed" in result.stderr


def test_jobs_that_differ_in_another_swept_key_are_never_averaged_as_seeds(tmp_path, caplog):
    # A sweep over model/pooler x base_lr x seed, reported by model/pooler: base_lr joins the labels.
    for i, (pooler, lr, seed) in enumerate(
        (p, lr, s) for p in ("roi_pool", "roi_align") for lr in ("0.02", "0.04") for s in ("0", "1")
    ):
        fake_job(tmp_path, str(i), [f"model/pooler={pooler}", f"base_lr={lr}", f"seed={seed}"], metrics(0.1 * (i + 1)))
    # A runtime key (loader workers) does not make results differ: jobs are still averaged across it.
    (tmp_path / "7" / ".hydra" / "overrides.yaml").write_text(
        "- model/pooler=roi_align\n- base_lr=0.04\n- seed=1\n- data.datamodule.num_workers=4\n"
    )
    with caplog.at_level("WARNING"):
        variants = collect(tmp_path, ["model/pooler"])
    assert "the jobs also differ in base_lr" in caplog.text
    assert {v.name: v.seeds for v in variants} == {
        f"model/pooler={p}, base_lr={lr}": ["0", "1"] for p in ("roi_pool", "roi_align") for lr in ("0.02", "0.04")
    }
    assert variants[0].mean("segm_AP") == pytest.approx(0.15)
    # A job that ran a key's default differs from one that set another value; a repeated seed is said.
    fake_job(tmp_path, "8", ["model/pooler=roi_pool", "seed=1"], metrics(0.5))
    (tmp_path / "8" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "seed": 1}))
    fake_job(tmp_path, "9", ["model/pooler=roi_pool", "base_lr=0.02", "seed=1"], metrics(0.5))
    with caplog.at_level("WARNING"):
        names = {v.name: v.seeds for v in collect(tmp_path, ["model/pooler"])}
    # Job 8 joins the jobs that set base_lr=0.04 (its config's value), job 9 those that set 0.02.
    assert (
        names["model/pooler=roi_pool, base_lr=0.04"] == names["model/pooler=roi_pool, base_lr=0.02"] == ["0", "1", "1"]
    )
    assert "model/pooler=roi_pool, base_lr=0.02: seed 1 repeats (3 runs averaged)" in caplog.text


def test_jobs_scored_on_other_batches_or_trained_for_another_time_are_never_averaged_as_seeds(tmp_path, caplog):
    # Keys a resumed run may change, but which change what a job trains or what its final evaluation scores.
    fake_job(tmp_path, "0", ["model/pooler=roi_align", "seed=0"], metrics(0.4))
    fake_job(tmp_path, "1", ["model/pooler=roi_align", "seed=1", "trainer.limit_val_batches=0.1"], metrics(0.5))
    fake_job(tmp_path, "2", ["model/pooler=roi_align", "seed=2", "trainer.max_time=00:00:01:00"], metrics(0.1))
    with caplog.at_level("WARNING"):
        variants = collect(tmp_path, ["model/pooler"])
    assert len(variants) == 3 and all(len(v.runs) == 1 for v in variants), [v.name for v in variants]
    assert "trainer.limit_val_batches" in caplog.text and "trainer.max_time" in caplog.text


def test_jobs_a_stopped_sweep_never_started_are_named_and_a_sweep_without_results_is_said_in_a_line(sweep):
    # The sweep planned pooler x seed 0..2; Ctrl-C ended it before roi_pool's seed 2 started (no folder).
    sweeper = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}
    multirun = {"hydra": {"sweeper": sweeper, "overrides": {"task": ["model/pooler=roi_pool,roi_align", "seed=0,1,2"]}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    summary = json.loads(write_report(sweep, ["model/pooler"])["json"].read_text())
    assert summary["left_out"] == [
        {"job": "4", "variant": "model/pooler=roi_align", "why": "no metrics.json: failed or not finished"},
        {"job": "", "variant": "model/pooler=roi_pool", "why": NOT_STARTED},
    ]
    assert (
        f"`4` model/pooler=roi_align (no metrics.json: failed or not finished); model/pooler=roi_pool ({NOT_STARTED})."
        in (sweep / "report.md").read_text()
    )
    # Nothing finished yet: the rebuild command says so in a line, with what the jobs are, and no traceback.
    for job in ("0", "1", "2", "3"):
        (sweep / job / "metrics.json").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "mrcnn.reporting", str(sweep), "--keys", "model/pooler"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        f"no finished runs (with metrics.json) under {sweep}; its jobs: 5 no metrics.json: failed or not "
        in result.stderr
    )
    assert f"1 {NOT_STARTED}" in result.stderr


def test_a_job_that_scored_nothing_is_left_out_not_averaged_as_ap_minus_one(tmp_path, caplog):
    fake_job(tmp_path, "0", ["model/pooler=roi_pool", "seed=0"], metrics(0.10))
    nothing = {k: -1.0 for k in metrics(0.0)} | {"nothing_to_score": "the validation set has no objects"}
    fake_job(tmp_path, "1", ["model/pooler=roi_pool", "seed=1"], nothing)
    with caplog.at_level("WARNING"):
        [variant] = collect(tmp_path, ["model/pooler"])
    assert variant.seeds == ["0"] and variant.mean("segm_AP") == pytest.approx(0.10)
    assert "it scored nothing (the validation set has no objects)" in caplog.text
    # One run gives no spread: none is reported (not 0.0), and the table shows no ±.
    assert math.isnan(variant.std("segm_AP"))
    assert "10.0 ±" not in markdown_table([variant], "t", None)


def test_a_sweep_kept_inside_another_is_its_own_record(tmp_path):
    # experiments/ablation_mask_head keeps its superseded report, and a newer sweep in scaled_mlp/: a report on the
    # outer folder must not take the inner sweep's jobs for its own.
    outer = tmp_path / "ablation"
    fake_job(outer, "0", ["model/pooler=roi_pool", "seed=0"], metrics(0.2))
    inner = outer / "rerun"
    (inner).mkdir()
    (inner / "multirun.yaml").write_text("hydra: {}\n")
    fake_job(inner / "jobs", "0", ["model/pooler=roi_pool", "seed=0"], metrics(0.6))
    fake_job(inner / "jobs", "1", ["model/pooler=roi_align", "seed=0"], metrics(0.7))
    assert {v.name: v.mean("segm_AP") for v in collect(outer, ["model/pooler"])} == {"model/pooler=roi_pool": 0.2}
    assert {v.name for v in collect(inner, ["model/pooler"])} == {"model/pooler=roi_pool", "model/pooler=roi_align"}
    import shutil

    shutil.rmtree(outer / "0")
    with pytest.raises(ValueError, match=r"no finished runs .* \(the sweeps inside it have their own reports: rerun\)"):
        write_report(outer, ["model/pooler"])


def test_a_recorded_job_is_labelled_by_its_sweeps_choices_and_its_batch_counts_accumulation(tmp_path):
    # A recorded job (jobs/<name>/overrides.yaml, no .hydra) overrides only the ablated key; the others are the
    # sweep's choices (multirun.yaml).
    sweep_config = {**CONFIG, "hydra": {"runtime": {"choices": {"model/backbone": "fpn", "model/mask_head": "fcn"}}}}
    sweep_config["trainer"] = {**CONFIG["trainer"], "accumulate_grad_batches": 4}
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(sweep_config))
    for name, head in (("0", "fcn"), ("1", "mlp2")):
        job = tmp_path / "jobs" / name
        job.mkdir(parents=True)
        (job / "overrides.yaml").write_text(f"- model/mask_head={head}\n- seed=0\n")
        (job / "metrics.json").write_text(json.dumps({**metrics(0.3), "global_step": 100, "world_size": 2}))
        (job / "job.json").write_text(json.dumps({"model": model(), "parameters": {"total": 1, "mask_head": 1}}))
    variants = collect(tmp_path, ["model/mask_head", "model/backbone"])
    assert [v.name for v in variants] == [
        "model/mask_head=fcn, model/backbone=fpn",
        "model/mask_head=mlp2, model/backbone=fpn",
    ]
    # 8 images a process x 2 processes x 4 accumulated batches a step; the module scales the lr by the same.
    setting = our_setting(variants)
    assert setting["batch"] == "64 images" and setting["learning rate"] == "0.16 (base_lr 0.04 at batch 16)"


def test_an_empty_sweep_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no finished runs"):
        write_report(tmp_path, ["model/pooler"])


# ---- what was compared: labels from what ran, the setting, the built models, parameters and time -------------


def real_job(sweep: Path, name: str, choices: dict, config: dict, metrics_: dict, record: dict | None, overrides=()):
    """A job folder as a sweep writes it: overrides, the group choices (hydra.yaml), the config, metrics and
    (from the JobRecord callback) job.json."""
    fake_job(sweep, name, list(overrides), metrics_)
    job = sweep / name
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if record is not None:
        (job / "job.json").write_text(json.dumps(record))


def model(pooler="RoIPoolPooler", mode="max", sampling_ratio=None):
    return {
        "backbone": "ResNet-18-FPN",
        "backbone.width": 64,
        "backbone.norm": "GroupNorm",
        "rois_per_image": 64,
        "pooler": pooler,
        "pooler.mode": mode,
        "pooler.sampling_ratio": sampling_ratio,
        "mask_head": "FCNMaskHead",
        "mask_loss": "SigmoidMaskLoss",
        "mask_targets": "soft",
    }


CONFIG = {
    "seed": 0,
    "base_lr": 0.04,
    "module": {"base_batch_size": 16},
    "model": {"depth": 18, "width": 64, "backbone_weights": None},
    "data": {"image_size": 128, "num_train_images": 2000, "num_val_images": 200, "datamodule": {"batch_size": 8}},
    "trainer": {"max_epochs": 4},
}


@pytest.fixture
def recorded_sweep(tmp_path):
    """Two poolers over two seeds, each job with its config, choices and job.json (as experiment=... writes them)."""
    for i, (option, seed, built, step) in enumerate(
        [
            ("roi_pool", 0, model(), 0.5),
            ("roi_warp_max", 0, model("RoIWarpPooler", "max", 2), 0.6),
            ("roi_pool", 1, model(), 0.7),
            ("roi_warp_max", 1, model("RoIWarpPooler", "max", 2), 0.8),
        ]
    ):
        record = {
            "model": built,
            "parameters": {"total": 12_466_553, "mask_head": 164_871},
            "train_steps": 1000,
            "step_time_median_s": step,
            "wall_time_s": 420.0 + 60 * seed,
        }
        real_job(
            tmp_path,
            str(i),
            {"model/pooler": option, "model/backbone": "fpn", "data": "shapes"},
            {**CONFIG, "seed": seed},
            {**metrics(0.2 + 0.1 * i), "global_step": 1000, "world_size": 1},
            record,
            overrides=[f"model/pooler={option}", f"seed={seed}"],
        )
    return tmp_path


def test_a_job_is_labelled_by_the_choice_it_was_composed_with(tmp_path):
    # The overrides name one option, the composed config another (as a `+group` sweep beside a user's `group=`
    # did): the label is what the job ran.
    real_job(
        tmp_path / "a",
        "0",
        {"ablation/mask_loss": "sigmoid"},
        CONFIG,
        metrics(0.3),
        None,
        ["ablation/mask_loss=softmax"],
    )
    assert [v.name for v in collect(tmp_path / "a", ["ablation/mask_loss"])] == ["ablation/mask_loss=sigmoid"]
    # A plain key nobody overrode: its value in the job's config.
    config = {**CONFIG, "model": {**CONFIG["model"], "mask_target_form": "binary"}}
    real_job(tmp_path / "b", "0", {}, config, metrics(0.2), None)
    assert [v.name for v in collect(tmp_path / "b", ["model.mask_target_form"])] == ["model.mask_target_form=binary"]


def test_the_report_states_our_setting_beside_the_papers_and_what_each_variant_built_and_cost(recorded_sweep):
    paths = write_report(
        recorded_sweep,
        ["model/pooler"],
        "Table 2c",
        paper={"model/pooler=roi_warp_max": [27.2, 49.2, 27.1, float("nan")]},
        paper_setting={"backbone": "ResNet-50-C4", "RoIs per image": "64"},
    )
    text = paths["md"].read_text()
    # Ours, generated from the jobs; the paper's from the experiment's callback and PAPER_SETTING.
    assert "| backbone | ResNet-18-FPN | ResNet-50-C4 |" in text
    assert "| width | 64 | 64 (standard ResNet) |" in text and "| norm | GroupNorm |" in text
    assert "| data | shapes (2,000 train / 200 val images) | COCO trainval35k" in text
    assert "| image size | 128x128 | shorter side 800" in text
    assert "| training | 1,000 steps (4 epochs) | 160k iterations" in text
    assert (
        "| batch | 8 images | 16 images" in text
        and "| learning rate | 0.02 (base_lr 0.04 at batch 16) | 0.02 |" in text
    )
    assert "| seeds | 0, 1 | one run |" in text and "| RoIs per image | 64 | 64 |" in text
    assert "Not the paper's backbone design: these runs use FPN; the paper's rows were measured on C4." in text
    # Per variant: what differs in the built model, parameters, step and wall time.
    assert (
        "| variant | built (what differs between the variants) | mask-head params | params | median step | job wall time |"
        in text
    )
    row = next(line for line in text.splitlines() if line.startswith("| model/pooler=roi_warp_max | pooler="))
    assert "pooler=RoIWarpPooler, pooler.sampling_ratio=2" in row
    assert "| 165 k | 12.5 M | 0.70 s | 7.5 min |" in row
    assert "The variants' models differ only in: `pooler`, `pooler.sampling_ratio`." in text
    summary = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert (
        summary["setting"]["ours"]["backbone"] == "ResNet-18-FPN"
        and summary["setting"]["paper"]["backbone"] == "ResNet-50-C4"
    )
    assert summary["compared"]["varying"] == ["pooler", "pooler.sampling_ratio"]
    warp = summary["variants"][1]
    assert warp["parameters"] == {"total": 12_466_553, "mask_head": 164_871}
    assert warp["step_time_median_s"] == pytest.approx(0.7) and warp["wall_time_s"] == pytest.approx(450.0)
    assert warp["paper"] == [27.2, 49.2, 27.1, None] and warp["model"]["pooler"] == "RoIWarpPooler"


def test_a_label_whose_jobs_built_different_models_is_flagged(recorded_sweep):
    # Seed 1's "roi_warp_max" job built RoIAlign: the label does not say what ran.
    record = json.loads((recorded_sweep / "3" / "job.json").read_text())
    record["model"] = model("RoIAlignPooler", "max", 2)
    (recorded_sweep / "3" / "job.json").write_text(json.dumps(record))
    text = write_report(recorded_sweep, ["model/pooler"])["md"].read_text()
    assert "**INCONSISTENT: its jobs built different models**" in text
    assert "**Labels that do not match their models**: model/pooler=roi_warp_max." in text


def test_the_chart_puts_the_papers_numbers_beside_ours(recorded_sweep):
    from mrcnn.reporting.report import chart_figure

    variants = collect(recorded_sweep, ["model/pooler"])
    fig = chart_figure(variants, "Table 2c", paper={"model/pooler=roi_warp_max": [27.2, 49.2, 27.1, float("nan")]})
    ours, papers = fig.axes
    assert papers.get_title().startswith("paper")
    # The paper panel's AP bar of roi_warp_max (the second variant; AP is the first of the four bar groups).
    heights = [bar.get_height() for bar in papers.patches]
    assert heights[1] == pytest.approx(27.2) and math.isnan(heights[0])
    assert [bar.get_height() for bar in ours.patches][0] == pytest.approx(100 * variants[0].mean("segm_AP"))
    assert len(chart_figure(variants).axes) == 1  # no paper numbers: one panel


def test_the_wandb_tables_carry_the_paper_parameters_time_and_setting(recorded_sweep):
    from mrcnn.reporting.report import wandb_rows

    paths = write_report(
        recorded_sweep, ["model/pooler"], paper={"model/pooler=roi_pool": [26.9, 48.8, 26.4, float("nan")]}
    )
    tables = wandb_rows(json.loads(paths["json"].read_text()))
    columns, rows = tables["ablation/table"]
    row = dict(zip(columns, rows[0]))
    assert row["variant"] == "model/pooler=roi_pool" and row["paper AP"] == 26.9 and row["paper AP^bb"] is None
    assert row["mask-head params"] == 164_871 and row["params"] == 12_466_553
    assert row["median step (s)"] == pytest.approx(0.6) and row["job wall time (s)"] == pytest.approx(450.0)
    columns, rows = tables["ablation/setting"]
    assert columns == ["setting", "ours", "paper"] and ["backbone", "ResNet-18-FPN", "-"] in rows


def test_the_report_goes_to_an_offline_wandb_run_with_its_tables_setting_and_chart(recorded_sweep, monkeypatch):
    """As ``on_multirun_end`` calls it when the sweep's loggers (named entries) include W&B."""
    import wandb
    from omegaconf import OmegaConf

    from mrcnn.reporting.report import log_to_wandb
    from tests.helpers.wandb import read_wandb_records

    for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    paths = write_report(recorded_sweep, ["model/pooler"], "Table 2c", paper_setting={"backbone": "ResNet-50-C4"})
    config = OmegaConf.create(
        {
            "experiment_name": "ablation_roialign",
            "logger": {
                "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger"},
                "wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "p"},
            },
        }
    )
    log_to_wandb(paths, config)
    wandb.teardown()  # stops W&B's service process, which writes the run's log asynchronously: all of it on disk now
    [run_dir] = (recorded_sweep / "wandb").glob("offline-run-*")
    records = read_wandb_records(next(run_dir.glob("*.wandb")))
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "ablation_roialign"
    config_items = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config_items["setting"]["paper"]["backbone"] == "ResNet-50-C4"
    logged = {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    # Media are logged as nested keys (ablation/table/_type, ...).
    for name in ("ablation/table", "ablation/setting", "ablation/chart"):
        assert any(key.startswith(name + "/") for key in logged), (name, logged)
    [table_file] = (run_dir / "files" / "media" / "table" / "ablation").glob("table_*.table.json")
    table = json.loads(table_file.read_text())
    assert "mask-head params" in table["columns"] and "paper AP" in table["columns"] and len(table["data"]) == 2


@pytest.mark.parametrize("loggers, to_wandb", [(["csv"], False), (["csv", "wandb"], True)])
def test_the_sweep_callback_writes_the_report_and_sends_it_to_wandb_when_a_logger_is_wandb(
    recorded_sweep, monkeypatch, loggers, to_wandb
):
    from omegaconf import OmegaConf

    import mrcnn.reporting.report as report

    sent = []
    monkeypatch.setattr(report, "log_to_wandb", lambda paths, config: sent.append(paths))
    targets = {"csv": "lightning.pytorch.loggers.CSVLogger", "wandb": "lightning.pytorch.loggers.WandbLogger"}
    config = OmegaConf.create(
        {
            "hydra": {"sweep": {"dir": str(recorded_sweep)}},
            "logger": {name: {"_target_": targets[name]} for name in loggers},
        }
    )
    report.AblationReportCallback(["model/pooler"], "Table 2c").on_multirun_end(config)
    assert (recorded_sweep / "report.md").read_text().startswith("**Table 2c**")
    assert len(sent) == int(to_wandb)


def test_records_without_job_json_get_parameters_from_the_models_their_configs_build(tmp_path):
    """Table 2a (experiments/ablation_backbone) and 2d (experiments/ablation_roialign/c5_*) predate job.json: their
    reports rebuild each variant's model from the job's overrides and the sweep's recipe (no re-run)."""
    import shutil

    repo = Path(__file__).resolve().parents[1] / "experiments"
    for record in ["ablation_backbone", "ablation_roialign/c5_256px_w16", "ablation_roialign/c5_256px"]:
        summary = json.loads((repo / record / "report.json").read_text())
        for variant in summary["variants"]:
            assert variant["parameters"]["total"] > 0 and variant["parameters"]["mask_head"] > 0, record
    # Rebuilt here from the record's files alone, they are the committed counts: C4 and FPN at width 16.
    copy = tmp_path / "ablation_backbone"
    shutil.copytree(repo / "ablation_backbone" / "jobs", copy / "jobs")
    shutil.copy(repo / "ablation_backbone" / "multirun.yaml", copy)
    write_report(copy, ["model/backbone"], "Table 2a")
    rebuilt = {v["variant"]: v for v in json.loads((copy / "report.json").read_text())["variants"]}
    committed = {
        v["variant"]: v for v in json.loads((repo / "ablation_backbone" / "report.json").read_text())["variants"]
    }
    for name in ("model/backbone=c4", "model/backbone=fpn"):
        assert rebuilt[name]["parameters"] == committed[name]["parameters"]
        assert rebuilt[name]["model"]["backbone.width"] == 16
    assert rebuilt["model/backbone=c4"]["model"]["backbone"] == "ResNet-18-C4"
    assert "rebuilt from today's configs" in (copy / "report.md").read_text()


SWEEP_APP = """
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base=None, config_path=".", config_name="app")
def main(cfg):
    if cfg.pooler == "roi_pool":
        raise RuntimeError("this job fails")
    ap = 0.3 if cfg.pooler == "roi_align" else 0.2
    metrics = {"segm_AP": ap, "segm_AP50": ap, "segm_AP75": ap, "bbox_AP": ap}
    (Path(HydraConfig.get().runtime.output_dir) / "metrics.json").write_text(json.dumps(metrics))


main()
"""


def test_a_sweep_with_a_failed_job_still_reports_the_jobs_that_finished(tmp_path):
    # Hydra's sweeper raises on a failed job once all jobs ran, before on_multirun_end: the report is written as
    # each job ends, so the finished jobs are reported and the failed one is named.
    sweep = tmp_path / "sweep"
    (tmp_path / "app.py").write_text(SWEEP_APP)
    (tmp_path / "app.yaml").write_text(
        "pooler: roi_align\n"
        "hydra:\n"
        # A relative folder, with each job run in its own folder: the report still goes to the sweep's.
        "  sweep: {dir: sweep}\n"
        "  job: {chdir: true}\n"
        "  callbacks:\n"
        "    ablation_report:\n"
        "      _target_: mrcnn.reporting.report.AblationReportCallback\n"
        "      variant_keys: [pooler]\n"
        "      title: With a failed job\n"
    )
    result = subprocess.run(
        [sys.executable, str(tmp_path / "app.py"), "-m", "pooler=roi_align,roi_pool,max_pool"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "this job fails" in result.stderr
    report = (sweep / "report.md").read_text()
    assert report.startswith("**With a failed job**")
    rows = [line.split(" |")[0] for line in report.splitlines() if line.startswith("| pooler=")]
    assert rows[:2] == ["| pooler=roi_align", "| pooler=max_pool"]
    assert (
        "**Left out of the table: 1 job(s)**: `1` pooler=roi_pool (no metrics.json: failed or not finished)." in report
    )
    log = result.stdout + result.stderr
    assert "job 1 failed: the report leaves it out" in log
    assert log.count("ablation report of the jobs finished so far") == 3  # after each job, the failed one too
    assert not [p.name for p in sweep.iterdir() if ".tmp" in p.name]


def test_jobs_that_end_together_write_the_report_in_turn(sweep, monkeypatch):
    # While another job of the sweep (here: this test) writes the report, a job that ends waits for it, then writes
    # the report of everything finished by then.
    import fcntl
    import threading

    from omegaconf import OmegaConf

    from mrcnn.reporting.report import AblationReportCallback

    config = OmegaConf.create(
        {
            "hydra": {
                "mode": "RunMode.MULTIRUN",
                "sweep": {"dir": sweep.name},
                "runtime": {"cwd": str(sweep.parent)},
                "job": {"num": 3},
            }
        }
    )
    done = SimpleNamespace(status=JobStatus.COMPLETED)
    with open(sweep / ".report.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        writer = threading.Thread(target=AblationReportCallback(["model/pooler"], "T").on_job_end, args=(config, done))
        writer.start()
        writer.join(timeout=3)
        assert writer.is_alive() and not (sweep / "report.md").exists()
        fake_job(sweep, "5", ["model/pooler=roi_pool", "seed=2"], metrics(0.25))  # ended while the lock was held
    writer.join(timeout=120)
    assert not writer.is_alive()
    summary = json.loads((sweep / "report.json").read_text())
    assert {v["variant"]: len(v["runs"]) for v in summary["variants"]} == {
        "model/pooler=roi_pool": 3,
        "model/pooler=roi_align": 2,
    }
    # Outside a sweep (one job of an experiment run alone, a DDP child process) there is nothing to report.
    (sweep / "report.md").unlink()
    config.hydra.mode = "RunMode.RUN"
    AblationReportCallback(["model/pooler"], "T").on_job_end(config, done)
    assert not (sweep / "report.md").exists()
    # A job's other SLURM tasks (srun starts each in the sweep's job) leave it to the first.
    config.hydra.mode = "RunMode.MULTIRUN"
    monkeypatch.setenv("SLURM_PROCID", "1")
    AblationReportCallback(["model/pooler"], "T").on_job_end(config, done)
    assert not (sweep / "report.md").exists()
