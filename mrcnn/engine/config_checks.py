"""Every user-facing config key, described once with its type and range, and checked before anything is built.

A bad value otherwise fails far from its cause: a negative batch size ends in torch's "Invalid learning rate:
-0.0025" (the lr scales with the batch), ``data.min_size=0`` in a ``ZeroDivisionError``, an empty
``model.anchor_sizes`` in an ``IndexError``, zero epochs train nothing and report AP anyway.

:data:`SCHEMA` is the one table: a key (or an ``fnmatch`` pattern of keys, e.g. ``*._target_``) and the
:class:`Rule` its value must follow. :func:`check_config` walks every key of a composed config, checks each value
written there, and names each bad one, e.g. ``data.datamodule.batch_size=-2: must be a positive integer``. A value
an interpolation gives (``data.min_size=${oc.env:MIN_SIZE}``) is checked at its key too, and one that cannot be
resolved (a variable not set, a key not there) is named there; a bad value is named once, not again at each key
that repeats it (``${data.min_size}``). ``tests/test_config_schema.py``
composes every option of every config group and fails on a key without a rule: a new key gets its line here.

A data folder or weights file that is not set or not there (:func:`path_problems`) stops the run the same way,
naming the key and what must be there, instead of failing after the data or the model was built; so does a
checkpoint to start from that is not there (:func:`checkpoint_path`), or an evaluation without one.

This module loads neither torch nor Lightning (but for the GPU check, when a GPU is asked for): ``run.py`` runs
:func:`check_config` before it imports them, so a mistake is answered in about a second.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from mrcnn.data.images import check_regular_file
from mrcnn.engine.target_source import target_problem

_ABSENT = object()


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a key's value must be: ``what`` says it in words ("a positive integer"), ``ok`` checks it."""

    what: str
    ok: Callable[[object], bool]

    def __call__(self, value) -> str | None:
        """``None`` when ``value`` follows the rule, else ``"must be <what>"``."""
        try:
            good = self.ok(value)
        except (TypeError, ValueError):
            good = False
        return None if good else f"must be {self.what}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple, ListConfig))


def optional(rule: Rule) -> Rule:
    """``rule``, or null."""
    return Rule(f"{rule.what}, or null", lambda v: v is None or rule.ok(v))


