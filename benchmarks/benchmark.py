"""Speed and memory of our Mask R-CNN beside torchvision's ``maskrcnn_resnet50_fpn``, in one process.

Both systems run the same weights (torchvision's state dict loaded into ours with
``load_torchvision_weights``), the same pre-generated shapes batches, image size, optimizer and precision.
Measurements alternate (ours, torchvision, ours, ...) so that drift in the machine affects both alike;
each number is the median of ``--repeats`` rounds after ``--warmup`` discarded rounds.

* train: our ``MaskRCNNModule`` driven by a Lightning ``Trainer`` (a callback times each step) against a
  plain PyTorch loop over torchvision's model (SGD at ``--lr``, momentum 0.9, weight decay 1e-4, no lr
  schedule; the loop reads ``loss.item()`` like torchvision's reference script). A round is ``--steps`` steps.
* infer: eval-mode forward (mask pasting included: both do it in postprocess) at batch 1 (latency) and
  ``--infer-batch-size`` (throughput); "e2e" adds COCO-json encoding of the detections (masks > 0.5 to RLE):
  ``CocoEvaluator.update`` + ``results_json`` for ours, a plain pycocotools encoding for torchvision.
* eval: ``CocoEvaluator`` box+mask AP over ``--eval-images`` generated images' predictions, once per
  backend (pycocotools, faster_coco_eval): ``update`` (RLE encoding) and ``compute`` times.
* memory: per system, the peak increase over the start of one round (the last warm-up round; the first
  measured one with ``--warmup 0``): activations, gradients, optimizer state, not the weights. CPU: the
  resident set size high-water mark, reset through ``/proc/self/clear_refs`` after ``malloc_trim`` (where
  that is impossible: the process-wide ``ru_maxrss``, which only shows new highs). CUDA:
  ``torch.cuda.max_memory_allocated``.
* ``--cudnn-benchmark`` (cuDNN autotuning) applies to ours only in training, whose RoI buckets (``model.roi_buckets``)
  make its shapes repeat at a fixed image size. torchvision's training steps run without it: its mask head meets a
  new number of RoIs at almost every step, and autotuning every new shape made its step 4.7x slower on the H200
  (benchmarks/gpu/2026-12-04-h200/README.md), a handicap no user of it would choose. cuDNN's plan cache is one per
  process and not keyed by the flag: a convolution torchvision runs in the same shapes, strides and dtype as ours
  reuses the plan ours tuned (a bias towards torchvision; none with ``--torchvision-eager``, where the memory formats
  differ).
* losses: every system's training round starts from the same random state (:func:`round_seed`) on the same batches
  and weights, so where the sampling is torchvision's the first steps' losses differ only by arithmetic: each
  system's ``same_losses`` says by how much (issue #22's "with the same losses").

Usage::

    python benchmarks/benchmark.py --image-size 512 --batch-size 2 --steps 10 --repeats 5 --warmup 1
    python benchmarks/benchmark.py --device cuda --image-size 800 --image-width 1333 --batch-size 8 \\
        --precision bf16-mixed --channels-last --cudnn-benchmark --skip eval --out gpu.json

It prints a table (ours, torchvision, ours/torchvision) and writes every number, the raw times and the
hardware to ``--out`` (json). See benchmarks/README.md.
"""

import argparse
import collections
import contextlib
import ctypes
import json
import logging
import math
import os
import platform
import resource
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pycocotools.mask as mask_utils
import torch
import torchvision
from hydra.utils import instantiate
from torch.utils.data import DataLoader
from torchvision.models.detection import MaskRCNN as TorchvisionMaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d, masks_to_boxes

import mrcnn.config  # compose_config; registers the config resolvers
from mrcnn.data.datamodule import collate_detection
from mrcnn.data.shapes import ShapesDataset
from mrcnn.data.transforms import drop_crowd
from mrcnn.engine.quiet import silence_library_noise
from mrcnn.evaluation import BACKENDS, CocoEvaluator
from mrcnn.modeling import nms as nms_module
from mrcnn.modeling.mask_rcnn import check_targets, load_torchvision_weights

PHASES = ("train", "infer", "eval")


# ---- measuring ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory increase (MiB) between ``start()`` and ``stop()``; see the module docstring."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "rss_high_water_mark"
        except OSError:
            self.method = "process_ru_maxrss"  # cannot be reset: later phases only show new highs

    def _rss_peak(self) -> int:
        if self.method == "rss_high_water_mark":
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so it counts again when reused
        if self.method == "rss_high_water_mark":
            Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current RSS
            self.base = self._rss_peak()
        else:
            self.base = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stop(self) -> float:
        sync(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else self._rss_peak()
        return max(peak - self.base, 0) / 2**20


class StepTimer(L.Callback):
    """Times every training step of a Lightning fit; with ``memory``, also its peak memory (MiB)."""

    def __init__(self, device: torch.device, memory: PeakMemory | None = None):
        self.device = device
        self.memory = memory
        self.times: list[float] = []
        self.losses: list[float] = []
        self.peak_mib = 0.0

    def on_train_start(self, trainer, pl_module):
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]
        if self.memory is not None:
            self.memory.start()

    def on_train_end(self, trainer, pl_module):
        if self.memory is not None:
            self.peak_mib = self.memory.stop()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)
        # After the clock stops: the step's loss (the sum of the five), to compare with torchvision's.
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


