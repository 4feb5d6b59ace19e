"""What a run starts from: a Lightning checkpoint to resume (``ckpt_path`` / ``resume``) or weights to load."""

import importlib
import inspect
import logging
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mrcnn.config import override_key
from mrcnn.engine.config_checks import requeued_checkpoint, started_again
from mrcnn.engine.model_record import (
    MODEL_RECORD_KEY,
    ModelRecord,
    check_classes,
    read_checkpoint,
    set_frozen_bn_eps,
)
from mrcnn.errors import CommandError
from mrcnn.modeling.mask_rcnn import load_torchvision_weights

log = logging.getLogger(__name__)


# ---- what a checkpoint says about its run, and the resume check --------------------------------------

# Where mrcnn.engine.callbacks.RunRecord writes the run's resolved config, overrides and W&B run id in a checkpoint.
RUN_RECORD_KEY = "mrcnn_run"

# Keys a resumed run may change without resume_allow_config_change: the length of training, and what does not
# change the weights it trains (paths, logging and checkpointing, loader processes, speed switches, how often it
# validates). A key matches itself and everything under it.
RESUME_FREE_KEYS = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "run_dir",
    "resume",
    "ckpt_path",
    "resume_allow_config_change",
    "continue_sweep",
    "mode",
    "final_eval",
    "weights",  # the checkpoint's weights replace them
    "experiment_name",
    "checkpoint_every_n_steps",
    "slurm_requeue",
    "predict",
    "logger",
    "callbacks",
    "data.datamodule.num_workers",
    "data.datamodule.pin_memory",
    "data.datamodule.persistent_workers",
    "module.channels_last",
    # Only the rounding of bf16 activations (bit-identical in float32), as channels_last only the order of sums.
    "model.frozen_bn_keeps_dtype",
    "model.net.frozen_bn_keeps_dtype",
    "module.model.frozen_bn_keeps_dtype",  # module.model is model.net
    # Only the rounding of the convolution and its norm (the weights, buffers and state dict are the same).
    "model.fold_frozen_bn",
    "model.net.fold_frozen_bn",
    "module.model.fold_frozen_bn",
    "module.compile",
    "module.compile_kwargs",
    "trainer.accelerator",
    "trainer.benchmark",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.check_val_every_n_epoch",
    "trainer.val_check_interval",
    "trainer.num_sanity_val_steps",
    "trainer.max_time",
    "trainer.limit_val_batches",
    "data.datamodule.val_batch_size",
    "module.cityscapes_eval_workers",
)


@dataclass
class ResumedRun:
    """What a training checkpoint says about the run it continues.

    Attributes:
        checkpoint: the checkpoint file.
        global_step: the optimizer steps it was saved at.
        run_dir: the run's folder as it trained there (its config's ``run_dir``; else :attr:`folder`): the paths
            of its saved config are relative to it.
        config: the resolved config the run was trained with; ``None`` in checkpoints that predate it.
        overrides: the run's command-line overrides; ``None`` when unknown.
        wandb_run_id: the id of its W&B run; ``None`` without W&B.
        wandb_labels: that run's ``name``, ``group`` and ``tags`` (those it had); ``None`` in checkpoints that
            predate them.
        folder: where the run's files are now: the checkpoint's grandparent (``<run folder>/checkpoints/<file>``),
            which differs from ``run_dir`` when the folder was moved or copied since; else ``run_dir``.
    """

    checkpoint: Path
    global_step: int
    run_dir: Path
    config: dict | None = None
    overrides: list[str] | None = None
    wandb_run_id: str | None = None
    wandb_labels: dict | None = None
    folder: Path | None = None

    def __post_init__(self) -> None:
        if self.folder is None:
            self.folder = self.run_dir


def _holds_tensors(value, depth: int = 0) -> bool:
    """Whether a loaded file holds tensors (weights), in its mappings at any depth."""
    if isinstance(value, torch.Tensor):
        return True
    return depth < 8 and isinstance(value, Mapping) and any(_holds_tensors(v, depth + 1) for v in value.values())


