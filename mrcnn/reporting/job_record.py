"""What a job built and what it cost: ``<run_dir>/job.json``, for the ablation report.

The report labels each job by the config choices it ran (``mrcnn.reporting.report``); this record says what those
choices built, read from the model's modules themselves, so a report can show that the variants of an
ablation differ in the one thing they are meant to, and catch a label that does not match its model.

It also records what the job's numbers depend on beyond its config (``environment``): the same command gives
the same numbers only with the same seed, thread count, library versions, device and deterministic flag
(README, "Reproducibility").

``job.json``::

    {"model": describe_model(net), "parameters": {"total": ..., "mask_head": ...},
     "train_steps": N, "step_time_median_s": ..., "wall_time_s": ...,
     "environment": {"seed": 0, "torch_threads": 2, "torch": "2.14.1", "torchvision": ..., "cuda": ...,
                     "cudnn": ..., "device": "...", "deterministic": false, ...}}
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import albumentations
import lightning as L
import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from mrcnn.modeling.box_head import MLPBoxHead
from mrcnn.modeling.mask_head import FCNMaskHead, MLPMaskHead

NORMS = (nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


def _resnet(net: nn.Module) -> dict[str, object]:
    """Depth, width, normalization and design (C4 / C5 / FPN) of the ResNet in ``net``.

    The depth counts the residual blocks wherever they run: C4's res5 is the box head.
    """
    body = net.backbone.body
    blocks = [
        m
        for m in (*net.backbone.modules(), *net.roi_heads.box_head.modules())
        if isinstance(m, (BasicBlock, Bottleneck))
    ]
    layers_per_block = 3 if isinstance(blocks[0], Bottleneck) else 2
    depth = 2 + layers_per_block * len(blocks)  # stem conv + block convs + the classifier fc (18, 34, 50, 101, 152)
    if hasattr(net.backbone, "fpn"):
        design = "FPN"
    else:
        design = "C5" if "layer4" in body else "C4"
    norm = next(m for m in body.modules() if isinstance(m, NORMS))
    return {
        "backbone": f"ResNet-{depth}-{design}",
        "backbone.width": body.conv1.out_channels,
        "backbone.norm": _norm_name(norm),
    }


def _norm_name(norm: nn.Module) -> str:
    """The family's name of a layer of :data:`NORMS`: a speed variant of a norm (FrozenBatchNorm2dKeepsDtype)
    computes the same layer."""
    return next(cls.__name__ for cls in NORMS if isinstance(norm, cls))


def _pooler(heads: nn.Module) -> dict[str, object]:
    pooler = heads.box_pooler
    return {
        "pooler": type(pooler).__name__,
        "pooler.mode": getattr(pooler, "mode", None),
        "pooler.sampling_ratio": getattr(pooler, "sampling_ratio", None),
        "pooler.aligned": getattr(pooler, "aligned", None),
        "pooler.box_size": pooler.output_size,
        "pooler.mask_size": None if heads.mask_pooler is None else heads.mask_pooler.output_size,
    }


def _box_head(head: nn.Module) -> dict[str, object]:
    width = head.fc6.out_features if isinstance(head, MLPBoxHead) else getattr(head, "out_channels", None)
    return {"box_head": type(head).__name__, "box_head.width": width}


def _mask_head(head: nn.Module) -> dict[str, object]:
    if isinstance(head, FCNMaskHead):
        layers = {
            "mask_head.convs": sum(isinstance(m, nn.Conv2d) for m in head.convs),
            "mask_head.width": head.deconv.out_channels,
        }
    elif isinstance(head, MLPMaskHead):
        layers = {
            "mask_head.fc": [fc.out_features for fc in head.hidden],
            "mask_head.input_size": head.input_resolution,
        }
    else:
        layers = {}
    # The hidden layers' normalisation (GroupNorm from scratch): a variant with it and one without differ in more than
    # their layout.
    norms = sorted({_norm_name(m) for m in head.modules() if isinstance(m, NORMS)})
    return {
        "mask_head": type(head).__name__,
        **layers,
        "mask_head.norm": ", ".join(norms) or None,
        "mask_head.class_agnostic": bool(getattr(head, "class_agnostic", False)),
    }


def describe_model(net: nn.Module) -> dict[str, object]:
    """The switchable parts of a built :class:`~mrcnn.modeling.mask_rcnn.MaskRCNN` and their settings.

    A flat ``{"part" or "part.setting": value}`` dict of JSON values, e.g. ``"pooler": "RoIWarpPooler"``,
    ``"pooler.mode": "max"``, ``"mask_loss": "SoftmaxMaskLoss"``, ``"mask_targets": "binary"``: two models built
    from the variants of one ablation should differ only in the keys of the ablated part.
    """
    heads = net.roi_heads
    return {
        **_resnet(net),
        "roi_heads": type(heads).__name__,
        "rois_per_image": heads.fg_bg_sampler.batch_size_per_image,
        **_pooler(heads),
        **_box_head(heads.box_head),
        **_mask_head(heads.mask_head),
        "mask_loss": type(heads.mask_loss).__name__,
        "mask_targets": heads.mask_target_form,
        "mask_targets.aligned": bool(heads.aligned_mask_targets),
    }


def count_parameters(net: nn.Module) -> dict[str, int]:
    """Parameters of the whole model and of its mask head alone (C4's res5, shared with the box head, is not
    counted in the mask head)."""
    return {
        "total": sum(p.numel() for p in net.parameters()),
        "mask_head": sum(p.numel() for p in net.roi_heads.mask_head.parameters()),
    }


def device_name(device: torch.device) -> str:
    """The GPU's name (``torch.cuda.get_device_name``), else the CPU's model name (from ``/proc/cpuinfo`` on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, seed: int | None = None) -> dict[str, object]:
    """What a job's numbers depend on beyond its config: seed, thread count, library versions, device, determinism.

    The same command on the same machine with the same threads and versions gives bit-identical numbers;
    with any of these changed they differ within the spread over seeds (README, "Reproducibility").

    Args:
        device: the device the job trains on.
        seed: the run's seed; ``None``: the one ``seed_everything`` was given (``PL_GLOBAL_SEED``), if any.
    """
    if seed is None and os.environ.get("PL_GLOBAL_SEED") is not None:
        seed = int(os.environ["PL_GLOBAL_SEED"])
    return {
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": device_name(device),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "lightning": L.__version__,
        "numpy": np.__version__,
        "albumentations": albumentations.__version__,
        "python": platform.python_version(),
    }