def one_of(*choices) -> Rule:
    return Rule("one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices)


def list_of(rule: Rule, non_empty: bool = True) -> Rule:
    what = f"a {'non-empty ' if non_empty else ''}list of {rule.what.removeprefix('a ').removeprefix('an ')}s"
    return Rule(what, lambda v: _is_list(v) and (len(v) > 0 or not non_empty) and all(rule.ok(x) for x in v))


positive_int = Rule("a positive integer", lambda v: _is_int(v) and v > 0)
non_negative_int = Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0)
positive_number = Rule("a positive number", lambda v: _is_number(v) and v > 0)
non_negative_number = Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
probability = Rule("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)
fraction = Rule("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1)
boolean = Rule("true or false", lambda v: isinstance(v, bool))
string = Rule("a string", lambda v: isinstance(v, str))
non_empty_string = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
# Hydra's instantiation keys; a dotted path to a class or function.
target = Rule("a dotted import path (Hydra's _target_)", lambda v: isinstance(v, str) and "." in v)
config_node = Rule("a config (a mapping, usually an interpolation of another key)", lambda v: isinstance(v, Mapping))
# A mapping whose keys are free (passed on as given): walked no further.
free_mapping = Rule("a mapping (free form, passed on as given)", lambda v: isinstance(v, Mapping))
any_value = Rule("any value (free form, passed on as given)", lambda v: True)
path = optional(non_empty_string)
sizes = Rule(
    "a positive integer or a non-empty list of them",
    lambda v: positive_int.ok(v) or list_of(positive_int).ok(v),
)
class_names = Rule(
    "a non-empty list of distinct non-empty strings",
    lambda v: list_of(non_empty_string).ok(v) and len(set(v)) == len(v),
)
milestones = Rule(
    "a list of increasing fractions of training in (0, 1)",
    lambda v: list_of(fraction, non_empty=False).ok(v) and list(v) == sorted(v),
)
batch_limit = Rule(
    "a number of batches (an integer >= 1), a fraction in (0, 1], or null",
    lambda v: v is None or (_is_int(v) and v >= 1) or (_is_number(v) and 0 < v <= 1),
)
# Lightning's limit_*_batches: as batch_limit, and 0, which switches the loop off.
limit_batches = Rule(
    "a number of batches (an integer >= 0), a fraction in (0, 1], or null",
    lambda v: v == 0 or batch_limit.ok(v),
)
# trainer.devices: a count, "auto", -1 (all) or a list of device indices.
devices = Rule("a positive integer", lambda v: v == "auto" or v == -1 or _is_list(v) or positive_int.ok(v))
precision = one_of("32-true", "32", 32, "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true", "64", 64)
label_map = optional(free_mapping)

# One line per key: the key (or an fnmatch pattern; the first match wins) and its rule.
SCHEMA: dict[str, Rule] = {
    # ---- the run
    "seed": optional(non_negative_int),
    "mode": one_of("train", "evaluate", "predict"),
    "run_dir": non_empty_string,
    "ckpt_path": path,
    "resume": path,
    "resume_allow_config_change": boolean,
    "continue_sweep": boolean,
    "weights": path,
    "checkpoint_every_n_steps": optional(positive_int),
    "experiment_name": optional(string),
    "setting_name": non_empty_string,
    "base_lr": positive_number,
    "final_eval": boolean,
    "slurm_requeue": boolean,
    # ---- Hydra's instantiation keys, anywhere
    "*._target_": target,
    "*._partial_": boolean,
    # ---- module
    "module.base_batch_size": positive_int,
    "module.base_lr": positive_number,
    "module.class_names": optional(class_names),
    "module.channels_last": boolean,
    "module.compile": boolean,
    "module.compile_kwargs": free_mapping,
    "module.cityscapes_eval_workers": optional(non_negative_int),
    "module.model": config_node,
    "module.optimizer": config_node,
    "module.scheduler": config_node,
    # ---- predict
    "predict.input": path,
    "predict.output": non_empty_string,
    "predict.score_threshold": probability,
    "predict.mask_threshold": probability,
    "predict.class_names": optional(Rule("'coco' or a list of names", lambda v: v == "coco" or class_names.ok(v))),
    "predict.label_to_category_id": label_map,
    "predict.coco_json": path,
    "predict.batch_size": positive_int,
    "predict.num_workers": non_negative_int,
    # ---- data: what every data config has
    "data.classes": class_names,
    "data.num_classes": positive_int,
    "data.min_size": sizes,
    "data.max_size": positive_int,
    "data.root": non_empty_string,
    "data.train_json": non_empty_string,
    "data.train_images": non_empty_string,
    "data.val_json": non_empty_string,
    "data.val_images": non_empty_string,
    "data.image_limits.max_pixels": positive_int,
    "data.image_limits.max_aspect_ratio": Rule("a number >= 1", lambda v: _is_number(v) and v >= 1),
    "data.image_limits.min_size": sizes,
    "data.image_limits.max_size": positive_int,
    "data.max_annotations_per_image": optional(positive_int),
    # shapes
    # (ShapesDataset draws shapes of 8 px up to 60% of the image's side: 14 px is the smallest that holds them)
    "data.image_size": Rule("an integer >= 14 (shapes are 8 px or more)", lambda v: _is_int(v) and v >= 14),
    "data.num_train_images": positive_int,
    "data.num_val_images": positive_int,
    "data.max_objects": positive_int,
    # augmentation (configs/data/augmentation/)
    "data.augmentation": optional(config_node),
    "data.augmentation.hflip_prob": probability,
    "data.augmentation.p": probability,
    "data.augmentation.brightness": non_negative_number,
    "data.augmentation.contrast": non_negative_number,
    "data.augmentation.saturation": non_negative_number,
    "data.augmentation.hue": Rule("a number in [0, 0.5]", lambda v: _is_number(v) and 0 <= v <= 0.5),
    "data.augmentation.border_fraction": Rule("a number in [0, 0.5)", lambda v: _is_number(v) and 0 <= v < 0.5),
    "data.augmentation.size": positive_int,
    "data.augmentation.min_scale": positive_number,
    "data.augmentation.max_scale": positive_number,
    # the datamodule and its datasets
    "data.datamodule.batch_size": positive_int,
    "data.datamodule.val_batch_size": optional(positive_int),
    "data.datamodule.num_workers": non_negative_int,
    "data.datamodule.pin_memory": boolean,
    "data.datamodule.persistent_workers": boolean,
    "data.datamodule.aspect_ratio_grouping": boolean,
    "data.datamodule.seed": optional(non_negative_int),
    "data.datamodule.*_dataset.image_dir": non_empty_string,
    "data.datamodule.*_dataset.ann_file": non_empty_string,
    "data.datamodule.*_dataset.root": non_empty_string,
    "data.datamodule.*_dataset.split": non_empty_string,
    "data.datamodule.*_dataset.classes": optional(class_names),
    "data.datamodule.*_dataset.transforms": optional(config_node),
    "data.datamodule.*_dataset.include_crowd": boolean,
    "data.datamodule.*_dataset.drop_images_without_annotations": boolean,
    "data.datamodule.*_dataset.check_files": boolean,
    "data.datamodule.*_dataset.check_sizes": boolean,
    "data.datamodule.*_dataset.image_limits": optional(config_node),
    "data.datamodule.*_dataset.max_annotations_per_image": optional(positive_int),
    "data.datamodule.*_dataset.num_images": positive_int,
    "data.datamodule.*_dataset.image_size": positive_int,
    "data.datamodule.*_dataset.max_objects": positive_int,
    "data.datamodule.*_dataset.seed": optional(non_negative_int),
    # ---- model: the knobs (configs/model/*.yaml) ...
    "model.num_classes": positive_int,
    "model.depth": one_of(18, 34, 50, 101, 152),
    "model.width": positive_int,
    "model.norm": one_of("frozen_bn", "bn", "syncbn", "gn"),
    # The FCN mask head's norm after each conv (mrcnn.modeling.backbone.norm_layer); frozen_bn has no statistics to
    # freeze in a head trained from scratch.
    "model.head_norm": optional(one_of("gn", "bn", "syncbn")),
    "model.trainable_layers": Rule("an integer in [0, 5]", lambda v: _is_int(v) and 0 <= v <= 5),
    "model.backbone_weights": path,
    "model.fpn_channels": positive_int,
    "model.feature_channels": positive_int,
    "model.box_head_dim": positive_int,
    "model.box_head_channels": positive_int,
    "model.mask_head_dim": positive_int,
    "model.mask_mlp_dim": positive_int,
    "model.mask_in_channels": positive_int,
    "model.mask_head_convs": non_negative_int,
    "model.mask_target_form": one_of("soft", "binary"),
    "model.anchor_sizes": list_of(positive_int),
    "model.net.rpn.aspect_ratios": list_of(positive_number),
    "model.net.roi_heads.positive_fraction": fraction,
    # RoI counts the heads' inputs are padded to (null: no padding).
    "model.roi_buckets": optional(list_of(positive_int)),
    "model.net.roi_heads.roi_buckets": optional(list_of(positive_int)),
    # RPN proposals filtered for all images at once (no host sync per image).
    "model.batched_proposals": boolean,
    "model.net.rpn.batched_proposals": boolean,
    # Anchors matched and sampled for all images at once (no host sync per image).
    "model.batched_sampling": boolean,
    "model.net.rpn.batched_sampling": boolean,
    "model.net.roi_heads.batched_sampling": boolean,
    # FrozenBatchNorm2d returns its input's dtype (bf16 activations under autocast).
    "model.frozen_bn_keeps_dtype": boolean,
    "model.net.frozen_bn_keeps_dtype": boolean,
    # FrozenBatchNorm2d folded into the convolution before it.
    "model.fold_frozen_bn": boolean,
    "model.net.fold_frozen_bn": boolean,
    "model.canonical_scale": positive_int,
    "model.rois_per_image": positive_int,
    "model.neck_rois_per_image": positive_int,
    "model.detections_per_img": positive_int,
    "model.box_score_thresh": probability,
    "model.rpn_*_nms_top_n_*": positive_int,
    "model.neck_post_nms_top_n_test": positive_int,
    "model.box_resolution": positive_int,
    "model.mask_resolution": positive_int,
    "model.featmap_names": list_of(non_empty_string),
    # ... and the network they build (model.net: mostly interpolations of the knobs above)
    "model.net.min_size": sizes,
    "model.net.max_size": positive_int,
    "model.net.backbone.depth": one_of(18, 34, 50, 101, 152),
    "model.net.*.norm": optional(one_of("frozen_bn", "bn", "syncbn", "gn")),
    "model.net.*.width": positive_int,
    "model.net.*.weights_path": path,
    "model.net.backbone.trainable_layers": Rule("an integer in [0, 5]", lambda v: _is_int(v) and 0 <= v <= 5),
    "model.net.*.out_channels": positive_int,
    "model.net.*.in_channels": positive_int,
    "model.net.rpn.anchor_sizes": list_of(list_of(positive_int)),
    "model.net.rpn.*_nms_top_n_*": positive_int,
    "model.net.roi_heads.batch_size_per_image": positive_int,
    "model.net.roi_heads.score_thresh": probability,
    "model.net.roi_heads.detections_per_img": positive_int,
    "model.net.roi_heads.mask_target_form": one_of("soft", "binary"),
    "model.net.roi_heads.aligned_mask_targets": boolean,
    "model.net.roi_heads.*resolution": positive_int,
    "model.net.roi_heads.*.num_classes": positive_int,
    "model.net.roi_heads.box_head.depth": one_of(18, 34, 50, 101, 152),
    "model.net.roi_heads.box_head.representation_size": positive_int,
    "model.net.roi_heads.mask_head.conv_dim": positive_int,
    "model.net.roi_heads.mask_head.num_convs": non_negative_int,
    "model.net.roi_heads.mask_head.hidden_dims": list_of(positive_int),
    "model.net.roi_heads.mask_head.class_agnostic": boolean,
    "model.net.roi_heads.pooler.sampling_ratio": Rule("an integer >= -1", lambda v: _is_int(v) and v >= -1),
    "model.net.roi_heads.pooler.aligned": boolean,
    "model.net.roi_heads.pooler.mode": one_of("avg", "max"),
    "model.net.roi_heads.pooler.canonical_scale": positive_int,
    "model.net.roi_heads.pooler.featmap_names": list_of(non_empty_string),
    # ---- optimizer and schedule
    "optimizer.lr": positive_number,
    "optimizer.momentum": non_negative_number,
    "optimizer.weight_decay": non_negative_number,
    "scheduler.warmup_steps": non_negative_int,
    "scheduler.warmup_factor": positive_number,
    "scheduler.milestones": optional(milestones),  # null with scheduler=warmup_step_at (milestone_steps)
    "scheduler.milestone_steps": Rule(
        "a list of increasing optimizer steps (integers >= 1)",
        lambda v: list_of(positive_int, non_empty=False).ok(v) and list(v) == sorted(v),
    ),
    "scheduler.gamma": positive_number,
    # ---- trainer (Lightning's Trainer arguments; max_epochs / max_steps: _length_problems)
    "trainer.accelerator": one_of("cpu", "gpu", "cuda", "mps", "tpu", "auto"),
    "trainer.devices": devices,
    "trainer.num_nodes": positive_int,
    "trainer.strategy": non_empty_string,
    "trainer.precision": precision,
    "trainer.benchmark": optional(boolean),
    "trainer.sync_batchnorm": boolean,
    # Lightning's: true, or "warn" (deterministic algorithms where torch has them, a warning where it has none).
    "trainer.deterministic": optional(Rule("true, false or 'warn'", lambda v: isinstance(v, bool) or v == "warn")),
    "trainer.use_distributed_sampler": boolean,
    "trainer.max_epochs": any_value,
    "trainer.max_steps": any_value,
    "trainer.max_time": optional(non_empty_string),
    "trainer.accumulate_grad_batches": positive_int,
    "trainer.log_every_n_steps": positive_int,
    "trainer.check_val_every_n_epoch": optional(positive_int),
    "trainer.val_check_interval": batch_limit,
    "trainer.limit_train_batches": limit_batches,
    "trainer.limit_val_batches": limit_batches,
    "trainer.num_sanity_val_steps": Rule("an integer >= -1", lambda v: _is_int(v) and v >= -1),
    "trainer.gradient_clip_val": optional(non_negative_number),
    "trainer.default_root_dir": non_empty_string,
    "trainer.enable_model_summary": boolean,
    "trainer.enable_progress_bar": boolean,
    # ---- loggers (configs/logger/) and callbacks (configs/callbacks/): their own classes' arguments
    "logger.*.save_dir": non_empty_string,
    "logger.csv.name": string,
    "logger.csv.version": optional(Rule("a string or an integer", lambda v: isinstance(v, (str, int)))),
    "logger.csv.flush_logs_every_n_steps": positive_int,
    "logger.wandb.project": non_empty_string,
    "logger.wandb.entity": optional(string),
    "logger.wandb.group": optional(string),
    "logger.wandb.job_type": optional(string),
    "logger.wandb.name": optional(string),
    "logger.wandb.mode": optional(one_of("online", "offline", "disabled")),
    "logger.wandb.tags": optional(list_of(string, non_empty=False)),
    "logger.wandb.log_model": one_of(True, False, "all"),
    "logger.wandb.id": optional(string),
    "callbacks.*.dirpath": non_empty_string,
    "callbacks.cost_estimate.step_time_s": optional(positive_number),
    "callbacks.cost_estimate.step_time_note": optional(string),
    "callbacks.cost_estimate.measure_steps": positive_int,
    "callbacks.cost_estimate.every_n_steps": optional(positive_int),
    "callbacks.best_checkpoint.filename": non_empty_string,
    "callbacks.best_checkpoint.auto_insert_metric_name": boolean,
    "callbacks.best_checkpoint.monitor": optional(non_empty_string),
    "callbacks.best_checkpoint.mode": one_of("min", "max"),
    "callbacks.best_checkpoint.save_top_k": Rule("an integer >= -1", lambda v: _is_int(v) and v >= -1),
    "callbacks.best_checkpoint.save_last": optional(boolean),
    "callbacks.last_checkpoint.every_n_train_steps": optional(positive_int),
    "callbacks.last_checkpoint.slurm_requeue": boolean,
    "callbacks.throughput.window": positive_int,
    "callbacks.prediction_overlays.num_images": non_negative_int,
    "callbacks.prediction_overlays.score_threshold": probability,
}


def rule_for(key: str) -> Rule | None:
    """The rule of a dotted key: its own line of :data:`SCHEMA`, else the first pattern that matches it."""
    if key in SCHEMA:
        return SCHEMA[key]
    return next((rule for pattern, rule in SCHEMA.items() if fnmatch.fnmatchcase(key, pattern)), None)


def config_keys(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, bool]]:
    """Every key of ``cfg`` in order, dotted, with whether its value is written there (not an interpolation).

    A mapping that is not an interpolation is walked into (and also yielded when it is empty); lists are values.
    """
    for key in cfg.keys():
        node = cfg._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(node, DictConfig) and not node._is_interpolation() and not node._is_none():
            if not node._is_missing() and len(node) > 0:
                if SCHEMA.get(name) in (free_mapping, label_map):  # free-form keys: checked as one value
                    yield name, True
                    continue
                yield from config_keys(node, f"{name}.")
                continue
        yield name, not node._is_interpolation()


def keys_without_rule(cfg: DictConfig) -> list[str]:
    """The keys of ``cfg`` that :data:`SCHEMA` has no rule for (``hydra`` aside)."""
    return [key for key, _ in config_keys(cfg) if not key.startswith("hydra.") and rule_for(key) is None]


def _value(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _length_problems(cfg: DictConfig) -> list[str]:
    """``trainer.max_epochs`` and ``trainer.max_steps``: Lightning's -1 means no limit, but one of them must limit."""
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None, throw_on_resolution_failure=False)
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1, throw_on_resolution_failure=False)
    problems = []
    if not (max_steps == -1 or (_is_int(max_steps) and max_steps > 0)):
        problems.append(f"trainer.max_steps={max_steps}: must be a positive integer, or -1 for no step limit")
    if max_epochs == -1:
        if max_steps == -1:
            problems.append("trainer.max_epochs=-1: no epoch limit needs a positive trainer.max_steps")
    elif max_epochs is not None and positive_int(max_epochs):
        problems.append(f"trainer.max_epochs={max_epochs}: must be a positive integer (or -1 with a trainer.max_steps)")
    return problems