def read_resumed_run(path: str | Path) -> ResumedRun:
    """Reads what :class:`ResumedRun` holds from a Lightning checkpoint, without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"there is no checkpoint file {path}")
    # mmap: the tensors stay on disk; only the small objects around them are read. A checkpoint of this
    # project holds more than tensors (loops, callbacks), hence weights_only=False: resume only your own files.
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # noqa: BLE001  (torch raises KeyError, RuntimeError, EOFError... on garbage)
        raise CommandError(
            f"checkpoint {path} is not a PyTorch checkpoint, or it is damaged or truncated "
            f"({type(error).__name__} while reading it)"
        ) from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= checkpoint.keys():
        # A plain state dict (torchvision's .pth, a model.state_dict()) would reach Lightning's fit, after the data
        # and the model are built, and stop there with a KeyError.
        raise CommandError(
            f"ckpt_path={path} is not a Lightning checkpoint (it has no 'state_dict' and 'pytorch-lightning_version'), "
            "so there is no run to resume"
            + (f"; to start training from its weights use weights={path}" if _holds_tensors(checkpoint) else "")
        )
    record = checkpoint.get(RUN_RECORD_KEY) or {}
    config = record.get("config")
    # A run's checkpoints are <run folder>/checkpoints/*.ckpt (callbacks.last_checkpoint, best_checkpoint): the folder
    # they are in now, whatever path the run trained at (a folder moved or copied since keeps its files).
    parent = path.resolve().parent
    here = parent.parent if parent.name == "checkpoints" else None
    run_dir = Path(config["run_dir"]) if config and config.get("run_dir") else parent.parent
    return ResumedRun(
        checkpoint=path,
        global_step=int(checkpoint.get("global_step", 0)),
        run_dir=run_dir,
        config=config,
        overrides=record.get("overrides"),
        wandb_run_id=record.get("wandb_run_id"),
        wandb_labels=record.get("wandb_labels"),
        folder=here or run_dir,
    )


def config_changes(
    saved: dict, current: dict, saved_run_dir: str, current_run_dir: str, unresolved: dict | None = None
) -> list[str]:
    """``<key>: <saved> -> <current>`` for each key that differs, but for :data:`RESUME_FREE_KEYS`.

    Paths inside each run's own folder are compared relative to it, so a run resumed into a new folder
    differs from its original only where it really does. A key the saved config lacks is no change when it
    builds what the older run built: an argument of a ``_target_`` at its default, or (with ``unresolved``, the
    current config before interpolation) a key whose every use (``${key}``) is such an argument.
    """
    old = flatten_config(_relative_to_run_dir(saved, str(saved_run_dir)))
    new = flatten_config(_relative_to_run_dir(current, str(current_run_dir)))
    uses = _interpolations(unresolved) if unresolved is not None else {}
    absent = "<absent>"
    changed = [
        key
        for key in sorted(old.keys() | new.keys())
        if not is_resume_free_key(key)
        and old.get(key, absent) != new.get(key, absent)
        and not (key not in old and _builds_the_default(current, key, new[key], uses))
    ]
    # A key that only repeats another changed key (data.min_size: ${data.image_size}; module.model: ${model.net}, a
    # whole node) is that change again: each change is named once, where it is written.
    written = flatten_config(unresolved) if unresolved is not None else {}
    changed = [key for key in changed if not _repeats_a_change(key, written, set(changed), old)]
    return [f"{key}: {old.get(key, absent)!r} -> {new.get(key, absent)!r}" for key in changed]


_ABSENT_KEY = object()


def _repeats_a_change(key: str, written: dict, changed: set[str], old: dict) -> bool:
    """Whether ``key``'s change is that of a key in ``changed``: its value is that key's through whole-value
    interpolations (``${other}``, at ``key`` or at a node above it), and was in the saved config too. ``written``:
    the current config before interpolation, flattened; ``old``: the saved config, flattened."""
    source = key
    for _ in range(len(written)):  # a chain of interpolations, each at most once
        parts = source.split(".")
        for end in range(len(parts), 0, -1):
            value = written.get(".".join(parts[:end]))
            if isinstance(value, str) and value.startswith("${") and value.endswith("}") and value.count("$") == 1:
                break
        else:
            return False
        source = ".".join([value[2:-1].strip(), *parts[end:]])
        if source in changed:
            return old.get(key, _ABSENT_KEY) == old.get(source, _ABSENT_KEY)
    return False


def _builds_the_default(config: dict, key: str, value, uses: dict[str, list[str]]) -> bool:
    """Whether ``key`` with ``value`` is a ``_target_``'s default argument, or only feeds such arguments."""
    if _is_target_default(config, key, value):
        return True
    # E.g. model.batched_sampling, a switch of its own that configs interpolate into model.net.batched_sampling.
    return bool(uses.get(key)) and all(_is_target_default(config, use, value) for use in uses[key])