class FixedBatches(L.LightningDataModule):
    """Serves one prepared DataLoader; ``batch_size`` is what ``MaskRCNNModule`` scales its lr by.

    Its batches are on the device already, their targets cleaned and checked on the host before the copy
    (:func:`host_checked`), as run.py's are. So this datamodule's ``on_before_batch_transfer`` passes them on
    unchanged: Lightning then calls it instead of ``MaskRCNNModule``'s, which would read the device tensors
    (``iscrowd.any()``, the degenerate-box check: two host waits per image) between the steps, inside the profiled
    window (Lightning runs a batch's transfer hooks before ``on_train_batch_start``), where run.py makes none.
    """

    def __init__(self, loader: DataLoader):
        super().__init__()
        self.loader = loader
        self.batch_size = loader.batch_size

    def train_dataloader(self) -> DataLoader:
        return self.loader

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return batch


def host_checked(samples: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    """``samples`` with their targets as ``MaskRCNNModule.on_before_batch_transfer`` makes them on the host in a
    run.py run: crowd regions dropped (``drop_crowd``) and checked (``check_targets``, which raises on a bad one)."""
    targets = [drop_crowd(target) for _, target in samples]
    check_targets(targets)
    return [(image, target) for (image, _), target in zip(samples, targets)]


# ---- building -----------------------------------------------------------------------------------


def compose_config(overrides: list[str]):
    """The project's Hydra config (``configs/train.yaml``) with ``overrides``, without Hydra's app."""
    return mrcnn.config.compose_config(overrides, run_dir="/tmp/mrcnn-benchmark")


def build_torchvision(cfg) -> torch.nn.Module:
    """torchvision's ``maskrcnn_resnet50_fpn`` as for fine-tuning (FrozenBatchNorm, 3 trainable stages),
    with the sizes and the proposal / detection counts of our composed config ``cfg``.

    (``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` would use BatchNorm and train all
    stages; the builder picks FrozenBatchNorm only with pretrained weights, so we assemble the same parts.)
    """
    m = cfg.model
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=m.trainable_layers
    )
    return TorchvisionMaskRCNN(
        backbone,
        num_classes=m.num_classes + 1,
        min_size=cfg.data.min_size,
        max_size=cfg.data.max_size,
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
        box_batch_size_per_image=m.rois_per_image,
        box_score_thresh=m.box_score_thresh,
        box_detections_per_img=m.detections_per_img,
    )


@torch.no_grad()
def stabilize_random_weights(model: torch.nn.Module, images: list[torch.Tensor]) -> None:
    """Makes a randomly initialised FrozenBatchNorm ResNet train without diverging, as a pretrained one would.

    Every FrozenBatchNorm2d gets its input's per-channel statistics on ``images`` (its defaults are the
    identity, and activations grow over 50 layers), and the last one of each residual block a zero scale
    (zero-init residual, Goyal et al. 2017). The work of a step is unchanged: every layer still runs.
    """

    def hook(module, args):
        module.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(args[0].var(dim=(0, 2, 3)))

    layers = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    for name, module in model.named_modules():
        if name.endswith(".bn3"):  # torchvision's Bottleneck: conv1-bn1, conv2-bn2, conv3-bn3, + identity
            module.weight.zero_()
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        model.backbone(model.transform(images)[0].tensors)
    finally:
        for handle in handles:
            handle.remove()


def to(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- what a step waits on and which shapes it sees ------------------------------------------------

# aten ops that make a CUDA step wait for the GPU before the host can go on: item() / bool() / tolist() of a
# device tensor (_local_scalar_dense), nonzero (also behind boolean-mask indexing), and ops whose output size
# depends on the data. On the CPU they are the same ops, so the count is the same without a GPU.
SYNC_OPS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::equal",
)
# What the CUDA runtime reports when the host waits (present only on a GPU).
CUDA_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


class HeadShapes:
    """Records the input shape of each system's box and mask head at every call (forward pre-hooks)."""

    def __init__(self, models: dict):
        self.shapes = {name: {"box_head": [], "mask_head": []} for name in models}
        self.handles = []
        for name, model in models.items():
            for head in ("box_head", "mask_head"):
                module = getattr(model.roi_heads, head, None)
                if module is not None:
                    record = self.shapes[name][head].append
                    self.handles.append(module.register_forward_pre_hook(lambda m, a, rec=record: rec(a[0].shape)))

    def summary(self) -> dict:
        """Per system and head: calls, distinct input shapes, and the distinct first dims (RoI counts)."""
        return {
            name: {
                head: {
                    "calls": len(seen),
                    "distinct_shapes": len(set(seen)),
                    "roi_counts": sorted({shape[0] for shape in seen}),
                }
                for head, seen in heads.items()
            }
            for name, heads in self.shapes.items()
        }

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ProfileSteps(L.Callback):
    """Profiles the training steps ``first .. first + count - 1`` of a Lightning fit with ``profiler``."""

    def __init__(self, profiler, first: int, count: int, syncs: "SyncWarnings"):
        self.profiler, self.first, self.count, self.syncs = profiler, first, count, syncs

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.first:
            self.profiler.start()
            self.syncs.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.first + self.count - 1:
            sync(pl_module.device)
            self.syncs.stop()
            self.profiler.stop()