def config_problems(cfg: DictConfig, keys: Sequence[str] | None = None, on_this_machine: bool = True) -> list[str]:
    """One line per bad value, ``<key>=<value>: <what it must be>``; empty when all are good.

    Args:
        keys: check only these keys (default: every key written in ``cfg`` that has a rule).
        on_this_machine: whether the job runs here; where it does not (a SLURM sweep checked where it is submitted),
            what an interpolation reads from the environment (``${oc.env:SLURM_TMPDIR}``) is the job's machine's,
            and is not checked.
    """
    problems = []
    written = [key for key, literal in config_keys(cfg) if literal] if keys is None else list(keys)
    bad = set()
    for key in written:
        rule = rule_for(key)
        if rule is None or key.startswith("hydra."):
            continue
        try:
            value = _value(cfg, key)
        except Exception as error:  # noqa: BLE001  (a list that holds an interpolation: [circle, ${oc.env:X}])
            unresolved = _unresolved(key, _written_text(cfg, key), error, on_this_machine)
            problems += [unresolved] if unresolved else []
            bad.add(key)
            continue
        if value is _ABSENT or value == "???":
            continue
        problem = rule(value)
        if problem:
            problems.append(f"{key}={value}: {problem}")
            bad.add(key)
    if keys is None:
        problems += _interpolation_problems(cfg, bad, on_this_machine)
    problems += _length_problems(cfg) + _model_problems(cfg) + _trainer_problems(cfg)
    return problems + _target_problems(cfg, written)


