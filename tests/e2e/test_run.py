"""`python run.py` end to end: trains, logs the five losses, validates, prints AP, checkpoints, evaluates."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import run_py

ROOT = Path(__file__).resolve().parents[2]


def test_run_py_debug_fast_trains_evaluates_and_resumes_evaluation(tmp_path):
    """``python run.py debug=fast`` (the README's first command): the whole loop, four steps, one validation batch."""
    result = run_py(["debug=fast", f"hydra.run.dir={tmp_path}"])
    assert "COCO-style AP on the validation split" in result.stdout
    assert any(line.startswith("mask ") for line in result.stdout.splitlines())
    # Each of Lightning's messages once, in the job's format (Lightning's own console handler printed them again),
    # and in the job's log file.
    for message in ("Seed set to 0", "GPU available: False", "`Trainer.fit` stopped: `max_steps=4` reached"):
        assert (result.stdout + result.stderr).count(message) == 1, message
        assert message in (tmp_path / "run.log").read_text()

    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    columns = set(rows[0])
    for loss in ("rpn_class_loss", "rpn_bbox_loss", "fastrcnn_class_loss", "fastrcnn_bbox_loss", "maskrcnn_mask_loss"):
        assert f"train/{loss}" in columns and f"val/{loss}" in columns
    for key in ("segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl", "bbox_AP", "bbox_AP50"):
        assert f"val/{key}" in columns
    assert "train/loss" in columns and "val/loss" in columns
    assert any(row["train/maskrcnn_mask_loss"] for row in rows)
    assert max(int(row["step"]) for row in rows if row["train/loss"]) == 3  # four training steps: 0..3
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    assert (tmp_path / "hparams.yaml").exists() or (tmp_path / "csv" / "hparams.yaml").exists()

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    # No model overrides: the checkpoint's model (debug=fast's tiny one) is built, not the default model=small.
    evaluation = tmp_path / "eval"
    data = [
        "data.image_size=64",
        "data.num_val_images=2",
        "data.datamodule.num_workers=0",
        "trainer.limit_val_batches=1",
    ]
    result = run_py(["mode=evaluate", f"ckpt_path={checkpoint}", *data, f"hydra.run.dir={evaluation}"])
    assert "COCO-style AP on the validation split" in result.stdout
    assert "the model is built from the config" in (evaluation / "run.log").read_text()
    assert "dirpath has changed" not in result.stderr  # the training run's checkpoint callbacks are not this run's
    trained, evaluated = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path, evaluation))
    assert evaluated == trained  # the same weights, model and validation images: the same numbers


