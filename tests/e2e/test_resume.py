"""A training run killed mid-epoch (SIGKILL) resumes from its last checkpoint and finishes as planned.

The resumed run goes on with the same global step, optimizer, lr schedule and data order: the batches
after the resume are those the uninterrupted run saw at the same steps.
"""

import csv
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.data import _set_sampler_epoch

from mrcnn.callbacks import LastCheckpoint
from mrcnn.data.datamodule import InstanceDataModule
from mrcnn.checkpoints import checkpoint_path
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.data import IdsDataset

ROOT = Path(__file__).resolve().parents[2]
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


def recording_overrides(tmp_path: Path, path: Path) -> list[str]:
    """Overrides that run the default callbacks plus :class:`RecordTrainBatches` writing to ``path``."""
    return [
        "+callbacks.record_batches._target_=tests.helpers.runs.RecordTrainBatches",
        f"+callbacks.record_batches.path={path}",
    ]


def read_records(path: Path) -> list[tuple[int, list[int]]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


def planned_batches(overrides: list[str]) -> list[list[int]]:
    """Image ids of every training batch of an uninterrupted run, by global step (what its loader serves)."""
    cfg = compose_config(overrides)
    datamodule = instantiate(cfg.data.datamodule)
    datamodule.seed = cfg.seed  # what seed_everything(cfg.seed) gives the run
    loader = datamodule.train_dataloader()
    batches = []
    for epoch in range(cfg.trainer.max_epochs):
        _set_sampler_epoch(loader, epoch)  # as Lightning does at each epoch start
        batches += [[int(t["image_id"]) for t in targets] for _, targets in loader]
    return batches


def test_killed_run_resumes_mid_epoch_with_the_same_step_optimizer_schedule_and_data_order(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    records = tmp_path / "batches.jsonl"
    command = [sys.executable, "run.py", *ARGS, *recording_overrides(tmp_path, records), f"hydra.run.dir={run_dir}"]
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
    killed = torch.load(last, map_location="cpu", weights_only=False)
    killed_at = killed["global_step"]
    assert 0 < killed_at < STEPS_PER_EPOCH * EPOCHS and killed_at % STEPS_PER_EPOCH != 0
    # The checkpoint holds the training loader's position: the epoch and the batches taken from it (in the
    # fit loop's state, and in the datamodule's, which gets it to the loader despite Lightning issue 20550).
    position = {"epoch": killed_at // STEPS_PER_EPOCH, "batches": killed_at % STEPS_PER_EPOCH, "seed": 0}
    assert killed["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [position]
    assert killed["InstanceDataModule"] == {"train_loader": position}
    killed_records = read_records(records)

    result = subprocess.run([*command, f"resume={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Restored all states from the checkpoint" in output
    assert "dataloader is not resumable" not in output

    # Both runs served the planned order of an uninterrupted run: the killed one up to its end, the
    # resumed one from the checkpoint's step on (not the first batches of the epoch again).
    planned = planned_batches(ARGS)
    assert killed_records == [(step, planned[step]) for step in range(len(killed_records))]
    assert len(killed_records) >= killed_at
    resumed_records = read_records(records)[len(killed_records) :]
    assert resumed_records == [(step, planned[step]) for step in range(killed_at, len(planned))]

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


# ---- the same with a Trainer in this process: every kind of training loader, epoch 1 ------------


class _Interrupt(Exception):
    pass


class _RecordingModule(L.LightningModule):
    """Records the image ids of every training batch by global step; raises at global step ``stop_at``.

    With ``schedule`` its lr schedule reads ``trainer.estimated_stepping_batches`` (as the project's
    does), which makes Lightning build the training loader before it restores the checkpoint's loops.
    """

    def __init__(self, stop_at=None, schedule=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.stop_at = stop_at
        self.schedule = schedule
        self.seen = {}

    def training_step(self, batch, batch_idx):
        if self.global_step == self.stop_at:
            raise _Interrupt
        self.seen[self.global_step] = [t["image_id"] for t in batch[1]]
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if not self.schedule:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit(folder, module, grouping, num_workers, ckpt_path=None):
    """2 epochs of 6 batches of 2 images, last.ckpt every 4 steps and at epoch ends."""
    datamodule = InstanceDataModule(IdsDataset(12), IdsDataset(2), batch_size=2, num_workers=num_workers,
                                    aspect_ratio_grouping=grouping, seed=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[LastCheckpoint(folder, every_n_train_steps=4)])
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize(
    "grouping,num_workers,stop_at,schedule",
    [(False, 0, 9, False), (False, 2, 9, False), (True, 0, 9, False), (True, 2, 9, False), (False, 2, 7, False),
     (False, 0, 9, True), (True, 2, 9, True)],
    ids=["plain", "plain-workers", "grouped", "grouped-workers", "epoch-end-workers", "plain-schedule",
         "grouped-workers-schedule"],
)
def test_resumed_fit_sees_the_batches_the_uninterrupted_fit_saw(tmp_path, grouping, num_workers, stop_at, schedule):
    expected = _fit(tmp_path / "uninterrupted", _RecordingModule(schedule=schedule), grouping, num_workers=0)
    assert sorted(expected) == list(range(12)) and expected[0] != expected[6]

    interrupted = _RecordingModule(stop_at, schedule)
    with pytest.raises(_Interrupt):
        _fit(tmp_path / "run", interrupted, grouping, num_workers)
    assert interrupted.seen == {step: expected[step] for step in range(stop_at)}
    last = tmp_path / "run" / "last.ckpt"
    # stop_at 9: saved at step 8, mid-epoch 1 (batch 2 of 6); stop_at 7: saved at the end of epoch 0.
    saved_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert saved_at == stop_at - 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit(tmp_path / "run", _RecordingModule(schedule=schedule), grouping, num_workers, ckpt_path=last)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert resumed == {step: ids for step, ids in expected.items() if step >= saved_at}


# Lightning's ddp strategy re-runs this script (sys.argv) for rank 1: one fit per process.
DDP_SCRIPT = """
import json, os, sys
import lightning as L
sys.path.insert(0, {root!r})
from mrcnn.callbacks import LastCheckpoint
from mrcnn.data.datamodule import InstanceDataModule
from tests.helpers.data import IdsDataset
from tests.e2e.test_resume import _RecordingModule

folder, ckpt_path = sys.argv[1], sys.argv[2] or None
module = _RecordingModule(stop_at=int(sys.argv[3]) or None, schedule=True)
datamodule = InstanceDataModule(IdsDataset(26), IdsDataset(2), batch_size=2, num_workers={num_workers},
                                aspect_ratio_grouping={grouping}, seed=3)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, max_epochs=2,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, limit_val_batches=0,
                    callbacks=[LastCheckpoint(folder, every_n_train_steps=4)])
try:
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
finally:
    # Written whole, for the test to read: rank 0's process does not wait for rank 1's.
    path = f"{{folder}}/rank{{trainer.global_rank}}.json"
    with open(path + ".part", "w") as file:
        json.dump(module.seen, file)
    os.replace(path + ".part", path)
"""


@pytest.mark.parametrize("grouping,num_workers", [(False, 2), (True, 0)], ids=["plain-workers", "grouped"])
def test_resumed_ddp_fit_continues_each_ranks_shard(tmp_path, grouping, num_workers):
    script = tmp_path / "fit.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), grouping=grouping, num_workers=num_workers))

    def fit(folder, ckpt_path="", stop_at=0):
        folder.mkdir(exist_ok=True)
        paths = [folder / f"rank{rank}.json" for rank in range(2)]
        for path in paths:
            path.unlink(missing_ok=True)
        subprocess.run([sys.executable, str(script), str(folder), str(ckpt_path), str(stop_at)], cwd=tmp_path,
                       capture_output=True, timeout=300)
        deadline = time.monotonic() + 60
        while not all(path.exists() for path in paths) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [{int(step): ids for step, ids in json.loads(path.read_text()).items()} for path in paths]

    expected = fit(tmp_path / "uninterrupted")
    assert expected[0] != expected[1] and sorted(expected[0]) == sorted(expected[1]) == list(range(len(expected[0])))
    # Interrupted on both ranks at step 9: resumes from last.ckpt of step 8, in epoch 1.
    interrupted = fit(tmp_path / "run", stop_at=9)
    assert interrupted == [{step: ids[step] for step in range(9)} for ids in expected]
    resumed = fit(tmp_path / "run", ckpt_path=tmp_path / "run" / "last.ckpt")
    assert resumed == [{step: seen for step, seen in ids.items() if step >= 8} for ids in expected]


def test_resume_needs_a_run_folder_with_a_last_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints/last.ckpt"):
        checkpoint_path(compose_config([f"resume={tmp_path}"]))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    assert checkpoint_path(compose_config([f"resume={tmp_path}"])) == str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="not both"):
        checkpoint_path(compose_config([f"resume={tmp_path}", "ckpt_path=x.ckpt"]))