# Lightning's strategies that start the processes again from a pickled Trainer (spawn, fork): a Hydra job's config,
# loggers and run folder are not rebuilt there, and the run fails at its end. trainer=ddp / ddp_cpu start each
# process as a command (Lightning's "ddp"), which mrcnn.engine.launch pins to the job.
_SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")


def _trainer_problems(cfg: DictConfig) -> list[str]:
    """Trainer settings that each pass their own rule and fail once the run has started."""
    problems = []
    strategy = OmegaConf.select(cfg, "trainer.strategy", default=None, throw_on_resolution_failure=False)
    if isinstance(strategy, str) and strategy.startswith(_SPAWNING_STRATEGIES):
        problems.append(
            f"trainer.strategy={strategy}: this project starts DDP processes as commands (Lightning's ddp): use "
            "trainer=ddp (GPUs) or trainer=ddp_cpu (CPU processes), with trainer.devices=<processes>"
        )
    devices = OmegaConf.select(cfg, "trainer.devices", default=None, throw_on_resolution_failure=False)
    on_cpu = OmegaConf.select(cfg, "trainer.accelerator", default=None, throw_on_resolution_failure=False) == "cpu"
    if on_cpu and isinstance(strategy, str) and strategy.startswith("ddp") and devices in ("auto", -1):
        problems.append(
            f"trainer.devices={devices}: on the CPU Lightning takes it for one process, and DDP would have nothing to "
            "share: give the number of processes (trainer=ddp_cpu trainer.devices=<n>)"
        )
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="", throw_on_resolution_failure=False))
    if precision in ("16-true", "bf16-true") and on_cpu:
        problems.append(
            f"trainer.precision={precision}: torchvision's nms has no CPU kernel for half precision: on the CPU "
            "use 32-true (the default) or bf16-mixed"
        )
    return problems


