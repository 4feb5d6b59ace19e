"""Checks of a composed config's numbers and input files, before anything is built.

A bad number otherwise fails far from its cause: a negative batch size ends in torch's "Invalid learning rate:
-0.0025" (the lr scales with the batch), zero epochs train nothing and report AP anyway. :func:`check_config`
looks at every such key the config has and names each bad one, e.g.
``data.datamodule.batch_size=-2: must be a positive integer``. A data folder or weights file that is not set or
not there (:func:`path_problems`) stops the run the same way, naming the key and what must be there, instead of
failing after the data or the model was built.
"""

import math
import os
from collections.abc import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

# A rule takes a value and returns what is wrong with it, or None.
Rule = Callable[[object], str | None]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def positive_int(value) -> str | None:
    return None if _is_int(value) and value > 0 else "must be a positive integer"


def non_negative_int(value) -> str | None:
    return None if _is_int(value) and value >= 0 else "must be an integer >= 0"


def positive_number(value) -> str | None:
    return None if _is_number(value) and value > 0 else "must be a positive number"


def non_negative_number(value) -> str | None:
    return None if _is_number(value) and value >= 0 else "must be a number >= 0"


def optional(rule: Rule) -> Rule:
    """``rule``, or null."""

    def check(value) -> str | None:
        if value is None:
            return None
        problem = rule(value)
        return problem and f"{problem}, or null"

    return check


def batch_limit(value) -> str | None:
    """Lightning's ``limit_*_batches`` / ``val_check_interval``: a count (int >= 1) or a fraction in (0, 1]."""
    if value is None or (_is_int(value) and value >= 1) or (_is_number(value) and 0 < value <= 1):
        return None
    return "must be a number of batches (an integer >= 1), a fraction in (0, 1], or null"


def limit_batches(value) -> str | None:
    """Lightning's ``limit_*_batches``: as :func:`batch_limit`, and 0, which switches the loop off."""
    if _is_int(value) and value == 0:
        return None
    problem = batch_limit(value)
    return problem and problem.replace("an integer >= 1", "an integer >= 0")


def devices(value) -> str | None:
    """``trainer.devices``: a count, ``auto``, ``-1`` (all) or a list of device indices."""
    # OmegaConf hands a list over as a ListConfig, which is a Sequence but not a list.
    if value == "auto" or value == -1 or isinstance(value, Sequence):
        return None
    return positive_int(value)


# Every number a run depends on, by key. Keys a config does not have (another data set, no scheduler) are skipped.
RULES: dict[str, Rule] = {
    "seed": optional(non_negative_int),
    "base_lr": positive_number,
    "module.base_batch_size": positive_int,
    "checkpoint_every_n_steps": optional(positive_int),
    # data
    "data.datamodule.batch_size": positive_int,
    "data.datamodule.val_batch_size": optional(positive_int),
    "data.datamodule.num_workers": non_negative_int,
    "data.num_train_images": positive_int,
    "data.num_val_images": positive_int,
    "data.image_size": positive_int,
    "data.max_objects": positive_int,
    # trainer (max_epochs / max_steps: _length_problems)
    "trainer.devices": devices,
    "trainer.num_nodes": positive_int,
    "trainer.accumulate_grad_batches": positive_int,
    "trainer.log_every_n_steps": positive_int,
    "trainer.check_val_every_n_epoch": optional(positive_int),
    "trainer.val_check_interval": batch_limit,
    "trainer.limit_train_batches": limit_batches,
    "trainer.limit_val_batches": limit_batches,
    "trainer.gradient_clip_val": optional(non_negative_number),
    # optimizer and schedule
    "optimizer.momentum": non_negative_number,
    "optimizer.weight_decay": non_negative_number,
    "scheduler.warmup_steps": non_negative_int,
    "scheduler.warmup_factor": positive_number,
    "scheduler.gamma": positive_number,
}

_ABSENT = object()


def _length_problems(cfg: DictConfig) -> list[str]:
    """``trainer.max_epochs`` and ``trainer.max_steps``: Lightning's -1 means no limit, but one of them must limit."""
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    problems = []
    if not (max_steps == -1 or (_is_int(max_steps) and max_steps > 0)):
        problems.append(f"trainer.max_steps={max_steps}: must be a positive integer, or -1 for no step limit")
    if max_epochs == -1:
        if max_steps == -1:
            problems.append("trainer.max_epochs=-1: no epoch limit needs a positive trainer.max_steps")
    elif max_epochs is not None and positive_int(max_epochs):
        problems.append(f"trainer.max_epochs={max_epochs}: must be a positive integer (or -1 with a trainer.max_steps)")
    return problems


