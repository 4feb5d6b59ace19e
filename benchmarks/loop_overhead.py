"""Host time per training step of run.py's loop around the model: what no kernel change removes.

On a GPU a small model on small images (issue 22's goal 3: ``python run.py trainer=gpu`` on the shapes at 30 steps/s,
33 ms a step) is bound by the host, and part of each step's host time is the loop's own: Lightning's bookkeeping, the
module's ``self.log`` calls, the callbacks, the progress bar, the loggers, the host checks of the targets. This script
builds what run.py builds (``mrcnn.engine.build.build``: every callback of the config, the CSV logger, the progress bar)
and replaces the model's forward by one that returns the five losses of a single weight, so the model costs almost
nothing and what is timed is the loop (with the optimizer's step over the model's parameters, one of which has a
gradient: on a GPU torch's SGD makes that a few foreach kernels). The batches are made once, before the timing, and
served from the host (in a GPU run the loader's workers make them), still passing through the module's host checks of
their targets.

A step is timed from the end of one training batch to the end of the next (``on_train_batch_end``, after every other
callback); the number is the median over ``--steps`` steps after ``--warmup`` ones, per round. ``--log-every-step``
also times the loop as it was before the module and the throughput callback logged on the loggers' steps only
(``mrcnn.engine.loggers.writes_train_metrics``): every step calls ``self.log`` eight times. Rounds alternate the two.

    python benchmarks/loop_overhead.py --steps 300 --rounds 3 --log-every-step --out loop_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import tempfile
import time
import warnings
from unittest import mock

import lightning as L
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

import mrcnn.config
import mrcnn.engine.loggers
from mrcnn.engine.build import build
from mrcnn.modeling.mask_rcnn import LOSS_KEYS


class PreparedBatches(L.LightningDataModule):
    """Serves batches made before the timing, in order, on the host. It states its per-device ``batch_size`` (which
    ``MaskRCNNModule`` scales its learning rate by) and leaves ``on_before_batch_transfer`` to the module, whose host
    checks of the targets run at every step, as in run.py."""

    def __init__(self, batches: list, batch_size: int):
        super().__init__()
        self.batches, self.batch_size = batches, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, collate_fn=lambda batch: batch)


class StepEnds(L.Callback):
    """Records the wall time at the end of every training batch (appended last: after the other callbacks' hooks)."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())


def stub_forward(model: torch.nn.Module):
    """A forward for ``model`` that returns no detections and the five losses of one of its weights (so backward and
    the optimizer run, on one tensor): the loop around the model, without the model."""
    weight = next(p for p in model.parameters() if p.requires_grad)

    def forward(images, targets=None, targets_checked=False):
        value = weight.view(-1)[0] * 0.0 + 1.0
        return [], {key: value * (i + 1) for i, key in enumerate(LOSS_KEYS)}

    return forward


def make_batches(overrides: list[str], count: int) -> tuple[list, int]:
    """``count`` training batches of the configured data (host tensors, epoch after epoch), and the per-device batch
    size."""
    cfg = mrcnn.config.compose_config(overrides, run_dir="/tmp/mrcnn-loop-overhead")  # nothing is written there
    datamodule = instantiate(cfg.data.datamodule)
    datamodule.setup("fit")
    batches = []
    while len(batches) < count:  # as many epochs of the loader as it takes
        batches.extend(itertools.islice(datamodule.train_dataloader(), count - len(batches)))
    return batches, datamodule.batch_size


def time_loop(overrides: list[str], batches: list, batch_size: int, warmup: int, log_every_step: bool) -> float:
    """Median seconds per step of run.py's loop with the stub model over ``batches`` (the first ``warmup`` dropped)."""
    ends = StepEnds()
    # The loop before the module and the throughput logged on the loggers' steps only.
    every_step = mock.patch.object(mrcnn.engine.loggers, "writes_train_metrics", lambda trainer: True)
    # The run's folder (its CSV log and last.ckpt) goes when the round is timed.
    with (
        tempfile.TemporaryDirectory(prefix="loop-overhead-") as run_dir,
        every_step if log_every_step else contextlib.nullcontext(),
    ):
        cfg = mrcnn.config.compose_config(
            [*overrides, f"trainer.max_steps={len(batches)}", "trainer.max_epochs=-1", "trainer.limit_val_batches=0"],
            run_dir=run_dir,
        )
        _, module, trainer = build(cfg)
        module.model.forward = stub_forward(module.model)
        trainer.callbacks.append(ends)
        with warnings.catch_warnings():  # validation is off on purpose
            warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
            trainer.fit(module, datamodule=PreparedBatches(batches, batch_size))
    gaps = [b - a for a, b in zip(ends.times, ends.times[1:])]
    # The last step also saves last.ckpt (LastCheckpoint, at max_steps): left out with the warmup.
    return statistics.median(gaps[warmup:-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="Hydra overrides, space-separated (default: run.py's defaults)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=20, help="steps before them, not timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-every-step", action="store_true", help="also time every step logging (the old loop)")
    parser.add_argument("--out", default=None, help="write the numbers to this json file")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.warmup < 0:
        parser.error("--steps must be at least 2 and --warmup at least 0")

    overrides = args.config.split()
    batches, batch_size = make_batches(overrides, args.warmup + args.steps + 1)
    variants = ["now", "log_every_step"] if args.log_every_step else ["now"]
    medians: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            medians[variant].append(time_loop(overrides, batches, batch_size, args.warmup, variant == "log_every_step"))
    for variant, values in medians.items():
        print(f"{variant}: {', '.join(f'{1e3 * v:.2f}' for v in values)} ms a step (median per round)", flush=True)
    results = {
        "config": args.config,
        "batch_size": batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "median_step_ms_per_round": {v: [1e3 * s for s in values] for v, values in medians.items()},
    }
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