# An interpolation that only repeats another key's value (``${data.min_size}``): that value is checked at the key it
# is written at, so only the key being there is checked here. The project's own resolvers (``${mrcnn.len:...}``) make
# a value from keys checked where they are written, and some import torch: they are left to the build. Any other
# (``${oc.env:MIN_SIZE}``, ``x_${seed}``) makes its value at its own key, and is checked there.
_REFERENCE = re.compile(r"\$\{(\w[\w.]*)\}")  # also finds the keys an interpolation reads


def _written_text(cfg: DictConfig, key: str) -> str:
    """The value of ``key`` as the config writes it (``${oc.env:X}``, ``[circle, ${oc.env:X}]``), not resolved."""
    parent, _, name = key.rpartition(".")
    node = (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(name)
    if OmegaConf.is_config(node) and not node._is_interpolation():
        return str(OmegaConf.to_container(node, resolve=False)).replace("'", "")
    return str(node._value())


def _unresolved(key: str, text: str, error: Exception, on_this_machine: bool) -> str | None:
    """The problem of ``key`` whose value ``text`` could not be resolved (``error``), or None where that is not the
    config's mistake, or not one to find here."""
    from omegaconf.errors import InterpolationToMissingValueError

    if isinstance(error, InterpolationToMissingValueError):
        return None  # a key not set (???) is named where it is written (path_problems, Hydra)
    if not _hydra_job_known() and "HydraConfig was not set" in str(error):
        return None  # checked outside a Hydra job (a notebook's compose_config): its folder is not known here
    if _raised_by(error, OSError):
        return None  # a resolver that reads a file not there: path_problems names the file
    if not on_this_machine:
        return None  # the environment the job reads is another machine's
    return f"{key}={text}: cannot be resolved ({str(error).splitlines()[0]})"


def _interpolation_problems(cfg: DictConfig, bad: set[str], on_this_machine: bool = True) -> list[str]:
    """Problems of the keys whose value is an interpolation (see :data:`_REFERENCE`): one that reads a key not there,
    one that cannot be resolved (an environment variable not set), one that makes a value breaking its rule. A key
    that reads a key with a problem (``bad``, or found here) is left out: its problem is that key's."""
    found: dict[str, str] = {}  # key -> its problem
    reads: dict[str, list[str]] = {}  # key -> the keys its interpolation reads
    for key, literal in config_keys(cfg):
        rule = rule_for(key)
        if literal or rule is None or key.startswith("hydra."):
            continue
        text = _written_text(cfg, key)
        reads[key] = _REFERENCE.findall(text)
        reference = _REFERENCE.fullmatch(text)
        if reference is not None:
            node = _node_at(cfg, reference.group(1))
            if node is None:
                found[key] = f"{key}={text}: cannot be resolved (there is no key {reference.group(1)})"
            elif node is not _UNKNOWN and not node._is_interpolation() and not node._is_missing():
                # A value written there is checked by this key's rule too (a list, unless it holds interpolations).
                value = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node._value()
                problem = None if "${" in repr(value) else rule(value)
                if problem:
                    found[key] = f"{key}={text}, which is {value!r}: {problem}"
            continue
        if "${mrcnn." in text or not on_this_machine:
            continue  # (not on this machine: what it makes may come from the environment of the job's machine)
        try:
            value = _value(cfg, key)
        except Exception as error:  # noqa: BLE001  (any: a resolver's own error)
            unresolved = _unresolved(key, text, error, on_this_machine)
            if unresolved:
                found[key] = unresolved
            continue
        problem = None if value is _ABSENT else rule(value)
        if problem:
            found[key] = f"{key}={text}, which is {value!r}: {problem}{_decode_hint(key, text, rule, value)}"
    with_problem = bad | set(found)

    def reads_a_problem(key: str) -> bool:
        return any(r == b or b.startswith(f"{r}.") or r.startswith(f"{b}.") for r in reads[key] for b in with_problem)

    return [problem for key, problem in found.items() if not reads_a_problem(key)]


_UNKNOWN = object()


def _node_at(cfg: DictConfig, key: str):
    """The node at dotted ``key`` without resolving anything; None when it is not there, :data:`_UNKNOWN` when the
    path goes through an interpolation or a list (it can only be known by resolving)."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or node._is_interpolation() or node._is_none() or node._is_missing():
            return _UNKNOWN
        try:
            node = node._get_node(part, throw_on_missing_key=True)
        except (KeyError, AttributeError):  # (omegaconf's ConfigKeyError, ConfigAttributeError)
            return None
    return node


def _decode_hint(key: str, text: str, rule: Rule, value) -> str:
    """A hint for a string that, read as YAML, would follow ``rule``: ``${oc.env:...}`` always gives a string."""
    if not isinstance(value, str):
        return ""
    try:
        decoded = yaml.safe_load(value)
    except yaml.YAMLError:
        return ""
    if isinstance(decoded, str) or rule(decoded) is not None:
        return ""
    # Quoted: Hydra's override grammar does not take an interpolation nested in another one unquoted.
    return f" (a string, as oc.env gives: {key}='${{oc.decode:{text}}}' reads it as a number or a list)"


def _raised_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error``, or an error it was raised while handling, is a ``kind``."""
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__context__
    return False


def _hydra_job_known() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized()


def _target_problems(cfg: DictConfig, keys: Sequence[str]) -> list[str]:
    """``_target_`` values that name nothing: Hydra would say "Error locating target" only once torch and Lightning
    have loaded, naming the key where the object is built, not where it is written."""
    problems = []
    for key in keys:
        if not key.endswith("._target_"):
            continue
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, str) and "." in value:
            problem = target_problem(value)
            if problem:
                problems.append(f"{key}={value}: {problem}")
    return problems