def test_a_typo_fails_loudly_and_leaves_no_output_folder(tmp_path):
    # model.pooler=... (meaning model/pooler=...) makes Hydra suggest +model.pooler=..., which nothing reads.
    result = run_py(["+model.pooler=roi_pool"], cwd=tmp_path, check=False, timeout=120)
    assert result.returncode != 0
    assert "model/pooler is a config group; choose its option with model/pooler=roi_pool" in result.stderr
    # Failed before writing anything: no outputs/<date>/<time>/ left behind.
    assert not (tmp_path / "outputs").exists()
    # A run that wrote something keeps its folder, also when it fails afterwards.
    kept = tmp_path / "kept"
    (kept / "predictions").mkdir(parents=True)
    (kept / "predictions" / "a.jpg.png").write_bytes(b"an overlay")
    result = run_py(["+data.min_sise=64", f"hydra.run.dir={kept}"], cwd=tmp_path, check=False, timeout=120)
    assert result.returncode != 0 and (kept / "predictions" / "a.jpg.png").is_file() and (kept / ".hydra").is_dir()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model/pooler=roi_alignx"], "Could not find 'model/pooler/roi_alignx'"),
        (["+model.pooler=roi_pool"], "model/pooler is a config group; choose its option with model/pooler=roi_pool"),
        (
            ["+data.min_sise=64"],
            "nothing reads data.min_sise, so it would change nothing. Did you mean data.min_size=64",
        ),
        (["+data.train_json=t.json"], "data.train_json is a key of data=coco_format, not of data=shapes: choose it"),
        (
            # (The typo is made from the real name: tests/test_doc_names.py checks every name written out.)
            [
                "model.net.roi_heads.pooler._target_="
                + "mrcnn.modeling.poolers.RoIAlignPooler".replace("Pooler", "Poolr")
            ],
            "mrcnn/modeling/poolers.py defines no RoIAlignPoolr (did you mean mrcnn.modeling.poolers.RoIAlignPooler?)",
        ),
        (["model.pooler=roi_pool"], "model/pooler is a config group; choose its option with model/pooler=roi_pool"),
        (["data.datamodule.batch_size=-2"], "data.datamodule.batch_size=-2: must be a positive integer"),
        (["+trainer.max_step=3"], "+trainer.max_step=3: lightning.Trainer takes no argument max_step"),
        (
            ["data.min_size=${oc.env:MRCNN_TEST_UNSET}"],
            "data.min_size=${oc.env:MRCNN_TEST_UNSET}: cannot be resolved (KeyError raised while resolving",
        ),
        (["mode=evaluat"], "mode must be one of ['evaluate', 'predict', 'train'], got 'evaluat'"),
        (
            ["hydra/launcher=slurm"],
            "hydra/launcher=slurm launches the jobs of a sweep, and this command is a single run, which Hydra runs "
            "here, on this machine: add -m to submit it",
        ),
        (["data=coco", "data.root=/no/such/folder"], "data.root=/no/such/folder: no such folder"),
        (["ckpt_path=/no/such/last.ckpt"], "ckpt_path file not found: /no/such/last.ckpt"),
        (["resume=/no/such/run"], "resume=/no/such/run: there is no /no/such/run/checkpoints/last.ckpt"),
        (
            [f"resume={ROOT / 'run.py'}"],
            f"this is a file: to start from a checkpoint, use ckpt_path={ROOT / 'run.py'}.",
        ),
        (["mode=evaluate"], "mode=evaluate needs ckpt_path=<Lightning checkpoint>, resume=<run dir> or weights="),
        (["mode=predict", "weights=/no/such/weights.pth"], "weights=/no/such/weights.pth: no such file"),
        (["mode=predict", f"ckpt_path={ROOT / 'run.py'}"], "mode=predict needs predict.input=<image file or folder>"),
        (
            ["mode=predict", f"ckpt_path={ROOT / 'run.py'}", "predict.input=/no/such/images"],
            "predict.input=/no/such/images is neither an image file nor a folder",
        ),
        (
            ["mode=predict", f"ckpt_path={ROOT / 'run.py'}", f"predict.input={ROOT}", "predict.coco_json=/no/val.json"],
            "predict.coco_json file not found: /no/val.json",
        ),
        (
            ["mode=predict", f"ckpt_path={ROOT / 'run.py'}", f"predict.input={ROOT}", f"predict.output={ROOT}/."],
            f"predict.output={ROOT}/. is the input folder: write the predictions to another folder",
        ),
    ],
    ids=[
        "unknown_option",
        "added_key",
        "added_key_mistyped",
        "added_key_of_another_data_option",
        "target_mistyped",
        "dotted_group",
        "bad_value",
        "argument_not_taken",
        "unresolvable_value",
        "unknown_mode",
        "cluster_launcher_without_a_sweep",
        "missing_data",
        "missing_checkpoint",
        "missing_run",
        "resume_of_a_file",
        "evaluate_without_checkpoint",
        "missing_weights",
        "predict_without_input",
        "missing_predict_input",
        "missing_predict_json",
        "predict_into_its_input",
    ],
)
def test_a_config_mistake_is_answered_before_torch_loads(tmp_path, overrides, message):
    # Loading torch and Lightning takes seconds; a mistyped command should not wait for them.
    run_dir = tmp_path / "run"
    result = run_before_torch(tmp_path, [*overrides, f"hydra.run.dir={run_dir}"])
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]  # the message alone
    assert "torch loaded: False" in result.stdout, result.stdout
    assert not run_dir.exists()  # and it left no output folder