def config_problems(cfg: DictConfig) -> list[str]:
    """One line per bad value, ``<key>=<value>: <what it must be>``; empty when all are good."""
    problems = []
    for key, rule in RULES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if value is _ABSENT or value == "???":
            continue
        problem = rule(value)
        if problem:
            problems.append(f"{key}={value}: {problem}")
    return problems + _length_problems(cfg)


# Weights files a run reads, by key: what the file must hold.
WEIGHTS_FILES = {
    "model.backbone_weights": "an ImageNet ResNet-{depth} state dict saved with torch.save, as torchvision's "
    "resnet{depth}-*.pth (nothing is downloaded)",
    "weights": "a torchvision Mask R-CNN state dict or a Lightning checkpoint of this project",
}
# Keys of a dataset config (data.datamodule.*_dataset) that name a file or folder it reads.
DATASET_PATH_KEYS = ("root", "image_dir", "ann_file")


def _data_layout(cfg: DictConfig) -> list[tuple[str, str]]:
    """``(key, path as the config writes it)`` of every file and folder the datasets read, e.g.
    ``("data.datamodule.train_dataset.ann_file", "${data.root}/annotations/instances_train2017.json")``."""
    datamodule = OmegaConf.select(cfg, "data.datamodule", default=None)
    written = OmegaConf.to_container(datamodule, resolve=False) if isinstance(datamodule, DictConfig) else {}
    paths = []
    for name in ("train_dataset", "val_dataset", "test_dataset"):
        dataset = written.get(name)
        for key in DATASET_PATH_KEYS if isinstance(dataset, dict) else ():
            if key in dataset:
                paths.append((f"data.datamodule.{name}.{key}", str(dataset[key])))
    return paths


def _under_root(cfg: DictConfig) -> list[str]:
    """What data.root must hold, from the dataset configs, e.g. ``["annotations/instances_train2017.json", ...]``."""
    return sorted({path.replace("${data.root}/", "") for _, path in _data_layout(cfg) if "${data.root}/" in path})


def _data_problems(cfg: DictConfig) -> list[str]:
    data = OmegaConf.select(cfg, "data", default=None)
    if not isinstance(data, DictConfig):
        return []
    layout = ", ".join(_under_root(cfg)) or "the layout its configs/data/<data set>.yaml describes"
    # Keys the data set needs and nobody set (data.root, data.train_json, ...): the paths below depend on them.
    unset = [key for key, value in OmegaConf.to_container(data, resolve=False).items() if value == "???"]
    if unset:
        return [
            f"data.{key} is not set: give data.{key}=<folder> holding {layout}"
            if key == "root"
            else f"data.{key} is not set (see configs/data/<data set>.yaml)"
            for key in unset
        ]
    root = data.get("root")
    if root is not None and not os.path.isdir(root):
        return [f"data.root={root}: no such folder; it must hold {layout}"]
    problems, lacking = [], []
    for key, written in _data_layout(cfg):
        path = OmegaConf.select(cfg, key, default=None)
        if path is None or os.path.exists(path):
            continue
        if "${data.root}/" in written:
            lacking.append(written.replace("${data.root}/", ""))
        else:
            problems.append(f"{key}={path} ({written}): no such file or folder")
    if lacking:
        problems.insert(0, f"data.root={root} lacks {', '.join(dict.fromkeys(lacking))}; it must hold {layout}")
    return problems


def path_problems(cfg: DictConfig) -> list[str]:
    """One line per input file or folder that is not set or not there: the data (its root, and every file and
    folder its datasets read) and the weights files; empty when all are there."""
    problems = _data_problems(cfg)
    depth = OmegaConf.select(cfg, "model.depth", default=50)
    for key, holds in WEIGHTS_FILES.items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in OmegaConf.to_container(node, resolve=False):
            continue
        value = OmegaConf.to_container(node, resolve=False)[leaf]
        holds = holds.format(depth=depth)
        if value == "???":
            problems.append(f"{key} is not set: give {key}=<file>, {holds}")
        elif value is not None and not os.path.isfile(value):
            problems.append(f"{key}={value}: no such file; it must be {holds}")
    return problems


def check_config(cfg: DictConfig) -> None:
    """Stops before anything is built when a number of the config is out of range, or an input file or folder
    is not set or not there.

    Raises:
        ValueError: listing every bad key with its value and what it must be.
        FileNotFoundError: listing every missing data folder, data file and weights file, with its key.
    """
    problems = config_problems(cfg)
    if problems:
        raise ValueError("invalid config values:\n  " + "\n  ".join(problems))
    missing = path_problems(cfg)
    if missing:
        raise FileNotFoundError("missing input:\n  " + "\n  ".join(missing))
