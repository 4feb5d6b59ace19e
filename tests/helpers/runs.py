"""Running ``run.py`` as a user would, at a tiny setting, and recording what a training run saw."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L

from tests.helpers.config import ROOT, TINY_MODEL

# One short epoch of the tiny model, validated at its end, every step logged; tests add the data sizes.
TINY_RUN = [
    *TINY_MODEL,
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
]


def run_py(args, cwd=ROOT, env=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    """Runs ``python run.py *args`` in ``cwd``; with ``check``, fails the test (with the output's tail) on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


class RecordTrainBatches(L.Callback):
    """Test-only: appends ``[global step, image ids]`` of every training batch to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _, targets = batch
        with self.path.open("a") as file:
            file.write(json.dumps([trainer.global_step, [int(t["image_id"]) for t in targets]]) + "\n")
