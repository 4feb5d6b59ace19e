"""A training run killed mid-epoch (SIGKILL) resumes from its last checkpoint and finishes as planned."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mrcnn.train import checkpoint_path
from tests.conftest import TINY_MODEL, compose_config

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 6  # 12 images, 2 per batch
EPOCHS = 2
ARGS = [
    *TINY_MODEL,
    "data.num_train_images=12",
    "data.num_val_images=2",
    "data.datamodule.batch_size=2",
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.check_val_every_n_epoch={EPOCHS}",
    "trainer.log_every_n_steps=1",
    "checkpoint_every_n_steps=4",
]


def test_killed_run_resumes_mid_epoch_with_the_same_step_optimizer_and_schedule(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    command = [sys.executable, "run.py", *ARGS, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill it as soon as the first step checkpoint (step 4, mid-epoch) is on disk.
        deadline = time.monotonic() + 240
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_at < STEPS_PER_EPOCH * EPOCHS and killed_at % STEPS_PER_EPOCH != 0

    result = subprocess.run([*command, f"resume={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restored all states from the checkpoint" in result.stdout + result.stderr

    total = STEPS_PER_EPOCH * EPOCHS
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == total
    assert checkpoint["epoch"] == EPOCHS - 1
    # The lr schedule went on from the killed run's step and SGD kept its momentum buffers.
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == total
    assert checkpoint["optimizer_states"][0]["state"] and "momentum_buffer" in checkpoint["optimizer_states"][0]["state"][0]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == total
    # The resumed run logged from the checkpoint's step on, never from step 0 again.
    steps = [int(row["step"]) for row in csv.DictReader(open(run_dir / "csv" / "metrics.csv")) if row.get("train/loss")]
    assert min(steps) >= killed_at and max(steps) == total - 1
    assert list((run_dir / "checkpoints").glob("epoch*.ckpt"))  # the best checkpoint by mask AP


def test_resume_needs_a_run_folder_with_a_last_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints/last.ckpt"):
        checkpoint_path(compose_config([f"resume={tmp_path}"]))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    assert checkpoint_path(compose_config([f"resume={tmp_path}"])) == str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="not both"):
        checkpoint_path(compose_config([f"resume={tmp_path}", "ckpt_path=x.ckpt"]))