class SyncWarnings:
    """On a GPU, counts the synchronising CUDA calls between ``start`` and ``stop`` with torch's sync debug mode
    (each one warns, naming the Python line that caused it); on the CPU it counts nothing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.lines: list[str] = []
        self._catcher = None
        self.measured = False  # a start() and stop() ran on a GPU

    def start(self) -> None:
        if self.device.type != "cuda":
            return
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._catcher is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)
        self._catcher = None
        self.measured = True
        self.lines += [
            f"{Path(w.filename).name}:{w.lineno}" for w in self._caught if "synchroniz" in str(w.message).lower()
        ]

    def summary(self, steps: int) -> dict:
        """The waits per step (0 included) and the lines that waited most, if it measured; else (the CPU, or steps
        that never reached their end) nothing."""
        if not self.measured:
            return {}
        counts = collections.Counter(self.lines)
        return {"per_step": len(self.lines) / steps, "where": dict(counts.most_common(20))}


def profile_counts(profiler, steps: int) -> dict:
    """Sync ops per step from a profile of ``steps`` steps (aten ops, and the CUDA runtime's waits on a GPU)."""
    events = {e.key: e.count for e in profiler.key_averages()}
    aten = {op: events[op] / steps for op in SYNC_OPS if op in events}
    cuda = {op: events[op] / steps for op in CUDA_SYNC_CALLS if op in events}
    return {"aten_per_step": aten, "aten_total_per_step": sum(aten.values()), "cuda_runtime_per_step": cuda}


def profile_tables(profiler, device: torch.device, rows: int = 25) -> str:
    """The profile's top ``rows`` ops by GPU time (on a GPU) and by CPU time."""
    averages = profiler.key_averages()
    parts = []
    if device.type == "cuda":
        parts += ["== by GPU time", averages.table(sort_by="self_device_time_total", row_limit=rows)]
    parts += ["== by CPU time", averages.table(sort_by="self_cpu_time_total", row_limit=rows)]
    return "\n".join(parts) + "\n"


def profile_phase(args, cfg, module, theirs, loader, device, steps: int = 2, variants=None) -> dict:
    """Host synchronisations per training step and a torch.profiler table of ``steps`` steps of each system (ours,
    each of ``variants``: ``{name: MaskRCNNModule}``, torchvision), after one unprofiled step, on ``loader``'s batches
    (``--steps`` must be at least ``steps + 1``).

    Tables go to ``<--out without .json>_profile_<system>.txt``; the variants' numbers to ``variants.<name>``.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    stem = str(args.out).removesuffix(".json")
    result = {"steps": steps}
    # Ours: the whole Lightning training step (training_step, backward, optimizer step), as users run it.
    for name, system in {"ours": module, **(variants or {})}.items():
        profiler, syncs = torch.profiler.profile(activities=activities), SyncWarnings(device)
        trainer = training_only_trainer(args, device, steps + 1, ProfileSteps(profiler, 1, steps, syncs))
        trainer.fit(system, datamodule=FixedBatches(loader))
        counts = {**profile_counts(profiler, steps), "sync_debug": syncs.summary(steps)}
        if name == "ours":
            result["ours"] = counts
        else:
            result.setdefault("variants", {})[name] = counts
        Path(f"{stem}_profile_{name}.txt").write_text(profile_tables(profiler, device))
    # torchvision: the plain loop of train_phase.
    theirs.train()
    params = [p for p in theirs.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=args.lr, momentum=cfg.optimizer.momentum, weight_decay=cfg.optimizer.weight_decay
    )
    profiler, syncs = torch.profiler.profile(activities=activities), SyncWarnings(device)
    for i, (images, targets) in enumerate(loader):
        if i == steps + 1:
            break
        if i == 1:
            profiler.start()
            syncs.start()
        torchvision_train_step(theirs, optimizer, images, targets, device, args.precision)
        if i == steps:
            sync(device)
            syncs.stop()
            profiler.stop()
    result["torchvision"] = {**profile_counts(profiler, steps), "sync_debug": syncs.summary(steps)}
    Path(f"{stem}_profile_torchvision.txt").write_text(profile_tables(profiler, device))
    return result


def torchvision_train_step(theirs, optimizer, images, targets, device: torch.device, precision: str) -> float:
    """One training step of torchvision's model, as its reference script runs it (the loss read with ``item()`` and
    checked), with cuDNN autotuning off whatever ``--cudnn-benchmark`` says (the module's docstring says why).

    Returns:
        The step's loss (the sum of the five).
    """
    autotuning = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        with autocast(device, precision):
            loss = sum(theirs(list(images), list(targets)).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"torchvision: non-finite loss {value}")
        return value
    finally:
        torch.backends.cudnn.benchmark = autotuning


# ---- phases -------------------------------------------------------------------------------------


def training_only_trainer(args, device: torch.device, max_steps: int, callback: L.Callback) -> L.Trainer:
    """A Lightning Trainer that only trains (no logger, checkpoints, bar or validation) for ``max_steps`` steps,
    at ``--precision``, with ``callback`` (which times or profiles the steps)."""
    return L.Trainer(
        accelerator="cpu" if device.type == "cpu" else "gpu",
        devices=1,
        precision="32-true" if args.precision == "32" else args.precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[callback],
        benchmark=args.cudnn_benchmark,
    )


def memory_round(args) -> int:
    """The round that measures memory: the last warm-up round (the first measured one with --warmup 0).
    Memory is measured in one round only, because resetting the CPU high-water mark returns freed heap to
    the system, which the next round then pays for again in page faults."""
    return max(args.warmup - 1, 0)


def summarize(times: list[float], images: int) -> dict:
    """Median over rounds of ``images`` images each, and the spread: the slowest and fastest rounds'
    throughput (``images_per_s_range``)."""
    median = statistics.median(times)
    return {
        "median_s": median,
        "images_per_s": images / median,
        "images_per_s_range": [images / max(times), images / min(times)],
        "latency_ms": 1000 * median,
        "times_s": times,
    }


def train_phase(args, cfg, modules, theirs, loaders, device, memory, save=lambda partial: None) -> dict:
    """Alternating rounds of ``--steps`` training steps: Lightning (ours, then each ``--variant``), plain loop
    (torchvision).

    Round ``r`` trains every system on ``loaders[r]``: new batches every round, the same for all, so a cache
    keyed by shape (cuDNN autotuning, torch.compile) cannot favour one system by having seen the batches before.
    ``save`` gets the numbers of the rounds finished so far after every round (a run stopped at its time limit
    keeps them).

    Args:
        modules: ``{"ours": MaskRCNNModule, <variant name>: MaskRCNNModule, ...}``, each trained in its turn.
    """
    rounds = {name: [] for name in [*modules, "torchvision"]}
    losses = {name: [] for name in rounds}
    peaks = dict.fromkeys(rounds)
    lr = None
    names = list(modules)
    for r, loader in enumerate(loaders):
        measure_memory = r == memory_round(args)
        times, round_losses = {}, {}
        # Ours and the variants take turns at going first: with cuDNN autotuning the first to meet a new shape pays
        # for its tuning, and the others would get it free.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            module = modules[name]
            timer = StepTimer(device, memory if measure_memory else None)
            trainer = training_only_trainer(args, device, args.steps, timer)
            # Every system's round starts from the same random state: the same anchors and RoIs sampled where the
            # sampling is torchvision's, so the first step's losses compare (train_summary's "same_losses").
            torch.manual_seed(round_seed(r))
            trainer.fit(module, datamodule=FixedBatches(loader))
            times[name], round_losses[name], lr = timer.times, timer.losses, timer.lr
            if measure_memory:
                peaks[name] = timer.peak_mib

        theirs.train()
        times["torchvision"], round_losses["torchvision"] = [], []
        if measure_memory:
            memory.start()
        params = [p for p in theirs.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            params, lr=args.lr, momentum=cfg.optimizer.momentum, weight_decay=cfg.optimizer.weight_decay
        )
        torch.manual_seed(round_seed(r))
        for images, targets in loader:
            sync(device)
            start = time.perf_counter()
            loss = torchvision_train_step(theirs, optimizer, images, targets, device, args.precision)
            sync(device)
            times["torchvision"].append(time.perf_counter() - start)
            round_losses["torchvision"].append(loss)
        if measure_memory:
            peaks["torchvision"] = memory.stop()
        # Its momentum buffers go now, not when the next round's optimizer replaces them: alive, they would sit in
        # the baseline of the next round that measures memory.
        del optimizer, params
        if r >= args.warmup:
            for name, steps in times.items():
                rounds[name].append(steps)
                losses[name].append(round_losses[name])
            save(train_summary(args, rounds, peaks, lr, complete=False, losses=losses))
    return train_summary(args, rounds, peaks, lr, complete=True, losses=losses)


def round_seed(r: int) -> int:
    """The random seed every system's training round ``r`` starts from."""
    return 1000 + r


def train_summary(
    args, rounds: dict, peaks: dict, lr: float | None, complete: bool, losses: dict | None = None
) -> dict:
    """The training numbers of the measured rounds in ``rounds`` (``complete``: all ``--repeats`` of them).

    ``ours``, ``torchvision`` and ``ratio`` (ours / torchvision throughput); each ``--variant`` under
    ``variants.<name>``, with its ``overrides``, its ``ratio`` to torchvision and ``vs_ours`` (its throughput over
    ours'). With ``losses`` (per system, per round, per step): each system's ``step_losses`` and its
    ``same_losses`` (:func:`same_losses`) against torchvision's.
    """
    result = {"complete": complete, "rounds": len(rounds["ours"])}
    for name, steps in rounds.items():
        # One round's time: the sum of its steps (so its throughput is steps * batch / time).
        result[name] = summarize([sum(s) for s in steps], args.steps * args.batch_size)
        result[name].update(step_times_s=steps, peak_mem_mib=peaks[name], lr=lr)
        if losses is not None:
            result[name]["step_losses"] = losses[name]
            if name != "torchvision":
                result[name]["same_losses"] = same_losses(losses[name], losses["torchvision"])
    result["torchvision"]["lr"] = args.lr
    result = with_ratios(result, [name for name in rounds if name not in ("ours", "torchvision")])
    for name, variant in result.get("variants", {}).items():
        variant["overrides"] = args.variants[name]
    return result


def same_losses(ours: list[list[float]], theirs: list[list[float]]) -> dict:
    """How far one system's training losses are from torchvision's, round by round (issue #22's "with the same
    losses").

    Each round starts both from the same random state on the same batches, so the first step's losses differ only
    by arithmetic (summation order, bf16 rounding) where the sampling is torchvision's: ``first_step_rel_diff`` is
    the largest ``|ours - theirs| / |theirs|`` over the rounds' first steps. Later steps follow weights that have
    moved apart by that much: ``all_steps_rel_diff`` is the largest over every step. Switches that sample
    differently (``model.batched_sampling``) differ by their draws as well.
    """

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    pairs = [(a, b) for round_a, round_b in zip(ours, theirs) for a, b in zip(round_a, round_b)]
    firsts = [(round_a[0], round_b[0]) for round_a, round_b in zip(ours, theirs) if round_a and round_b]
    return {
        "first_step_rel_diff": max((rel(a, b) for a, b in firsts), default=None),
        "all_steps_rel_diff": max((rel(a, b) for a, b in pairs), default=None),
    }


def with_ratios(entry: dict, variants: list[str]) -> dict:
    """``entry`` (one measurement's numbers per system) with ``ratio``: ours' throughput over torchvision's, and
    each of ``variants`` moved under ``variants.<name>`` with its own ``ratio`` and ``vs_ours`` (over ours')."""
    entry["ratio"] = entry["ours"]["images_per_s"] / entry["torchvision"]["images_per_s"]
    if variants:
        entry["variants"] = {name: entry.pop(name) for name in variants}
        for variant in entry["variants"].values():
            variant["ratio"] = variant["images_per_s"] / entry["torchvision"]["images_per_s"]
            variant["vs_ours"] = variant["images_per_s"] / entry["ours"]["images_per_s"]
    return entry


def coco_json_ours(detections: list[dict], image_ids: list[int]) -> list[dict]:
    """Our path: ``CocoEvaluator.update`` (as in validation) then ``results_json``, no ground truth."""
    evaluator = CocoEvaluator()
    empty = [
        {
            "image_id": i,
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, *d["masks"].shape[-2:], dtype=torch.uint8),
        }
        for i, d in zip(image_ids, detections)
    ]
    evaluator.update(detections, empty)
    return evaluator.results_json()