def _target(cfg: DictConfig, key: str) -> str:
    """The class or function name a ``_target_`` under ``key`` builds (``""`` where there is none)."""
    target = OmegaConf.select(
        cfg, f"{key}._target_", default=None, throw_on_missing=False, throw_on_resolution_failure=False
    )
    return str(target).rpartition(".")[2] if target else ""


def _model_problems(cfg: DictConfig) -> list[str]:
    """Combinations of the model's switches that each pass their own rule and would fail in the first step, deep in
    torch (a shape mismatch): the RoI heads that go with the backbone, and one anchor size for each FPN map."""
    backbone = _target(cfg, "model.net.backbone")
    if backbone not in ("resnet_c4", "resnet_c5", "resnet_fpn"):
        return []  # a backbone of a user's own: its pairing is its author's
    problems = []
    res5_heads = _target(cfg, "model.net.roi_heads") == "Res5RoIHeads"
    if res5_heads != (backbone == "resnet_c4"):
        problems.append(
            f"model/roi_heads={'res5' if res5_heads else 'standard'} does not go with the {backbone} backbone: res5 "
            "(res5 as the box head on the stride-16 map) goes with model/backbone=c4 only, standard with fpn and c5. "
            "Leave model/roi_heads out: each model/backbone picks its own"
        )
    if backbone == "resnet_fpn":
        sizes = OmegaConf.select(
            cfg, "model.anchor_sizes", default=None, throw_on_missing=False, throw_on_resolution_failure=False
        )
        names = OmegaConf.select(
            cfg, "model.featmap_names", default=None, throw_on_missing=False, throw_on_resolution_failure=False
        )
        if _is_list(sizes) and _is_list(names) and len(sizes) != len(names) + 1:
            problems.append(
                f"model.anchor_sizes={list(sizes)}: FPN's RPN has {len(names) + 1} maps (P2-P{len(names) + 2}), one "
                f"anchor size each: give {len(names) + 1} sizes, smallest first (C4 and C5 take any number)"
            )
    return problems