class JobRecord(L.Callback):
    """Writes ``path`` (``job.json``): the model the job built, its parameter counts, its training step time and
    its wall time. Rank zero writes; the file is rewritten at the end of every fit and validation, so the last
    write includes the final evaluation.

    Args:
        path: the JSON file, normally ``${run_dir}/job.json``.
        seed: the run's seed (``${seed}``), recorded with the rest of :func:`environment`.

    Times: a training step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward,
    backward and optimizer step; loading the batch is not included) and the median is recorded. The wall time
    runs from this callback's construction (when the job builds its trainer) to the last write: one process's
    share of a resumed run.
    """

    def __init__(self, path: str, seed: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.seed = seed
        self._environment: dict | None = None
        self._start = time.perf_counter()
        self._step_start: float | None = None
        self._step_times: list[float] = []
        self._model: dict | None = None
        self._parameters: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._model is None:
            self._model = describe_model(pl_module.model)
            self._parameters = count_parameters(pl_module.model)
        self._environment = environment(getattr(pl_module, "device", torch.device("cpu")), self.seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _synchronize(getattr(pl_module, "device", None))
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step_start is not None:
            # On a GPU the backward and the optimizer step run asynchronously: wait for them before reading
            # the clock (one sync per step, and only in ablation jobs, which record their time).
            _synchronize(getattr(pl_module, "device", None))
            self._step_times.append(time.perf_counter() - self._step_start)
            self._step_start = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            self.write()

    def record(self) -> dict:
        return {
            "model": self._model,
            "parameters": self._parameters,
            "train_steps": len(self._step_times),
            "step_time_median_s": statistics.median(self._step_times) if self._step_times else None,
            "wall_time_s": time.perf_counter() - self._start,
            "environment": self._environment,
        }

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.record(), indent=2) + "\n")


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