def coco_json_plain(detections: list[dict], image_ids: list[int]) -> list[dict]:
    """The same COCO results written plainly for torchvision's output."""
    results = []
    for image_id, det in zip(image_ids, detections):
        masks = (det["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
        boxes = det["boxes"].cpu().double()
        boxes[:, 2:] -= boxes[:, :2]
        for box, label, score, rle in zip(boxes.tolist(), det["labels"].tolist(), det["scores"].tolist(), rles):
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {"image_id": image_id, "category_id": label, "bbox": box, "score": score, "segmentation": rle}
            )
    return results


def infer_phase(args, ours, theirs, rounds, device, memory, save=lambda partial: None, variants=None) -> dict:
    """Eval-mode forward, model only and (with ``e2e`` in ``--infer-modes``) end to end, at batch 1 and
    ``--infer-batch-size``; round ``r`` runs on the images of ``rounds[r]`` (new images every round).

    ``variants``: ``{name: model}``, the ``--variant`` configurations of ours, measured in the same rounds; each entry
    has them under ``variants.<name>`` with ``ratio`` (to torchvision) and ``vs_ours``.
    """
    variants = variants or {}
    ours.eval(), theirs.eval()
    systems = {"ours": (lambda images: ours(images)[0], coco_json_ours)}
    for name, model in variants.items():
        model.eval()
        systems[name] = (lambda images, model=model: model(images)[0], coco_json_ours)
    systems["torchvision"] = (lambda images: theirs(images), coco_json_plain)
    result = {}
    for batch in sorted({1, args.infer_batch_size}):
        for mode in args.infer_modes:
            times = {name: [] for name in systems}
            peaks, detections = {}, {}
            for r, samples in enumerate(rounds):
                images = [image for image, _ in samples[:batch]]
                ids = [int(target["image_id"]) for _, target in samples[:batch]]
                for name, (forward, to_json) in systems.items():
                    if r == memory_round(args):
                        memory.start()
                    sync(device)
                    start = time.perf_counter()
                    with torch.inference_mode(), autocast(device, args.precision):
                        output = forward(images)
                    if mode == "e2e":
                        to_json(output, ids)
                    sync(device)
                    elapsed = time.perf_counter() - start
                    if r == memory_round(args):
                        peaks[name] = memory.stop()
                    if r >= args.warmup:
                        times[name].append(elapsed)
                    detections[name] = sum(len(d["boxes"]) for d in output) / batch
            entry = {}
            for name in systems:
                entry[name] = summarize(times[name], batch)
                entry[name].update(peak_mem_mib=peaks[name], detections_per_image=detections[name])
            result[f"{mode}_batch{batch}"] = with_ratios(entry, list(variants))
            save(result)
    return result


def eval_predictions(dataset: ShapesDataset, index: int, num_dets: int) -> tuple[dict, dict]:
    """Ground truth ``index`` of ``dataset`` and ``num_dets`` made-up detections (float masks [D, 1, H, W]):
    each object found again, shifted by up to 2 pixels, plus random rectangles with lower scores."""
    _, target = dataset[index]
    rng = np.random.default_rng(index)
    height, width = target["masks"].shape[-2:]
    gt = target["masks"].bool()[:num_dets]
    shifts = rng.integers(-2, 3, size=(len(gt), 2))
    found = [torch.roll(m, shifts=(int(dy), int(dx)), dims=(0, 1)) for m, (dy, dx) in zip(gt, shifts)]
    n_rect = num_dets - len(found)
    side = np.exp(rng.uniform(np.log(4), np.log(0.6 * min(height, width)), size=(n_rect, 2)))
    corner = rng.uniform(0, 1, size=(n_rect, 2)) * (np.array([width, height]) - side)
    x1, y1 = (torch.from_numpy(corner[:, i]).floor()[:, None, None] for i in (0, 1))
    x2, y2 = (torch.from_numpy(corner[:, i] + side[:, i]).ceil()[:, None, None] for i in (0, 1))
    ys, xs = torch.arange(height)[None, :, None], torch.arange(width)[None, None, :]
    rects = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)
    masks = torch.cat([torch.stack(found) if found else rects[:0], rects]).float()[:, None] * 0.9
    labels = target["labels"][:num_dets].clone()
    wrong = torch.from_numpy(rng.uniform(size=len(labels)) < 0.1)
    labels[wrong] = torch.from_numpy(rng.integers(1, dataset.num_classes + 1, size=int(wrong.sum())))
    labels = torch.cat([labels, torch.from_numpy(rng.integers(1, dataset.num_classes + 1, size=n_rect))])
    scores = torch.from_numpy(np.concatenate([rng.uniform(0.5, 1, len(found)), rng.uniform(0.05, 0.6, n_rect)]))
    prediction = {"boxes": masks_to_boxes(masks[:, 0]), "labels": labels, "scores": scores.float(), "masks": masks}
    return prediction, target