def _interpolations(unresolved: dict) -> dict[str, list[str]]:
    """``{key: [paths whose value is exactly "${key}"]}`` in a config before interpolation."""
    uses: dict[str, list[str]] = {}
    for path, value in flatten_config(unresolved).items():
        if isinstance(value, str) and value.startswith("${") and value.endswith("}") and value.count("$") == 1:
            uses.setdefault(value[2:-1].strip(), []).append(path)
    return uses


def _is_target_default(config: dict, key: str, value) -> bool:
    """Whether ``key`` is an argument of the ``_target_`` of the node holding it and ``value`` is its default.

    A newer config may write out an argument an older one left to its default (shapes.yaml gained
    ``aspect_ratio_grouping: false``): the object built is the same, so resuming the older run changes nothing.
    """
    parent, _, name = key.rpartition(".")
    node = config
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, dict) else None
    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str):
        return False
    module, _, attribute = target.rpartition(".")
    try:
        built = getattr(importlib.import_module(module), attribute)
        default = inspect.signature(built).parameters[name].default
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return False
    return default is not inspect.Parameter.empty and default == value


def check_resume_config(cfg: DictConfig, resumed: ResumedRun) -> None:
    """Stops a resumed run whose config differs from the run's own in anything but :data:`RESUME_FREE_KEYS`.

    ``resume_allow_config_change=true`` lets it go on (with a warning that lists the changes).

    Raises:
        CommandError: listing the differing keys and the way out: the command with the run's own overrides.
    """
    if resumed.config is None:
        log.warning(
            "%s does not record its run's config (an older checkpoint): the resume is not checked", resumed.checkpoint
        )
        return
    current = OmegaConf.to_container(cfg, resolve=True)
    unresolved = OmegaConf.to_container(cfg, resolve=False)
    changes = config_changes(resumed.config, current, resumed.run_dir, cfg.run_dir, unresolved)
    if not changes:
        return
    listing = "\n  ".join(changes)
    if cfg.get("resume_allow_config_change"):
        log.warning(
            "resuming %s with a changed config (resume_allow_config_change=true):\n  %s", resumed.checkpoint, listing
        )
        return
    requeued = requeued_checkpoint(cfg.run_dir, cfg.get("mode", "train"), started_again(cfg))
    if requeued is not None:  # the same command again: the config files changed while the job waited
        who = "continue_sweep=true started" if cfg.get("continue_sweep") else "SLURM requeued"
        source = f"{who} this job to continue from {requeued}, but"
    else:
        source = f"resume={cfg.resume}:" if cfg.get("resume") else f"ckpt_path={cfg.ckpt_path}:"
    may_change = (
        "trainer.max_epochs, trainer.max_steps and runtime keys such as loggers, callbacks or "
        "data.datamodule.num_workers may change"
    )
    if requeued is None and resumed.overrides is not None:
        start = f"resume={cfg.resume}" if cfg.get("resume") else f"ckpt_path={cfg.ckpt_path}"
        same_folder = Path(cfg.run_dir).resolve() == Path(resumed.folder).resolve()
        way = (
            f"Resume with the overrides the run was started with ({may_change}):\n"
            f"  {continue_command(resumed.overrides, start, cfg.run_dir if same_folder else None)}\n"
            "or add resume_allow_config_change=true to go on with these changes."
        )
    else:
        started = " ".join(resumed.overrides) if resumed.overrides is not None else "(not recorded)"
        way = (
            f"The run was started with the overrides: {started}\nResume with the same overrides ({may_change}), or "
            "add resume_allow_config_change=true to go on with these changes."
        )
    raise CommandError(f"{source} the config differs from the one the run was trained with, in:\n  {listing}\n{way}")


# What a command names to start from, and where it writes: the command that continues a run sets them itself.
_START_KEYS = ("resume", "ckpt_path", "hydra.run.dir")


def continue_command(overrides: Sequence[str] | None, start: str, run_dir: str | Path | None = None) -> str:
    """The command that continues a run: ``python run.py <its overrides> <start> [hydra.run.dir=<run_dir>]``.

    Args:
        overrides: the run's command-line overrides (``None``: not known, outside a Hydra job); the ``resume=``,
            ``ckpt_path=`` and ``hydra.run.dir=`` among them are left out (a resumed run's own).
        start: what it continues from, ``resume=<run folder>`` or ``ckpt_path=<file>``.
        run_dir: the folder to continue in; ``None``: a new one.
    """
    kept = [o for o in overrides or () if override_key(o) not in _START_KEYS]
    key, _, path = start.partition("=")
    words = [*kept, f"{key}={hydra_quoted(path)}"]
    if run_dir is not None:
        words.append(f"hydra.run.dir={hydra_quoted(str(run_dir))}")
    same = "<the same overrides> " if overrides is None else ""
    return f"python run.py {same}" + " ".join(shlex.quote(str(word)) for word in words)