def validation_schedule_note(cfg: DictConfig) -> str | None:
    """What an epoch-limited run's validation schedule leaves out of the best checkpoint, if anything.

    Lightning validates every ``trainer.check_val_every_n_epoch`` epochs: when that does not divide
    ``trainer.max_epochs``, the last epochs' weights are never compared (the final evaluation scores them, after
    training), and a run shorter than the interval never validates, so ``callbacks.best_checkpoint`` writes nothing.
    """
    every = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch", default=None)
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    if OmegaConf.select(cfg, "callbacks.best_checkpoint", default=None) is None or steps not in (-1, None):
        return None
    if not (_is_int(every) and _is_int(epochs) and every > 0 and epochs > 0) or epochs % every == 0:
        return None
    way = f"set trainer.check_val_every_n_epoch to a divisor of {epochs}"
    if epochs < every:
        return (
            f"trainer.max_epochs={epochs} is shorter than trainer.check_val_every_n_epoch={every}: the run never "
            f"validates while training, so no best checkpoint is written (last.ckpt and the final evaluation are); {way}"
        )
    last = epochs - epochs % every
    return (
        f"trainer.check_val_every_n_epoch={every} does not divide trainer.max_epochs={epochs}: the last validation "
        f"while training is at epoch {last}, so the best checkpoint is chosen without epochs {last + 1}-{epochs} "
        f"(the final evaluation scores the last weights); {way}"
    )


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
        if path is None:
            continue
        if os.path.exists(path):
            # A folder given for the json (data.train_json=train/) or a file for a folder: said as such, not left to
            # fail later as a file "not found".
            wants_file = key.endswith(".ann_file")
            if wants_file and os.path.isdir(path):
                problems.append(f"{key}={path} ({written}) is a folder; it must be a COCO json file")
            elif not wants_file and not os.path.isdir(path):
                problems.append(f"{key}={path} ({written}) is a file; it must be a folder")
            continue
        if "${data.root}/" in written:
            lacking.append(written.replace("${data.root}/", ""))
        else:
            problems.append(f"{key}={path} ({written}): no such file or folder")
    if lacking:
        problems.insert(0, f"data.root={root} lacks {', '.join(dict.fromkeys(lacking))}; it must hold {layout}")
    return problems


def path_problems(cfg: DictConfig) -> list[str]:
    """One line per input file or folder that is not set, not there, or a folder where a file belongs (or the
    reverse): the data (its root, and every file and folder its datasets read) and the weights files; empty when all
    are there."""
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
        elif value is not None and os.path.isdir(value):
            problems.append(f"{key}={value} is a folder; it must be a file: {holds}")
        elif value is not None and not os.path.isfile(value):
            problems.append(f"{key}={value}: no such file; it must be {holds}")
    return problems


def checkpoint_path(cfg: DictConfig) -> str | None:
    """The Lightning checkpoint to start from: ``ckpt_path``, or ``<resume>/checkpoints/last.ckpt``; in a training
    job SLURM requeued, its own folder's ``last.ckpt`` when there is one (:func:`requeued_checkpoint`).

    Raises:
        ValueError: both ``ckpt_path`` and ``resume`` are given.
        FileNotFoundError: ``resume`` has no ``checkpoints/last.ckpt``; the message says why it may be
            missing and what to do.
    """
    if cfg.get("resume"):
        if cfg.get("ckpt_path"):
            raise ValueError("give either ckpt_path=<file> or resume=<run dir>, not both")
        problem = resume_problem(cfg.resume)
        if problem:
            raise FileNotFoundError(problem)
    start = start_checkpoint(
        cfg.run_dir, cfg.get("mode", "train"), cfg.get("resume"), cfg.get("ckpt_path"), started_again(cfg)
    )
    return None if start is None else str(start)


def start_checkpoint(
    run_dir: str | Path, mode: str, resume: str | None, ckpt_path: str | None, again: bool | None = None
) -> str | Path | None:
    """The checkpoint a job starts from, unchecked: in a training job started again (:func:`started_again`), its
    folder's ``last.ckpt`` when there is one (:func:`requeued_checkpoint`); else ``<resume>/checkpoints/last.ckpt``;
    else ``ckpt_path``."""
    requeued = requeued_checkpoint(run_dir, mode, again)
    if requeued is not None:
        return requeued
    return resume_checkpoint(resume) if resume else ckpt_path


def started_again(cfg: DictConfig) -> bool:
    """Whether this job is one started again with the same command, in its own folder, to go on with its run: SLURM
    requeued it (:func:`slurm_restart_count`), or it is a job of a sweep continued with ``continue_sweep=true``."""
    return slurm_restart_count() > 0 or bool(cfg.get("continue_sweep"))


