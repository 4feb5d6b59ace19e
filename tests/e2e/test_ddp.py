"""DDP on CPU processes (trainer=ddp_cpu): a Hydra sweep runs each job once; evaluation matches one process; a
failure in the main process leaves no process waiting for it."""

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from mrcnn.data.datamodule import dataset_image_sizes
from mrcnn.data.samplers import GroupedBatchSampler, epoch_order, orientation_groups
from mrcnn.engine.build import build_module, check_sync_batchnorm
from mrcnn.engine.callbacks import RANDOM_STATE_KEY
from mrcnn.engine.launch import DDP_JOB_DIR_ENV
from mrcnn.engine.predict import predict
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.data import coco_format_overrides, make_coco_split
from tests.helpers.runs import TINY_RUN, run_py, training_only_trainer
from tests.helpers.wandb import read_wandb_records

TINY = [*TINY_RUN, "data.num_train_images=8", "data.datamodule.batch_size=2"]


# Slow (about 35 s): the only run of `run.py -m` under DDP, and of the real model training under DDP through run.py.
# The default suite checks its parts: a DDP child pinned to its job and the variables a job restores
# (tests/test_launch.py), DDP through run.py (the evaluation test below), a DDP fit and resume (tests/e2e/test_resume.py).
@pytest.mark.slow
def test_sweep_with_ddp_runs_each_job_once_with_two_processes(tmp_path):
    # Lightning's ddp re-runs sys.argv in its children: unless pinned to their job, they re-run the sweep.
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    run_py(
        [
            "-m",
            "base_lr=0.01,0.02",
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "data.num_val_images=3",
            *TINY,
            "logger=wandb",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.sweep.subdir=job${hydra.job.num}",
        ],
        cwd=tmp_path,
        env=env,
    )

    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["job0", "job1"]
    for job, lr in zip(jobs, ("0.01", "0.02")):
        metrics = json.loads((job / "metrics.json").read_text())
        # 8 images, 2 per batch, split over 2 processes: 2 optimizer steps.
        assert metrics["world_size"] == 2 and metrics["global_step"] == 2
        assert "segm_AP" in metrics and "bbox_AP" in metrics
        assert (job / "csv" / "metrics.csv").exists() and (job / "checkpoints" / "last.ckpt").exists()
        # The checkpoint holds each process's random states, gathered from both (a resume restores each its own).
        checkpoint = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert len(checkpoint[RANDOM_STATE_KEY]) == 2
        assert f"base_lr: {lr}" in (job / ".hydra" / "resolved.yaml").read_text()
        # Each process of the job ran once, with this job's config (its run_dir is this folder).
        assert [p.name for p in job.glob("ddp_rank*.log")] == ["ddp_rank1.log"]
        assert (job / "run.log").read_text().count(f"process 0 of 2 done at global step 2 in {job}") == 1
        assert (job / "ddp_rank1.log").read_text().count(f"process 1 of 2 done at global step 2 in {job}") == 1
        # One W&B run per job (rank zero's), grouped by the sweep, named after the job's variant.
        [wandb_log] = (job / "wandb").glob("offline-run-*/*.wandb")
        [record] = [r.run for r in read_wandb_records(wandb_log) if r.WhichOneof("record_type") == "run"]
        assert record.run_group == str(tmp_path / "sweep") and record.display_name.startswith(f"base_lr={lr},")

    # Job 0 continued for another epoch in a new folder, with two processes: the first writes the continued
    # csv/metrics.csv before Lightning starts the second, whose check of the folder must not take it for another
    # run's (tests/test_run_dir.py).
    resumed = tmp_path / "resumed"
    overrides = ["base_lr=0.01", "trainer=ddp_cpu", "trainer.devices=2", "data.num_val_images=3", *TINY]
    run_py([*overrides, "trainer.max_epochs=2", f"resume={jobs[0]}", f"hydra.run.dir={resumed}"], cwd=tmp_path)
    assert json.loads((resumed / "metrics.json").read_text())["global_step"] == 4


# 5 images over 2 processes: the DistributedSampler repeats one image to fill the last batch.
ODD = [*TINY, "data.num_val_images=5", "++data.datamodule.val_batch_size=1", "model.box_score_thresh=0.0"]


def _trained_checkpoint(tmp_path):
    """A checkpoint of the tiny model after 4 steps (``ODD``), the module and its datamodule."""
    cfg = compose_config(ODD, run_dir=str(tmp_path))
    L.seed_everything(0)
    module, datamodule = instantiate(cfg.module), instantiate(cfg.data.datamodule)
    trainer = training_only_trainer(max_steps=4)
    trainer.fit(module, datamodule=datamodule)
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint, module, datamodule