def eval_phase(args, cfg) -> dict:
    """``CocoEvaluator`` update and compute times per backend on the same generated predictions."""
    dataset = ShapesDataset(
        num_images=args.eval_images, image_size=args.eval_image_size, classes=cfg.data.classes, seed=0, split="val"
    )
    evaluators = {backend: CocoEvaluator(backend=backend) for backend in BACKENDS}
    update_s = dict.fromkeys(BACKENDS, 0.0)
    for first in range(0, args.eval_images, 8):
        batch = [eval_predictions(dataset, i, args.eval_dets) for i in range(first, min(first + 8, args.eval_images))]
        predictions, targets = [p for p, _ in batch], [t for _, t in batch]
        for backend, evaluator in evaluators.items():
            start = time.perf_counter()
            evaluator.update(predictions, targets)
            update_s[backend] += time.perf_counter() - start
    result = {
        "num_images": args.eval_images,
        "image_size": args.eval_image_size,
        "detections_per_image": args.eval_dets,
        "iou_types": list(CocoEvaluator().iou_types),
    }
    runs = {backend: [] for backend in BACKENDS}
    for _ in range(args.eval_repeats):
        for backend, evaluator in evaluators.items():
            start = time.perf_counter()
            metrics = evaluator.compute()
            runs[backend].append(time.perf_counter() - start)
            result[backend] = {"metrics": metrics}
    for backend in BACKENDS:
        result[backend].update(
            update_s=update_s[backend], compute_s=statistics.median(runs[backend]), compute_runs_s=runs[backend]
        )
    return result