def hydra_quoted(value: str) -> str:
    """``value`` as a Hydra override reads it back whole: quoted where it holds what the override grammar would
    split on (a sweep job's folder named after its overrides holds ``=`` and ``,``)."""
    if not re.search(r"[=,\[\]{}()'\"\s\\]", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _relative_to_run_dir(value, run_dir: str):
    """``value`` with every string path inside ``run_dir`` written as ``<run_dir>/...``."""
    if isinstance(value, dict):
        return {key: _relative_to_run_dir(item, run_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [_relative_to_run_dir(item, run_dir) for item in value]
    if isinstance(value, str) and run_dir and (value == run_dir or value.startswith(run_dir.rstrip("/") + "/")):
        return "<run_dir>" + value[len(run_dir.rstrip("/")) :]
    return value


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def is_resume_free_key(key: str) -> bool:
    """Whether a resumed run may change ``key`` (one of :data:`RESUME_FREE_KEYS`, or a key under one)."""
    return any(key == free or key.startswith(f"{free}.") for free in RESUME_FREE_KEYS)


def model_differences(saved_model: dict, cfg: DictConfig) -> list[tuple[str, str]]:
    """``(key, "<key>: <value> in the checkpoint, <value> in this run")`` for every ``model`` key whose value
    differs between a checkpoint's recorded (resolved) model config and ``cfg``'s, sorted by key."""
    saved = flatten_config({"model": saved_model})
    run = flatten_config({"model": OmegaConf.to_container(cfg.model, resolve=True)})
    absent = "<absent>"
    return [
        (key, f"{key}: {saved.get(key, absent)!r} in the checkpoint, {run.get(key, absent)!r} in this run")
        for key in sorted(saved.keys() | run.keys())
        if saved.get(key, absent) != run.get(key, absent)
    ]


def check_checkpoint_fits(module: torch.nn.Module, path: str, cfg: DictConfig, option: str = "ckpt_path") -> None:
    """Stops before evaluate / predict when a Lightning checkpoint's tensors do not fit the built module.

    Instead of torch's line per mismatched tensor (64 for another ResNet depth), the message lists where the
    checkpoint's recorded config (written by :class:`mrcnn.engine.callbacks.RunRecord`, as for resuming) differs
    from this run's under ``model``, which is what makes the shapes differ.

    Other classes than the run's data (``module.class_names``) are named first, both lists, whether or not their
    number changes the class-specific layers' shapes.

    Raises:
        CommandError: naming the file, the count of tensors that differ, and the differing ``model`` keys; or both
            class lists.
    """
    checkpoint = read_checkpoint(path, option)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CommandError(
            f"{option}={path} is not a Lightning checkpoint (it has no 'state_dict'); a plain state dict or "
            "torchvision weights go in weights=<file>"
        )
    record = checkpoint.get(MODEL_RECORD_KEY)
    if record:
        check_classes(
            ModelRecord.from_dict(record).class_names, getattr(module, "class_names", None), f"{option}={path}"
        )
    saved, expected = checkpoint["state_dict"], module.state_dict()
    reshaped = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in saved]
    # A BatchNorm's step count, where this model has a FrozenBatchNorm2d (a frozen stage of a checkpoint saved before
    # frozen stages' BatchNorm was frozen): that layer drops the key on load, as torchvision's does.
    unexpected = [
        k
        for k in saved
        if k not in expected
        and not (k.endswith(".num_batches_tracked") and f"{k.rpartition('.')[0]}.running_mean" in expected)
    ]
    if not (reshaped or missing or unexpected):
        return
    counts = f"{len(reshaped)} tensors of another shape, {len(missing)} missing and {len(unexpected)} unexpected"
    config = (checkpoint.get(RUN_RECORD_KEY) or {}).get("config")
    if config is not None:
        differing = [line for _, line in model_differences(config.get("model", {}), cfg)]
        overrides = (checkpoint.get(RUN_RECORD_KEY) or {}).get("overrides")
        detail = (
            "The checkpoint's model config differs from this run's in:\n  " + "\n  ".join(differing)
            if differing
            else "Its recorded model config equals this run's (the code changed since?)"
        )
        if overrides is not None:
            detail += f"\nIts run was started with the overrides: {' '.join(overrides) or '(none)'}"
        detail += (
            "\nWithout model=, model/<group>=, experiment=, ablation/, setting= or debug= overrides, evaluate and "
            "predict build the model the checkpoint records"
        )
    else:
        detail = "It records no config; e.g. " + ", ".join((reshaped + missing + unexpected)[:3])
    raise CommandError(
        f"{option}={path} does not fit the model this run builds ({counts}). {detail}\n"
        "Evaluate or predict with the model settings the checkpoint was trained with."
    )


def _classes_of(state: Mapping[str, torch.Tensor]) -> int | None:
    """The number of classes (background aside) whose scores a state dict's box classifier gives; None: none there."""
    scores = state.get("roi_heads.box_predictor.cls_score.weight")
    return int(scores.shape[0]) - 1 if scores is not None else None


def load_weights(
    model: torch.nn.Module, path: str, class_names: list[str] | None = None, fine_tune: bool = True
) -> list[str]:
    """Initialises ``model`` from a file (``weights=``): a torchvision Mask R-CNN state dict or a Lightning checkpoint.

    Only the weights are taken: a run started from them trains with a fresh optimizer, step count and
    schedule (``ckpt_path`` resumes instead). Files trained on other classes fine-tune: the class-specific
    layers (box classifier, box regressor, mask predictor) are re-initialised, listed in one log line, when
    their shapes do not fit or, for a Lightning checkpoint, when its recorded classes differ from
    ``class_names``. A torchvision state dict sets FrozenBatchNorm eps to 0 as torchvision's builder does
    (``mrcnn.modeling.mask_rcnn.load_torchvision_weights``); a Lightning checkpoint restores its own eps.

    Args:
        class_names: the classes the model is being built for (to compare with a checkpoint's).
        fine_tune: whether the model is trained from here. Not fine-tuned (``mode=evaluate``, ``mode=predict``),
            layers re-initialised for other classes would score and caption random detections: an error.

    Returns:
        the re-initialised (not loaded) class-specific keys.

    Raises:
        CommandError: the file is not a state dict or checkpoint, or does not match the configured model
            (the message names the file and the mismatched keys); or, not fine-tuned, its classes differ.
    """
    state = read_checkpoint(path, "weights")
    if not isinstance(state, dict):
        raise CommandError(
            f"weights={path} is neither a plain state dict (torch.save(model.state_dict())) nor a Lightning "
            "checkpoint of this project"
        )
    record = None
    if isinstance(state, dict) and "state_dict" in state and "pytorch-lightning_version" in state:
        record = state.get(MODEL_RECORD_KEY)
        record = ModelRecord.from_dict(record) if record else None
        # The LightningModule holds the network as ``self.model``.
        state = {k[len("model.") :]: v for k, v in state["state_dict"].items() if k.startswith("model.")}
    new_classes = bool(record and record.class_names and class_names and list(record.class_names) != list(class_names))
    try:
        skipped = load_torchvision_weights(model, state, new_classes=new_classes)
    except ValueError as error:
        raise CommandError(f"weights={path}: {error}") from error
    if record is not None:
        set_frozen_bn_eps(model, record.frozen_bn_eps)
    if skipped:
        own_classes = _classes_of(model.state_dict())
        if record and record.class_names:
            trained = f"{len(record.class_names)} classes {list(record.class_names)}"
        else:
            inner = state.get("model")  # torchvision's reference scripts save {"model": state dict, ...}
            file_classes = _classes_of(inner if isinstance(inner, dict) else state)
            trained = f"{file_classes} classes" if file_classes is not None else "other classes"
        if not fine_tune:
            names = f" {list(class_names)}" if class_names and len(class_names) == own_classes else ""
            same_count = record and record.class_names and len(record.class_names) == own_classes
            way = (
                "Use data of its classes (data.classes), or ckpt_path=<file>, which brings the checkpoint's classes"
                if same_count
                else "Build the model for the file's classes (model.num_classes follows the data; for mode=predict "
                "of torchvision's COCO files: model.num_classes=90)"
            )
            raise CommandError(
                f"weights={path} was trained on {trained}, and this run's model is built for {own_classes} classes"
                f"{names}: its class-specific layers would be {'mismatched' if same_count else 'random'}, and so "
                f"would what it scores or predicts. {way}; or train from the file first (mode=train) to fine-tune it "
                "to your classes."
            )
        log.info(
            "weights=%s: loaded all but the class-specific layers, re-initialised for %s (the file was trained on %s): %s",
            path,
            f"{own_classes} classes" if own_classes is not None else "the configured classes",
            trained,
            ", ".join(skipped),
        )
    else:
        log.info("weights=%s: loaded every tensor", path)
    return skipped