def test_ddp_evaluation_matches_one_process_on_an_odd_number_of_images(tmp_path):
    checkpoint, module, datamodule = _trained_checkpoint(tmp_path)
    # One process, here; then two, through run.py.
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
        module, datamodule=datamodule, verbose=False
    )
    one = dict(module.last_metrics)

    result = run_py(
        [
            "mode=evaluate",
            f"ckpt_path={checkpoint}",
            *ODD,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            f"hydra.run.dir={tmp_path / 'two'}",
        ],
        cwd=tmp_path,
        # Each process with this one's threads: Lightning would give each half the machine's cores, and a score's
        # last bits (here, ties at box_score_thresh=0) can differ with the thread count on another machine.
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    # The second process logs to its file; on the console only the first speaks (each would say the same).
    assert "GLOBAL_RANK: 1" in (tmp_path / "two" / "ddp_rank1.log").read_text()
    assert "GLOBAL_RANK: 0" in result.stdout and "GLOBAL_RANK: 1" not in result.stdout + result.stderr
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two.pop("world_size") == 2 and two.pop("global_step") == 4  # the checkpoint's, not validate's 0
    assert one == two
    assert max(one["bbox_AP50"], one["segm_AP50"]) > 0, one  # the numbers compared are not all zero


# Slow (about 14 s): the only DDP prediction through run.py. The default suite checks DDP through run.py (the
# evaluation test above) and prediction through run.py in one process (tests/e2e/test_predict.py).
@pytest.mark.slow
def test_ddp_prediction_writes_each_image_once_as_one_process_does(tmp_path):
    checkpoint, _, datamodule = _trained_checkpoint(tmp_path)
    # Prediction on the same 5 images: each process predicts its own, none twice; the json is one process's.
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        pixels = (datamodule.val_dataset[i][0] * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    predict_args = [
        f"ckpt_path={checkpoint}",
        *ODD,
        "mode=predict",
        f"predict.input={images}",
        "predict.score_threshold=0.0",
    ]
    predict(compose_config([*predict_args, f"predict.output={tmp_path / 'one_pred'}"], run_dir=str(tmp_path / "p1")))
    run_py(
        [
            *predict_args,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            # A loader worker each, started from a fork server (mrcnn.data.datamodule.worker_context), which imports
            # run.py: it must be import-safe.
            "predict.num_workers=1",
            f"hydra.run.dir={tmp_path / 'p2'}",
            f"predict.output={tmp_path / 'two_pred'}",
        ],
        cwd=tmp_path,
    )
    one_pred = json.loads((tmp_path / "one_pred" / "coco_results.json").read_text())
    two_pred = json.loads((tmp_path / "two_pred" / "coco_results.json").read_text())
    assert {r["image_id"] for r in one_pred} == {1, 2, 3, 4, 5} and len(two_pred) == len(one_pred)
    for a, b in zip(one_pred, two_pred):  # the same detections (to the last bits: the processes' thread counts differ)
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert b["score"] == pytest.approx(a["score"], rel=1e-4) and b["bbox"] == pytest.approx(a["bbox"], abs=1e-3)
    assert sorted(p.name for p in (tmp_path / "two_pred").glob("*.png.png")) == [f"{i}.png.png" for i in range(5)]


def test_sync_batchnorm_with_cpu_processes_is_a_clear_error():
    module = build_module(compose_config([*TINY_MODEL, "model.norm=syncbn", "model.head_norm=syncbn"]))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.model.roi_heads.mask_head.modules())
    # One process: SyncBatchNorm is plain BatchNorm. CPU processes under DDP: torch cannot synchronise it.
    check_sync_batchnorm(module, L.Trainer(accelerator="cpu", devices=1, logger=False))
    with pytest.raises(ValueError, match="needs CUDA devices"):
        check_sync_batchnorm(module, L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False))


def _job_processes(job_dir) -> list[int]:
    """The running processes that Lightning started for the job in ``job_dir`` (read from their environment)."""
    marker = f"{DDP_JOB_DIR_ENV}={job_dir}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # another user's process, or one that ended meanwhile
            continue
    return found


# Slow (about 22 s); the default suite stops a job's processes after a failure in process
# (tests/test_job_processes.py).
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes' environments from /proc")
def test_a_failure_in_the_main_process_stops_the_processes_waiting_for_it(tmp_path):
    # The main process's first training image is truncated: it fails reading it, while the other process waits for it
    # in a collective (over NCCL: until the process group's timeout).
    train_json, train_images = make_coco_split(tmp_path / "data", "train", seed=1)
    val_json, val_images = make_coco_split(tmp_path / "data", "val", seed=2)
    job = tmp_path / "job"
    data = [*coco_format_overrides(train_json, train_images, val_json, val_images), "data.min_size=64"]
    overrides = [*data, "data.max_size=160", "data.datamodule.batch_size=1", "model=tiny", "trainer.max_epochs=1"]
    # Found when read, in training: not by the header check at build (coco_format's check_sizes), in every process.
    overrides.append("data.datamodule.train_dataset.check_sizes=false")
    # Rank 0's first batch, as the datamodule's sampler deals them (seed 0, one image a batch, two ranks).
    dataset = instantiate(compose_config(overrides).data.datamodule).train_dataset
    order = epoch_order(len(dataset), seed=0)
    [[first], *_] = GroupedBatchSampler(order, orientation_groups(dataset_image_sizes(dataset)), 1, 2, rank=0)
    broken = train_images / dataset.record(first)[0]["file_name"]
    broken.write_bytes(broken.read_bytes()[:300])
    result = run_py(
        [*overrides, "trainer=ddp_cpu", "trainer.devices=2", f"hydra.run.dir={job}"], cwd=tmp_path, check=False
    )

    left = _job_processes(job)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert f"cannot read image {broken}" in log
    assert not left, "the job's other process outlived it"
    # Stopped by the main process, not left to fail on the main process's closed sockets.
    assert "stopped the DDP process of local rank 1" in log and "Connection closed by peer" not in log