def resume_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint ``resume=<run_dir>`` continues from: the run's ``checkpoints/last.ckpt``."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The latest of a run's checkpoints (``checkpoints/*.ckpt``): by the step in their names where each names one
    (``epoch9-step90``, Lightning's ``epoch=9-step=90``), else by when they were written; ``None`` if it has none.

    By name as text ``epoch10-step100`` would come before ``epoch9-step90``; by time alone a copied folder would order
    its files by when they were copied.
    """
    checkpoints = [path for path in (Path(run_dir) / "checkpoints").glob("*.ckpt") if path.is_file()]
    steps = [re.findall(r"step=?(\d+)", path.stem) for path in checkpoints]
    if checkpoints and all(steps):
        return max(zip(checkpoints, steps), key=lambda pair: (int(pair[1][-1]), pair[0].stat().st_mtime_ns))[0]
    return max(checkpoints, key=lambda path: path.stat().st_mtime_ns, default=None)


def slurm_restart_count() -> int:
    """How many times SLURM has requeued this job (``SLURM_RESTART_COUNT``): 0 outside SLURM and in a first start."""
    value = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(value) if value.isdigit() else 0


def requeued_checkpoint(run_dir: str | Path, mode: str, again: bool | None = None) -> Path | None:
    """The checkpoint a training job continues from when SLURM has requeued it: its own folder's ``last.ckpt``.

    SLURM starts a requeued job (preempted, or requeued by ``mrcnn.engine.launch.requeue_after_stop`` before its
    time limit) with the same command, so it names the same folder (``hydra.run.dir``, or a sweep job's folder) and
    the same ``resume`` / ``ckpt_path`` as its first start. What it must continue from is the newest state of its own run,
    the ``last.ckpt`` its stop saved, not the file it started from the first time. ``None`` outside a requeued job,
    in ``mode=evaluate`` / ``predict``, and where the folder holds no ``last.ckpt`` (the job was stopped before its
    first save, or its folder is new: one named by the time it started).

    The same for a job of a sweep continued with ``continue_sweep=true`` (``again``; ``None``: requeued by SLURM).
    """
    if again is None:
        again = slurm_restart_count() > 0
    if mode != "train" or not again:
        return None
    path = resume_checkpoint(run_dir)
    return path if path.is_file() else None


def resume_problem(resume: str | Path) -> str | None:
    """Why ``resume=<resume>`` has nothing to continue from (no ``checkpoints/last.ckpt``), and what to do; ``None``
    where it has."""
    path = resume_checkpoint(resume)
    if path.is_file():
        return None
    return f"resume={resume}: there is no {path}. {_why_no_last_checkpoint(Path(resume))}"


def _why_no_last_checkpoint(run_dir: Path) -> str:
    """What a missing ``<run_dir>/checkpoints/last.ckpt`` means, and what to do about it."""
    if run_dir.is_file():
        return f"resume= takes the folder of a run, and this is a file: to start from a checkpoint, use ckpt_path={run_dir}."
    if not run_dir.is_dir():
        return "resume= takes the folder of a run (outputs/<date>/<time>, or a sweep job's folder), and this is none."
    if not (run_dir / ".hydra").is_dir():
        return "It is not the folder of a run (that has .hydra/ and checkpoints/): check the path."
    hint = (
        "The run stopped before it saved its first checkpoint (last.ckpt is written at every epoch end, every "
        "checkpoint_every_n_steps steps, and when a run is stopped with Ctrl-C or SIGTERM): start it again "
        "without resume=, in a new folder (without hydra.run.dir)."
    )
    newest = newest_checkpoint(run_dir)
    if newest is not None:
        hint += f" Or start from its newest checkpoint: ckpt_path={newest}."
    return hint


def check_config(cfg: DictConfig, on_this_machine: bool = True) -> None:
    """Stops before anything is built when a value of the config breaks its rule in :data:`SCHEMA`, or an input
    file or folder is not set or not there.

    Args:
        on_this_machine: whether the job runs on this machine. When it does not (a SLURM sweep checked on the
            machine that submits it), only the config's values are checked: its files and GPUs are another
            machine's.

    Raises:
        ValueError: listing every bad key with its value and what it must be; or evaluate / predict without a
            checkpoint or weights to start from (predict: or without its input).
        FileNotFoundError: listing every missing data folder, data file and weights file, with its key; or the
            checkpoint to start from is not there (:func:`checkpoint_path` says why a run folder may lack one).
    """
    problems = config_problems(cfg, on_this_machine=on_this_machine)
    if problems:
        raise ValueError("invalid config values:\n  " + "\n  ".join(problems))
    if not on_this_machine:
        return
    missing = path_problems(cfg)
    if missing:
        raise FileNotFoundError("missing input:\n  " + "\n  ".join(missing))
    start = checkpoint_path(cfg)
    if start is not None:
        check_regular_file(start, "ckpt_path file")
    mode = cfg.get("mode")
    if mode in ("evaluate", "predict") and start is None and not cfg.get("weights"):
        raise ValueError(
            f"mode={mode} needs ckpt_path=<Lightning checkpoint>, resume=<run dir> or weights=<torchvision file>"
        )
    if mode == "predict":
        source = OmegaConf.select(cfg, "predict.input", default=None)
        if not source:
            raise ValueError("mode=predict needs predict.input=<image file or folder>")
        if not os.path.exists(source):
            raise FileNotFoundError(f"predict.input={source} is neither an image file nor a folder")
        output = OmegaConf.select(cfg, "predict.output", default=None)
        if output and os.path.isdir(source) and os.path.realpath(output) == os.path.realpath(source):
            # A second run would take the first one's overlays (<name>.png) for images to predict on.
            raise ValueError(f"predict.output={output} is the input folder: write the predictions to another folder")
        coco_json = OmegaConf.select(cfg, "predict.coco_json", default=None)
        if coco_json is not None:
            check_regular_file(coco_json, "predict.coco_json file")
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default=None)
    if accelerator not in ("gpu", "cuda"):
        return
    import torch  # only for this check: run.py checks the config before torch is loaded

    # Lightning's "gpu" is CUDA, or Apple's MPS where there is no CUDA.
    has_gpu = torch.cuda.is_available() or (accelerator == "gpu" and torch.backends.mps.is_available())
    if not has_gpu:
        # Lightning's own message ("No supported gpu backend found!") names neither the switch nor the way out.
        raise RuntimeError(
            f"trainer.accelerator={accelerator} (trainer=gpu or trainer=ddp; setting=gpu and setting=paper choose "
            f"them) needs a GPU, and torch sees none (torch {torch.__version__}, CUDA build {torch.version.cuda}). "
            "Leave trainer= and setting= out to train on the CPU (trainer=ddp_cpu for several CPU processes)."
        )