# ---- report -------------------------------------------------------------------------------------


def write_json(results: dict, path: str) -> None:
    """Writes ``results`` to ``path`` (through a temporary file, so a run stopped mid-write leaves the last
    complete version)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def hardware(device: torch.device) -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info.update(
            device_name=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def table(results: dict) -> str:
    """The printed report: ours, torchvision and ours/torchvision per measurement."""
    rows = [f"{'':44}{'ours':>12}{'torchvision':>13}{'ours/tv':>9}"]

    def row(label, unit, ours, theirs, ratio):
        rows.append(f"{label:36}{unit:>8}{ours:12.4g}{theirs:13.4g}{ratio:9.3f}")

    if "train" in results:
        t = results["train"]
        row(
            f"train throughput (batch {results['args']['batch_size']})",
            "img/s",
            t["ours"]["images_per_s"],
            t["torchvision"]["images_per_s"],
            t["ratio"],
        )
        row(
            "train peak memory",
            "MiB",
            t["ours"]["peak_mem_mib"],
            t["torchvision"]["peak_mem_mib"],
            t["ours"]["peak_mem_mib"] / max(t["torchvision"]["peak_mem_mib"], 1e-9),
        )
        for name, v in t.get("variants", {}).items():
            row(f"  variant {name}", "img/s", v["images_per_s"], t["torchvision"]["images_per_s"], v["ratio"])
        for name, v in [("ours", t["ours"]), *t.get("variants", {}).items()]:
            diff = v.get("same_losses", {}).get("first_step_rel_diff")
            if diff is not None:
                rows.append(
                    f"{'  loss vs torchvision, first steps':36}{name:>8}   largest relative difference {diff:.2g}"
                )
    for key, m in results.get("infer", {}).items():
        mode, batch = key.split("_batch")
        label = f"infer {'model only' if mode == 'model' else 'end to end'} (batch {batch})"
        systems = [(label + (" latency" if batch == "1" else ""), m["ours"], m["ratio"])]
        systems += [(f"  variant {n}", v, v["ratio"]) for n, v in m.get("variants", {}).items()]
        for text, mine, ratio in systems:
            if batch == "1":
                row(text, "ms", mine["latency_ms"], m["torchvision"]["latency_ms"], ratio)
            else:
                row(text, "img/s", mine["images_per_s"], m["torchvision"]["images_per_s"], ratio)
    if "infer" in results:
        m = results["infer"][max(results["infer"], key=lambda k: int(k.split("_batch")[1]))]
        row(
            "infer peak memory (largest batch)",
            "MiB",
            m["ours"]["peak_mem_mib"],
            m["torchvision"]["peak_mem_mib"],
            m["ours"]["peak_mem_mib"] / max(m["torchvision"]["peak_mem_mib"], 1e-9),
        )
    rows.append(
        "ours/tv: speed ratio on time rows (issue #22's goals: >= 1.3 eager, >= 2 on the fast path against torchvision "
        "eager), memory ratio on MiB rows"
    )
    if results.get("nms_triton_failure"):
        rows.append(
            f"NMS: the Triton kernel failed ({results['nms_triton_failure']}); the runs with "
            "model.batched_proposals=true measured torchvision's per-group nms instead"
        )
    if results["args"].get("variants"):
        rows.append(
            "variants (ours with more overrides, in the ours column): "
            + "; ".join(f"{n}: {' '.join(overrides)}" for n, overrides in results["args"]["variants"].items())
        )
    if "eval" in results:
        e = results["eval"]
        rows.append(
            f"\neval: {e['num_images']} images {e['image_size']}x{e['image_size']}, "
            f"{e['detections_per_image']} detections/image, {'+'.join(e['iou_types'])} AP"
        )
        rows.append(f"{'':36}" + "".join(f"{b:>18}" for b in BACKENDS))
        for label, key in (("update: RLE encoding (s)", "update_s"), ("compute: COCOeval (s)", "compute_s")):
            rows.append(f"{label:36}" + "".join(f"{e[b][key]:18.2f}" for b in BACKENDS))
        rows.append(f"{'segm AP':36}" + "".join(f"{e[b]['metrics']['segm_AP']:18.4f}" for b in BACKENDS))
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--image-size",
        type=int,
        default=512,
        help="shapes image height and, without --image-width, width (model min_size = max_size = it)",
    )
    p.add_argument(
        "--image-width",
        type=int,
        default=None,
        help="shapes image width, if not --image-size (--image-size 800 --image-width 1333: COCO's size)",
    )
    p.add_argument("--batch-size", type=int, default=2, help="training batch")
    p.add_argument("--infer-batch-size", type=int, default=8, help="inference throughput batch")
    p.add_argument("--steps", type=int, default=10, help="training steps per round")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds (median)")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds before them")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="SGD lr of both (a step's work does not depend on it; random weights diverge at 0.02)",
    )
    p.add_argument("--precision", choices=("32", "bf16-mixed"), default="32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument(
        "--torchvision-eager",
        action="store_true",
        help="torchvision keeps the default memory format whatever --channels-last says (it never autotunes): the "
        "fast path's reference, torchvision eager, in the same process",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--torchvision-roi-align-backward",
        action="store_true",
        help="ours uses torchvision's RoIAlign backward too (isolates framework overhead on the CPU)",
    )
    p.add_argument("--skip", default="", help="comma-separated phases to skip: train,infer,eval")
    p.add_argument(
        "--infer-modes", default="model,e2e", help="inference measurements: model (forward only), e2e (+ json)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after training: host synchronisations per step, a torch.profiler table of 2 steps of each system, "
        "and the distinct RoI-head input shapes seen in training",
    )
    p.add_argument("--eval-images", type=int, default=5000)
    p.add_argument("--eval-image-size", type=int, default=128)
    p.add_argument("--eval-dets", type=int, default=100, help="detections per image (COCO's maxDets)")
    p.add_argument("--eval-repeats", type=int, default=1, help="compute() runs per backend (median)")
    p.add_argument(
        "--overrides",
        nargs="*",
        default=["model=torchvision_r50_fpn"],
        help="Hydra overrides of our model; must stay loadable from torchvision's state dict",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="another configuration of ours, measured in the same rounds on the same batches with the same weights: "
        "--overrides plus these space-separated Hydra overrides (repeatable), e.g. "
        "--variant 'per_image=model.batched_sampling=false'",
    )
    p.add_argument("--out", default="benchmark.json")
    args = p.parse_args(argv)
    args.variants = {}
    for text in args.variant:
        name, sep, extra = text.partition("=")
        if not sep or not name.isidentifier() or name in ("ours", "torchvision") or name in args.variants:
            p.error(
                f"--variant takes NAME=OVERRIDES with a new identifier for NAME (not ours/torchvision), got {text!r}"
            )
        args.variants[name] = extra.split()
    args.skip = {s for s in args.skip.split(",") if s}
    args.infer_modes = [m for m in args.infer_modes.split(",") if m]
    if not args.infer_modes or set(args.infer_modes) - {"model", "e2e"}:
        p.error(f"--infer-modes takes model,e2e, got {args.infer_modes}")
    if args.skip - set(PHASES):
        p.error(f"--skip takes {','.join(PHASES)}, got {args.skip}")
    if min(args.repeats, args.steps, args.batch_size, args.infer_batch_size, args.eval_images, args.eval_repeats) < 1:
        p.error("--repeats, --steps, the batch sizes, --eval-images and --eval-repeats must be >= 1")
    if args.profile and args.steps < 3:
        p.error("--profile needs --steps 3 or more (one unprofiled step, then two profiled ones)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the phases not skipped, prints the table and writes ``--out``.

    Returns:
        Everything written to the json: ``args``, ``config_overrides``, ``hardware``, ``memory_method``,
        ``trainable_params``, ``nms_triton_failure`` (why the Triton NMS kernel failed, so that the batched paths
        measured torchvision's per-group nms instead; None if it did not) and, per phase run, ``train``, ``infer``,
        ``eval``.
    """
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    silence_library_noise()  # the known third-party noise run.py silences (mrcnn/engine/quiet.py)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    # FixedBatches' identity hook replaces MaskRCNNModule's on purpose (its docstring says why).
    warnings.filterwarnings("ignore", ".*overridden `on_before_batch_transfer` in both.*")
    device = torch.device(args.device)
    memory = PeakMemory(device)
    height, width = args.image_size, args.image_width or args.image_size
    size = height if height == width else (height, width)
    # Shorter side = min_size, longer side = max_size: the model's resize leaves the images as they are.
    overrides = [
        *args.overrides,
        f"data.image_size={height if height == width else [height, width]}",
        f"data.min_size={min(height, width)}",
        f"data.max_size={max(height, width)}",
    ]
    if args.torchvision_roi_align_backward:
        overrides.append("model.net.roi_heads.pooler.backward=torchvision")
    cfg = compose_config(overrides)
    results = {
        "args": vars(args) | {"skip": sorted(args.skip)},
        "config_overrides": overrides,
        "hardware": hardware(device),
        "memory_method": memory.method if device.type == "cpu" else "cuda_max_memory_allocated",
    }

    # Every round gets its own batches (seed = round), the same for both systems.
    num_samples = max(args.steps * args.batch_size, args.infer_batch_size)
    rounds = [
        [
            dataset[i]
            for dataset in [ShapesDataset(num_images=num_samples, image_size=size, classes=cfg.data.classes, seed=r)]
            for i in range(num_samples)
        ]
        for r in range(args.warmup + args.repeats)
    ]
    torch.manual_seed(0)
    theirs = build_torchvision(cfg)
    stabilize_random_weights(theirs, [image for image, _ in rounds[0][: args.batch_size]])
    initial = {k: v.clone() for k, v in theirs.state_dict().items()}
    # SGD at the constant lr of the torchvision loop: MaskRCNNModule uses base_lr * batch / base_batch_size.
    base_lr = args.lr * cfg.module.base_batch_size / args.batch_size
    module = instantiate(cfg.module, scheduler=None, base_lr=base_lr)
    # The reference was built from parts with FrozenBatchNorm's default eps (1e-5), not loaded from torchvision's
    # COCO file (eps 0): keep ours at the same eps so both compute the same thing.
    load_torchvision_weights(module.model, initial, frozen_bn_eps=None)
    # Each --variant: ours with more overrides, the same weights, measured in the same rounds.
    variants = {}
    for name, extra in args.variants.items():
        variant_cfg = compose_config([*overrides, *extra])
        variants[name] = instantiate(variant_cfg.module, scheduler=None, base_lr=base_lr)
        load_torchvision_weights(variants[name].model, initial, frozen_bn_eps=None)
    if args.channels_last:
        # --torchvision-eager: torchvision as its users run it by default (and as issue #22's fast-path goal names it).
        for m in (module, *variants.values(), *([] if args.torchvision_eager else [theirs])):
            m.to(memory_format=torch.channels_last)
    # Targets cleaned and checked on the host before the copy, as run.py's (FixedBatches).
    rounds = [
        [(image.to(device), {k: to(v, device) for k, v in t.items()}) for image, t in host_checked(r)] for r in rounds
    ]
    theirs.to(device)
    results["trainable_params"] = {
        name: sum(p.numel() for p in m.parameters() if p.requires_grad)
        for name, m in {"ours": module, **variants, "torchvision": theirs}.items()
    }
    results["complete"] = False

    def write():
        # Whether the batched paths (grouped_nms on a GPU) measured torchvision's per-group nms instead of the Triton
        # kernel, which failed in this process (None: it did not fail, or no batched path ran on a GPU).
        results["nms_triton_failure"] = nms_module.triton_failure
        write_json(results, args.out)

    def save(phase):
        def write_partial(partial):
            results[phase] = partial
            write()

        return write_partial

    if "train" not in args.skip:
        loaders = [
            DataLoader(r[: args.steps * args.batch_size], batch_size=args.batch_size, collate_fn=collate_detection)
            for r in rounds
        ]
        shapes = HeadShapes({"ours": module.model, **{n: v.model for n, v in variants.items()}, "torchvision": theirs})
        modules = {"ours": module, **variants}
        results["train"] = train_phase(args, cfg, modules, theirs, loaders, device, memory, save("train"))
        results["head_shapes"] = shapes.summary()
        shapes.remove()
        write()  # before the profile, which a step's time limit may stop
        if args.profile:
            results["profile"] = profile_phase(args, cfg, module, theirs, loaders[-1], device, variants=variants)
        write()
    if "infer" not in args.skip:
        if "train" not in args.skip:  # back to the same weights: training moved the two a little apart
            theirs.load_state_dict(initial)
            for m in (module, *variants.values()):
                load_torchvision_weights(m.model, initial, frozen_bn_eps=None)
        for m in (module, *variants.values()):
            m.to(device)  # Lightning's teardown leaves it on the CPU
        models = {name: m.model for name, m in variants.items()}
        results["infer"] = infer_phase(args, module.model, theirs, rounds, device, memory, save("infer"), models)
    if "eval" not in args.skip:
        results["eval"] = eval_phase(args, cfg)
    results["complete"] = True

    print(table(results), flush=True)
    write()
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