def test_a_mistake_in_a_folder_that_holds_a_record_leaves_the_folder_as_it_was(tmp_path):
    # A folder a killed start left with its record only (a job script's fixed hydra.run.dir): Hydra rewrites the
    # record before the job starts; the job that stops at a typo puts it back, and does not take the folder away.
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 7\n")
    result = run_before_torch(tmp_path, ["data.min_size=-5", f"hydra.run.dir={run_dir}"])
    assert result.returncode != 0 and "data.min_size=-5: must be a positive integer" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [p.name for p in (run_dir / ".hydra").iterdir()] == ["config.yaml"]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "seed: 7\n"


def test_a_sweep_with_a_mistake_in_one_job_stops_before_its_first_job(tmp_path):
    # Jobs 0 and 1 are fine: without the check at the sweep's start, both would train before job 2 failed.
    sweep = tmp_path / "sweep"
    # (The jobs are named as the command wrote them: Hydra's sweeper escapes the interpolation's characters.)
    command = ["-m", "data.min_size=64,-5", "seed=0,1", "logger.csv.name=run_${seed}", f"hydra.sweep.dir={sweep}"]
    result = run_before_torch(tmp_path, command)
    assert result.returncode != 0, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        "2 of the sweep's 4 jobs would fail, so none was started:",
        "  #2 data.min_size=-5 seed=0 logger.csv.name=run_${seed}, #3 data.min_size=-5 seed=1 logger.csv.name=run_${seed}:",
        "    ValueError: invalid config values:",
        "      data.min_size=-5: must be a positive integer or a non-empty list of them",
    ]
    assert "torch loaded: False" in result.stdout and not sweep.exists()
    # The same for a mistake every job shares, in a sweep an experiment sets.
    result = run_before_torch(
        tmp_path, ["experiment=ablation_mask_loss", "+data.min_sise=64", f"hydra.sweep.dir={sweep}"]
    )
    assert result.returncode != 0 and "  every job:\n    ValueError: +data.min_sise=64: nothing reads" in result.stderr
    assert "torch loaded: False" in result.stdout and not sweep.exists()
    # An option that does not exist: Hydra's message, under the job it stops (Hydra alone named no job, and left
    # the sweep's folder behind).
    result = run_before_torch(tmp_path, ["-m", "model/pooler=roi_align,roi_poool", f"hydra.sweep.dir={sweep}"])
    assert result.returncode != 0 and "1 of the sweep's 2 jobs would fail" in result.stderr, result.stderr[-2000:]
    assert "  #1 model/pooler=roi_poool:\n    MissingConfigException: " in result.stderr
    assert "Could not find 'model/pooler/roi_poool'" in result.stderr and "Config search path" not in result.stderr
    assert "torch loaded: False" in result.stdout and not sweep.exists()


