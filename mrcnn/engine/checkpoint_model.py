"""``mode=evaluate`` and ``mode=predict`` build the model a checkpoint was trained as, from its recorded config.

Every checkpoint of this project records its run's resolved config (:class:`mrcnn.engine.callbacks.RunRecord`).
Its ``model`` section is the architecture the weights belong to, including the switches that hold no weights:
a RoIPool model's weights load into a RoIAlign model without a complaint, as do a softmax-loss model's into a
sigmoid one, and would then be scored as a model that was never trained. So, without a word about the model on
the command line, the run's ``model`` becomes the checkpoint's, and ``model.<key>=<value>`` overrides apply on top
(e.g. ``model.box_score_thresh=0.01``). A command line that chooses the model by config group (``model=``,
``model/<group>=``, ``experiment=``, ``ablation/<name>=``, ``setting=``, ``debug=``) keeps the model it composes,
with a warning that lists where it differs from the checkpoint's: testing a model with another switch than it
was trained with is then on purpose.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from mrcnn.config import override_key
from mrcnn.engine.checkpoints import RUN_RECORD_KEY, flatten_config, model_differences
from mrcnn.engine.launch import is_ddp_child
from mrcnn.engine.model_record import read_checkpoint

log = logging.getLogger(__name__)

# Config groups whose options set ``model`` keys or choose ``model/...`` options (tests/test_checkpoint_model.py
# checks that every group of configs/ that does is here).
MODEL_GROUPS = ("model", "experiment", "ablation", "setting", "debug")

# Keys that name files of initial weights: the checkpoint's weights replace what they load, and the file may be on
# the machine the run trained on.
INITIAL_WEIGHTS_KEYS = ("backbone_weights", "weights_path")

_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")
_ABSENT = object()


def chooses_model_by_group(override: str) -> bool:
    """Whether a command-line override picks an option of a group in :data:`MODEL_GROUPS`.

    ``model=small``, ``model/pooler=roi_pool``, ``experiment=ablation_roialign``, ``ablation/mask_loss=softmax``,
    ``+setting=paper``: yes; ``model.box_score_thresh=0.1``, ``seed=1``: no.
    """
    key = override_key(override).split("@", 1)[0]
    if "." in key:
        return False
    return key.split("/", 1)[0] in MODEL_GROUPS


def key_overrides(overrides: Sequence[str], prefix: str) -> list[tuple[str, bool]]:
    """The keys starting with ``prefix`` (``model.``) that the command line sets, each with whether it deletes it
    (``~model.x``), in order."""
    keys = []
    for override in overrides:
        key = override_key(override)
        if key.startswith(prefix):
            keys.append((key, override.startswith("~")))
    return keys


def recorded_model_config(ckpt_path: str, option: str = "ckpt_path") -> dict | None:
    """The ``model`` section of the config a checkpoint's run was trained with; ``None`` when it records none."""
    checkpoint = read_checkpoint(ckpt_path, option)
    record = checkpoint.get(RUN_RECORD_KEY) if isinstance(checkpoint, dict) else None
    config = record.get("config") if isinstance(record, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    return model if isinstance(model, dict) else None


def use_checkpoint_model(
    cfg: DictConfig, ckpt_path: str, overrides: Sequence[str] | None, option: str = "ckpt_path"
) -> None:
    """Sets ``cfg.model`` to the model ``ckpt_path`` was trained as, unless the command line chose one by group.

    Keys that the run's config derives from outside ``model`` (``${data.min_size}``, ``${data.num_classes}``)
    keep following this run's config, and keys derived from other ``model`` keys keep following them wherever
    that gives the checkpoint's value, so that ``model.<key>=`` overrides reach what reads them. Files of initial
    weights are dropped (the checkpoint's weights replace them).

    Args:
        cfg: the run's composed config; changed in place.
        ckpt_path: a Lightning checkpoint of this project (older ones that record no config, and torchvision state
            dicts, leave ``cfg`` as is).
        overrides: the command-line overrides (Hydra's ``overrides.task``); ``None`` (no Hydra job): none.
        option: the config key that named the file, for the messages.
    """
    if is_ddp_child():
        return  # its config is the job's resolved.yaml, written after the job's main process made this change
    saved = recorded_model_config(ckpt_path, option)
    if saved is None:
        log.info("%s=%s records no config: the model is built from this run's config", option, ckpt_path)
        return
    overrides = list(overrides or [])
    by_group = [o for o in overrides if chooses_model_by_group(o)]
    linked = _interpolated_leaves(cfg)
    if by_group:
        differing = [
            line
            for key, line in model_differences(saved, cfg)
            if not _is_initial_weights(key) and not _refers_outside_model(linked.get(key, ""))
        ]
        if differing:
            log.warning(
                "%s chooses the model by config group, so it is built from this run's config, which differs from "
                "the one %s was trained with in:\n  %s\n(without %s the checkpoint's model config is used)",
                " ".join(by_group),
                ckpt_path,
                "\n  ".join(differing),
                " ".join(by_group),
            )
        return

    # The values the command line gives model keys, read before the model is replaced.
    given = [
        (key, deleted, None if deleted else _plain(OmegaConf.select(cfg, key, throw_on_missing=False)))
        for key, deleted in key_overrides(overrides, "model.")
    ]
    composed = OmegaConf.to_container(cfg.model, resolve=True)  # this run's own model, for the log line
    with open_dict(cfg):
        cfg.model = copy.deepcopy(saved)
    _relink(cfg, linked)
    with open_dict(cfg):
        for key in _model_leaves(cfg):
            if _is_initial_weights(key):
                OmegaConf.update(cfg, key, None, merge=False)
        for key, deleted, value in given:
            if deleted:
                parent, _, name = key.rpartition(".")
                node = OmegaConf.select(cfg, parent)
                if isinstance(node, DictConfig) and name in node:
                    del node[name]
                continue
            net = _plain(cfg.model.net)
            before = _plain(OmegaConf.select(cfg, key, default=None, throw_on_missing=False))
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
            if not key.startswith("model.net.") and value != before and _plain(cfg.model.net) == net:
                # This run's config derives the network's keys from it, the checkpoint's (another backbone, an older
                # config) does not: the override would change nothing, and a test-time change would go unmade.
                log.warning(
                    "%s=%s changes nothing in the model %s was trained as: its config does not derive any key of "
                    "model.net from %s. Set the key under model.net it should change (the checkpoint's config is in "
                    "its run's .hydra/resolved.yaml)",
                    key,
                    value,
                    ckpt_path,
                    key,
                )
    differing = [key for key, _ in model_differences(composed, cfg) if not _is_initial_weights(key)]
    # What is built (model.net) first: the knobs above it differ wherever the network does.
    built = [key for key in differing if key.startswith("model.net.")] or differing
    shown = ", ".join(built[:8]) + (f" and {len(built) - 8} more" if len(built) > 8 else "")
    of_them = f", {len(built)} of them under model.net" if len(built) < len(differing) else ""
    log.info(
        "the model is built from the config %s was trained with%s (a model=/model/<group>= override builds this "
        "run's instead)",
        ckpt_path,
        f"; it differs from this run's composed model in {len(differing)} keys{of_them}: {shown}" if differing else "",
    )


def _plain(value):
    """A config value as plain containers (resolved), to put where the model config is replaced."""
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _model_leaves(cfg: DictConfig) -> dict:
    """``{key: value}`` of every leaf under ``cfg.model``, interpolations unresolved."""
    return flatten_config({"model": OmegaConf.to_container(cfg.model, resolve=False)})


def _interpolated_leaves(cfg: DictConfig) -> dict[str, str]:
    """``{key: interpolation}`` for every leaf under ``cfg.model`` whose value is an interpolation."""
    return {key: value for key, value in _model_leaves(cfg).items() if isinstance(value, str) and "${" in value}


def _refers_outside_model(interpolation: str) -> bool:
    """Whether an interpolation reads a key outside ``model`` (``${data.min_size}``)."""
    return any(not ref.startswith("model.") for ref in _REFERENCE.findall(interpolation))


def _relink(cfg: DictConfig, linked: dict[str, str]) -> None:
    """Puts the run's interpolations back where the checkpoint's config has the same key (see
    :func:`use_checkpoint_model`): first those reading ``model`` keys, where they give the checkpoint's value; then
    those reading outside ``model``, always (so that ``box_predictor.num_classes: ${model.num_classes}``, equal to
    the checkpoint's before, follows ``model.num_classes`` to the data's after)."""
    internal = {k: v for k, v in linked.items() if not _refers_outside_model(v)}
    external = {k: v for k, v in linked.items() if _refers_outside_model(v)}
    with open_dict(cfg):
        for key, interpolation in internal.items():
            recorded = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
            if recorded is _ABSENT:
                continue
            recorded = _plain(recorded)
            OmegaConf.update(cfg, key, interpolation, merge=False)
            try:
                same = _plain(OmegaConf.select(cfg, key)) == recorded
            except Exception:  # noqa: BLE001  (an interpolation of a key the checkpoint's config lacks)
                same = False
            if not same:
                OmegaConf.update(cfg, key, recorded, merge=False)
        for key, interpolation in external.items():
            if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT:
                OmegaConf.update(cfg, key, interpolation, merge=False)


def _is_initial_weights(key: str) -> bool:
    return key.rpartition(".")[2] in INITIAL_WEIGHTS_KEYS