def test_a_folder_that_holds_a_run_is_refused_before_hydra_writes_there(tmp_path):
    # The resume command without its resume=: Lightning would write over the run's checkpoints and CSV log.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"a run's weights")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    result = run_before_torch(tmp_path, ["seed=1", f"hydra.run.dir={run_dir}"])
    assert result.returncode != 0 and "holds another run's output (checkpoints/last.ckpt)" in result.stderr
    assert f"resume={run_dir} hydra.run.dir={run_dir}" in result.stderr and "torch loaded: False" in result.stdout
    assert sorted(p.name for p in run_dir.rglob("*")) == [".hydra", "checkpoints", "last.ckpt", "overrides.yaml"]
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == "- seed=0\n"
    # A sweep (an experiment sweeps) into a folder that holds a run's jobs; a command that only prints goes on.
    result = run_before_torch(tmp_path, ["experiment=ablation_mask_loss", f"hydra.sweep.dir={tmp_path}"])
    assert result.returncode != 0 and f"hydra.sweep.dir={tmp_path} holds runs' output" in result.stderr
    assert "torch loaded: False" in result.stdout and not (tmp_path / "multirun.yaml").exists()
    result = run_before_torch(tmp_path, ["--cfg", "job", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0 and "seed: 0" in result.stdout, result.stderr[-2000:]


def run_before_torch(tmp_path, args: list[str]) -> subprocess.CompletedProcess:
    """``python run.py <args>`` in a process that reports, when it exits, whether torch was imported."""
    check = (
        "import runpy, sys\n"
        "try:\n"
        f"    sys.argv = ['run.py', *{args!r}]\n"
        f"    runpy.run_path({str(ROOT / 'run.py')!r}, run_name='__main__')\n"
        "finally:\n"
        "    print('torch loaded:', 'torch' in sys.modules)\n"
    )
    return subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_a_mistake_found_once_the_run_has_started_is_said_without_a_traceback(tmp_path):
    # A training set smaller than one batch is known once the data is built, after the config checks: the message
    # names what to change, and a traceback through Lightning's hooks would say nothing more.
    run_dir = tmp_path / "run"
    args = ["model=tiny", "data.num_train_images=4", "data.num_val_images=2", f"hydra.run.dir={run_dir}"]
    result = run_py(args, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert (
        "CommandError: the training set has 4 image(s), fewer than one batch (data.datamodule.batch_size=8)"
        in result.stderr
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not run_dir.exists()  # found before the loop started: no folder of a run that never ran


def test_a_run_that_fails_once_training_started_keeps_its_folder_and_its_log_says_why(tmp_path):
    # A loss that goes non-finite in the first steps, before the loggers' first write: the folder holds Hydra's record
    # and the log alone, which the user needs most then. (One that fails before its loop leaves no folder: above.)
    run_dir = tmp_path / "run"
    args = [
        "model=tiny",
        "data.num_train_images=16",
        "data.num_val_images=2",
        "data.image_size=64",
        "data.datamodule.num_workers=0",
        "base_lr=1e12",
        "scheduler.warmup_steps=0",
        "trainer.max_steps=8",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_py(args, cwd=tmp_path, check=False)
    assert result.returncode != 0 and "FloatingPointError: non-finite loss at step" in result.stderr, result.stderr
    assert "use model.norm=gn when training from scratch" in result.stderr  # the key, as the command line sets it
    log = (run_dir / "run.log").read_text()
    assert "Seed set to 0" in log
    assert "[mrcnn.engine.launch][ERROR] - failed: FloatingPointError: non-finite loss at step" in log, log
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_a_json_our_resolver_refuses_is_said_without_a_traceback(tmp_path):
    # data=coco_format reads the classes from the training json through an OmegaConf resolver, first resolved once
    # the job has started: its message names the json, not wrapped in OmegaConf's InterpolationResolutionError.
    from tests.helpers.data import make_coco_split

    train_json, train_images = make_coco_split(tmp_path / "mine", split="train")
    val_json, val_images = make_coco_split(tmp_path / "mine", split="val", seed=1)
    data = json.loads(train_json.read_text())
    data["categories"][1]["name"] = data["categories"][0]["name"]
    train_json.write_text(json.dumps(data))
    args = [
        "model=tiny",
        "data=coco_format",
        f"data.train_json={train_json}",
        f"data.train_images={train_images}",
        f"data.val_json={val_json}",
        f"data.val_images={val_images}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run_py(args, cwd=tmp_path, check=False)
    assert result.returncode != 0
    name = data["categories"][0]["name"]
    assert f"CommandError: COCO annotation file {train_json}: category name {name!r} appears twice" in result.stderr, (
        result.stderr[-3000:]
    )
    assert "Traceback" not in result.stderr and "InterpolationResolutionError" not in result.stderr, result.stderr[
        -3000:
    ]


def test_ctrl_c_while_the_run_starts_is_a_stop_without_a_traceback(tmp_path):
    # SIGINT once Hydra has made the run's folder (run.py then imports Lightning, builds the data and the model):
    # exit 130 with one line, where a KeyboardInterrupt came through Hydra as a traceback; no folder left.
    import signal
    import time

    from tests.helpers.config import ROOT

    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "run.log").is_file():  # Hydra's log: it calls run.py's main() next
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)  # into the imports of Lightning (seconds), before any save
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "stopped by SIGINT" in err + out and "Traceback" not in err + out, err[-3000:]
    assert not run_dir.exists()
