"""Turn a sweep directory of finished runs into an ablation report: what was compared, and the results.

Each job directory of a Hydra sweep holds ``.hydra/`` (the job's config, its config choices and overrides),
``metrics.json`` (its final COCO metrics, written by ``mrcnn.engine.summary``) and, when the ``JobRecord`` callback
ran, ``job.json`` (the model it built, parameter counts, step and wall time; ``mrcnn.reporting.job_record``). A record in
``experiments/`` keeps each job as ``jobs/<name>/`` with its ``overrides.yaml``, ``metrics.json`` and, where it was
recorded, ``job.json``. A job without ``job.json`` gets its model and parameters from the model its config builds
(:func:`rebuild_record`), without times.

A job's label is the value of each ``variant_keys`` entry in the config it ran: the config group's choice
(``.hydra/hydra.yaml``) or the key's value, never a name typed elsewhere. Jobs are grouped into variants by
label and averaged over everything else (the seeds). The report states, from the jobs' own configs and
records, the setting it ran (beside the paper's), what each variant built and how the variants' models differ,
and each variant's parameters and time.

Rebuild a report from an existing sweep::

    python -m mrcnn.reporting multirun/2026-11-21/10-00-00 --keys model/pooler --title "RoIAlign (Table 2c)"
"""

import argparse
import collections
import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mrcnn.config import override_key

log = logging.getLogger(__name__)

COLUMNS = (("segm_AP", "AP"), ("segm_AP50", "AP50"), ("segm_AP75", "AP75"), ("bbox_AP", "AP^bb"))

# The paper's setting for all of Table 2 (He et al. 2017, Sec. 3.1 and 4): each experiment adds what is its own
# (the backbone, the RoIs per image) under `paper_setting` in its report callback.
PAPER_SETTING = {
    "width": "64 (standard ResNet)",
    "norm": "FrozenBatchNorm (ImageNet statistics)",
    "pretrained backbone": "ImageNet",
    "data": "COCO trainval35k (80k train + 35k val images), tested on minival (5k)",
    "image size": "shorter side 800, longer at most 1333",
    "mask targets": "binary",
    "training": "160k iterations (lr x0.1 at 120k)",
    "batch": "16 images (8 GPUs x 2)",
    "learning rate": "0.02",
    "seeds": "one run",
}
SETTING_ROWS = (
    "backbone",
    "width",
    "norm",
    "pretrained backbone",
    "data",
    "image size",
    "RoIs per image",
    "mask targets",
    "training",
    "batch",
    "learning rate",
    "seeds",
)


# The recipe knobs that size a model, read from the sweep's multirun.yaml when a recorded job's model is rebuilt
# from today's configs (rebuild_record): everything else comes from the job's config group choices.
RECIPE_KEYS = (
    "model.depth",
    "model.width",
    "model.norm",
    "model.head_norm",
    "model.fpn_channels",
    "model.box_head_dim",
    "model.mask_head_dim",
    "model.rois_per_image",
    "model.anchor_sizes",
    "model.trainable_layers",
    "model.mask_target_form",
    "data.image_size",
)


@dataclass
class Job:
    """One finished job of a sweep: its label values, metrics and, where recorded, config and ``job.json``."""

    path: Path
    labels: dict[str, str]
    seed: str
    metrics: dict[str, float]
    record: dict | None = None
    config: DictConfig | None = None
    choices: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def setting_name(self) -> str | None:
        """The ``setting=`` the job ran (``configs/setting/``); ``None`` for a job from before the group existed."""
        return self.choices.get("setting") or self.setting("setting_name")

    def setting(self, key: str, default=None):
        """A value of the job's config (``None`` where it has none or it does not resolve)."""
        if self.config is None:
            return default
        value = OmegaConf.select(self.config, key, default=default, throw_on_resolution_failure=False)
        return default if value is None else value


@dataclass
class Variant:
    """All finished runs of one variant (e.g. ``model/pooler=roi_align``) across seeds."""

    name: str
    runs: list[dict[str, float]] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)

    def add(self, job: Job) -> None:
        self.jobs.append(job)
        self.runs.append(job.metrics)
        self.seeds.append(job.seed)

    def mean(self, key: str) -> float:
        values = [r[key] for r in self.runs if key in r]
        return sum(values) / len(values) if values else float("nan")

    def std(self, key: str) -> float:
        """Sample standard deviation over seeds (nan for a single run: one run says nothing of the spread)."""
        values = [r[key] for r in self.runs if key in r]
        if len(values) < 2:
            return float("nan")
        m = sum(values) / len(values)
        return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))

    def record_mean(self, key: str) -> float:
        """Mean over the jobs' ``job.json`` of ``key`` (nan where none recorded it)."""
        values = [j.record[key] for j in self.jobs if j.record and j.record.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    def parameters(self, part: str) -> int | None:
        counts = {j.record["parameters"][part] for j in self.jobs if j.record and j.record.get("parameters")}
        return counts.pop() if len(counts) == 1 else None

    def models(self) -> list[dict]:
        """The distinct model descriptions its jobs recorded (one, unless a label lies)."""
        models = []
        for job in self.jobs:
            model = (job.record or {}).get("model")
            if model is not None and model not in models:
                models.append(model)
        return models


def _overrides_file(job_dir: Path) -> Path:
    """Hydra's ``<job>/.hydra/overrides.yaml``, or a recorded job's ``jobs/<name>/overrides.yaml``."""
    hydra = job_dir / ".hydra" / "overrides.yaml"
    return hydra if hydra.is_file() else job_dir / "overrides.yaml"


def read_overrides(job_dir: Path) -> dict[str, str]:
    """``key=value`` overrides of one job, from Hydra's ``.hydra/overrides.yaml`` (or a record's ``overrides.yaml``)."""
    return parse_overrides(yaml.safe_load(_overrides_file(job_dir).read_text()) or [])


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """``{key: value}`` of command-line overrides (``+``, ``++`` and ``~`` dropped from the key)."""
    return {override_key(line): line.partition("=")[2] for line in lines}


def read_choices(job_dir: Path) -> dict[str, str]:
    """The config group choices the job was composed from (``hydra.runtime.choices``), ``{}`` if not saved."""
    path = job_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    hydra = yaml.safe_load(path.read_text()) or {}
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    return {k: str(v) for k, v in choices.items() if v is not None}


def read_config(job_dir: Path) -> DictConfig | None:
    """The job's config: ``resolved.yaml`` (written by ``mrcnn.engine.launch.job_scope``) or Hydra's ``config.yaml``."""
    for name in ("resolved.yaml", "config.yaml"):
        path = job_dir / ".hydra" / name
        if path.is_file():
            return OmegaConf.load(path)
    return None


def label_value(key: str, choices: dict[str, str], overrides: dict[str, str], config: DictConfig | None) -> str:
    """What the job ran for ``key``: the config group's choice, else the key's overridden or configured value."""
    if key in choices:
        return choices[key]
    if key in overrides:
        return overrides[key]
    if config is not None:
        value = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
        if value is not None:
            return str(value)
    return "default"


def read_job(job_dir: Path) -> Job:
    overrides = read_overrides(job_dir)
    choices = read_choices(job_dir)
    config = read_config(job_dir)
    record_file = job_dir / "job.json"
    seed = overrides.get("seed")
    if seed is None and config is not None:
        seed = str(OmegaConf.select(config, "seed", default="default"))
    return Job(
        path=job_dir,
        labels={},  # by collect, once a recorded job has its sweep's config and choices
        seed=seed or "default",
        metrics=json.loads((job_dir / "metrics.json").read_text()),
        record=json.loads(record_file.read_text()) if record_file.is_file() else None,
        config=config,
        choices=choices,
        overrides=overrides,
    )


def variant_name(labels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items())


def collect(
    sweep_dir: str | Path, variant_keys: list[str], order: list[str] | None = None, left_out: list | None = None
) -> list[Variant]:
    """Group the finished jobs of ``sweep_dir`` by their values of ``variant_keys``.

    Jobs without ``metrics.json`` (failed or still running) or whose evaluation scored nothing (``nothing_to_score``:
    its APs are -1) are skipped and logged, not averaged in. A subfolder that
    holds a sweep of its own (its ``multirun.yaml``) is another record and is left out. Jobs that differ in another
    override than the seed (a second swept key, e.g. ``base_lr``) are never averaged together: that key joins their
    labels, and the log says so. A seed that repeats within a variant is logged.

    Args:
        order: optional variant names in the order the table should list them.
        left_out: if given, gets ``(job folder relative to sweep_dir, variant, why)`` of each job skipped, and
            ``("", variant, NOT_STARTED)`` of each job the sweep planned (``multirun.yaml``) that has no folder (a
            sweep stopped or still running, or a job that failed at its start), for the report.
    """
    # Registers the resolvers a job's config.yaml may use. Here, not at the top: it loads torch (seconds), and
    # `python -m mrcnn.reporting` should answer a mistyped folder at once.
    import mrcnn.config  # noqa: F401

    sweep_dir = Path(sweep_dir)
    sweep = _sweep_config(sweep_dir)
    recipe = functools.cache(lambda: recipe_pins(sweep))  # composed for the first job rebuilt, if any
    jobs, started, recorded = [], [], False
    for overrides_file in sorted(sweep_dir.glob("**/overrides.yaml")):
        # A Hydra job folder (<job>/.hydra/overrides.yaml) or a recorded one (jobs/<name>/overrides.yaml).
        job_dir = overrides_file.parent.parent if overrides_file.parent.name == ".hydra" else overrides_file.parent
        if nested_sweep(sweep_dir, job_dir) is not None:
            continue
        if overrides_file.parent.name == ".hydra":
            started.append(yaml.safe_load(overrides_file.read_text()) or [])
        else:
            recorded = True
        folder = str(job_dir.relative_to(sweep_dir))
        if not (job_dir / "metrics.json").exists():
            log.warning("skipping %s: no metrics.json (the job failed or has not finished)", job_dir)
            if left_out is not None:
                left_out.append(
                    (
                        folder,
                        _planned_variant(variant_keys, read_overrides(job_dir), read_choices(job_dir)),
                        "no metrics.json: failed or not finished",
                    )
                )
            continue
        job = read_job(job_dir)
        if job.metrics.get("nothing_to_score"):
            # Its APs are pycocotools' -1 ("nothing to score"), not numbers to average with the other seeds'.
            log.warning("skipping %s: it scored nothing (%s)", job_dir, job.metrics["nothing_to_score"])
            if left_out is not None:
                left_out.append((folder, _planned_variant(variant_keys, job.overrides, job.choices), "scored nothing"))
            continue
        if job.record is None:
            job.record = rebuild_record(job, sweep, recipe)
        if job.config is None and sweep is not None:
            # A recorded job without its own config: the sweep's settings (data, schedule, batch) are its own.
            settings = OmegaConf.to_container(sweep, resolve=False)
            settings.pop("hydra", None)
            job.config = OmegaConf.create(settings)
            choices = OmegaConf.select(sweep, "hydra.runtime.choices", default=None) or {}
            job.choices = {str(k): str(v) for k, v in choices.items() if v is not None and k not in job.overrides}
        jobs.append(job)
    keys = [*variant_keys, *other_swept_keys(jobs, variant_keys)]
    variants: dict[str, Variant] = {}
    for job in jobs:
        job.labels = {k: label_value(k, job.choices, job.overrides, job.config) for k in keys}
        name = variant_name(job.labels)
        variants.setdefault(name, Variant(name)).add(job)
    for variant in variants.values():
        repeated = sorted({seed for seed in variant.seeds if variant.seeds.count(seed) > 1})
        if repeated:
            log.warning("%s: seed %s repeats (%d runs averaged)", variant.name, ", ".join(repeated), len(variant.runs))
    if left_out is not None and not recorded:  # a sweep Hydra ran here, not a record of one (jobs/<name>/)
        for overrides in not_started(sweep, started):
            left_out.append(("", _planned_variant(variant_keys, parse_overrides(overrides), {}), NOT_STARTED))
    result = list(variants.values())
    if order:
        rank = {name: i for i, name in enumerate(order)}
        result.sort(key=lambda v: rank.get(v.name, len(rank)))
    return result


# Overrides jobs may differ in and still be averaged together: the seed (what a variant is averaged over), the
# experiment's name, and the runtime keys a resumed run may change (mrcnn.engine.checkpoints.RESUME_FREE_KEYS: paths,
# loggers, loader workers, speed switches). Not those of RESUME_FREE_KEYS that change what a sweep's job trains or
# what its final evaluation scores: the length of training (also max_time, which may stop it early), the initial
# weights (a resumed run keeps its own), the validation batches scored, whether it evaluates, and the mode.
REPORT_FREE_KEYS = ("seed", "experiment")
_TRAINED_KEYS = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "weights",
    "trainer.limit_val_batches",
    "final_eval",
    "mode",
)


def other_swept_keys(jobs: list[Job], variant_keys: list[str]) -> list[str]:
    """The overridden keys, but for the variant keys and the seed, whose value differs between ``jobs``.

    A sweep over ``model/pooler`` and ``base_lr`` labelled by ``model/pooler`` alone would average each pooler over
    both learning rates as if they were seeds: ``base_lr`` is returned, to join the labels.
    """
    from mrcnn.engine.checkpoints import is_resume_free_key

    def free(key: str) -> bool:
        return key in REPORT_FREE_KEYS or (key not in _TRAINED_KEYS and is_resume_free_key(key))

    candidates = dict.fromkeys(k for job in jobs for k in job.overrides if k not in variant_keys and not free(k))
    other = [
        key for key in candidates if len({label_value(key, job.choices, job.overrides, job.config) for job in jobs}) > 1
    ]
    if other:
        log.warning(
            "the jobs also differ in %s: %s join%s the variant labels (jobs are averaged over seeds only)",
            ", ".join(other),
            "they" if len(other) > 1 else "it",
            "" if len(other) > 1 else "s",
        )
    return other


# Why a job the sweep planned is not in the table when it has no folder: a job that failed before it wrote anything has
# its folder removed (mrcnn.engine.launch.discard_unused_output), as one never started has none.
NOT_STARTED = "no folder: not started, or failed before writing anything"


def _planned_variant(variant_keys: list[str], overrides: dict[str, str], choices: dict[str, str]) -> str:
    """The variant a job left out of the table ran, from its overrides and choices (its config may not be there)."""
    return variant_name({k: label_value(k, choices, overrides, None) for k in variant_keys})


def not_started(sweep: DictConfig | None, started: list[list[str]]) -> list[list[str]]:
    """The overrides of each job the sweep planned (``multirun.yaml``, Hydra's basic sweeper) that no job folder
    ran (``started``: each job folder's overrides), in the sweep's order."""
    if sweep is None or not str(OmegaConf.select(sweep, "hydra.sweeper._target_", default="")).endswith("BasicSweeper"):
        return []
    from mrcnn.engine.launch import without_continue_sweep
    from mrcnn.engine.sweep_cost import sweep_jobs

    try:
        planned = sweep_jobs(sweep.hydra.sweeper.get("params"), sweep.hydra.overrides.task)
    except Exception:  # noqa: BLE001  (a glob() sweep needs Hydra's config loader: its jobs are not named)
        return []
    # continue_sweep=true is in the overrides of a continued sweep's jobs, not in those it had finished before.
    ran = {frozenset(without_continue_sweep(overrides)) for overrides in started}
    return [overrides for overrides in planned if frozenset(without_continue_sweep(overrides)) not in ran]


def nested_sweep(sweep_dir: Path, job_dir: Path) -> Path | None:
    """The folder below ``sweep_dir`` and above (or at) ``job_dir`` that holds a sweep of its own
    (``multirun.yaml``), if any: a record kept inside another (``experiments/ablation_mask_head/scaled_mlp``)."""
    for folder in [job_dir, *job_dir.parents]:
        if folder == sweep_dir or sweep_dir not in folder.parents:
            return None
        if (folder / "multirun.yaml").is_file():
            return folder
    return None


def _sweep_config(sweep_dir: str | Path) -> DictConfig | None:
    path = Path(sweep_dir) / "multirun.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def recipe_pins(sweep: DictConfig | None) -> tuple[list[str], list[str]]:
    """Overrides that give today's configs the recipe a recorded sweep ran (:data:`RECIPE_KEYS`), and notes.

    A knob the sweep's ``multirun.yaml`` writes as a plain value is pinned to it. A knob the record does not have
    did not exist when it ran: the model then was the one the knob's default builds (``configs/model/
    mask_rcnn.yaml``), so it is pinned to that default and named in the notes. Interpolated values (set by a
    config group, e.g. the RoIs per image of the backbone) are left to the job's group choices.
    """
    from mrcnn.config import compose_config

    if sweep is None:
        return [], []
    defaults = compose_config(["model=mask_rcnn"], run_dir="/tmp")
    pins, notes = [], []
    for key in RECIPE_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(sweep, parent, default=None)
        if node is None:
            continue
        written = OmegaConf.to_container(node, resolve=False)
        if leaf in written:
            value = written[leaf]
            if isinstance(value, str) and "${" in value:
                continue
        elif key.startswith("model."):
            value = OmegaConf.select(defaults, key, default=None)
            notes.append(f"{key} (not in the record; its default {value})")
        else:
            continue
        pins.append(f"{key}={'null' if value is None else json.dumps(value) if isinstance(value, list) else value}")
    return pins, notes


def rebuild_record(
    job: Job, sweep: DictConfig | None, recipe: Callable[[], tuple[list[str], list[str]]] | None = None
) -> dict | None:
    """What a job without ``job.json`` built, from its config: the model description and parameter counts
    (``mrcnn.reporting.job_record``), without times; ``None`` when its model cannot be built.

    A Hydra job folder has its config (``.hydra/config.yaml``). A recorded job has only its overrides: today's
    configs are composed with them and with the sweep's recipe values (:func:`recipe_pins`), so the model is the
    one those choices and values build now.

    Args:
        recipe: gives ``recipe_pins(sweep)``; :func:`collect` passes one that composes them once for all its jobs
            (a composition takes about 0.15 s).
    """
    from hydra.utils import instantiate

    from mrcnn.config import compose_config
    from mrcnn.reporting.job_record import count_parameters, describe_model

    try:
        if job.config is not None and OmegaConf.select(job.config, "model.net", default=None) is not None:
            net_config, source = job.config.model.net, "the job's config"
        else:
            pins, notes = recipe() if recipe is not None else recipe_pins(sweep)
            lines = yaml.safe_load(_overrides_file(job.path).read_text()) or []
            overrides = [line for line in lines if not line.startswith("seed=")]
            config = compose_config([*overrides, *pins], run_dir="/tmp")
            net_config = config.model.net
            source = "today's configs with the job's overrides and the sweep's recipe (multirun.yaml)"
            if notes:
                source += "; " + ", ".join(notes)
            # The setting today's configs give these overrides, if its recipe values are the record's.
            today = compose_config(overrides, run_dir="/tmp") if pins else config
            same = all(
                OmegaConf.select(today, k.split("=")[0]) == OmegaConf.select(config, k.split("=")[0]) for k in pins
            )
            if same and not notes:
                job.choices.setdefault("setting_equivalent", str(today.setting_name))
        net = instantiate(net_config)
    except Exception as error:  # a config this code no longer builds: report the model as not recorded
        log.warning("%s: model not rebuilt from its config (%s)", job.path, error)
        return None
    return {"model": describe_model(net), "parameters": count_parameters(net), "rebuilt_from": source}


def setting_names(variants: list[Variant]) -> str:
    """The ``setting=`` the sweep's jobs ran, for the report's header."""
    names = []
    for job in (j for v in variants for j in v.jobs):
        name = job.setting_name
        if name is None:
            same = job.choices.get("setting_equivalent")
            name = (
                f"{same} (recorded before configs/setting/ existed; its recipe values are setting={same}'s)"
                if same
                else "not recorded (the sweep predates configs/setting/)"
            )
        if name not in names:
            names.append(name)
    return " / ".join(names)


# ---- what was compared -------------------------------------------------------------------------------------


def _job_setting(job: Job) -> dict[str, str]:
    """The settings rows of one job, from its config, ``metrics.json`` and ``job.json``."""
    model = (job.record or {}).get("model") or {}
    rows = {}
    design = job.choices.get("model/backbone")
    depth = job.setting("model.depth")
    if model.get("backbone"):
        rows["backbone"] = model["backbone"]
    elif depth is not None and design:
        rows["backbone"] = f"ResNet-{depth}-{design.upper()}"
    width = model.get("backbone.width", job.setting("model.width"))
    if width is not None:
        rows["width"] = str(width)
    norm = model.get("backbone.norm", job.setting("model.norm"))
    if norm is not None:
        rows["norm"] = str(norm)
    if job.config is not None:
        weights = job.setting("model.backbone_weights")
        rows["pretrained backbone"] = Path(str(weights)).name if weights else "none (from scratch)"
    data = job.choices.get("data")
    if data:
        train, val = job.setting("data.num_train_images"), job.setting("data.num_val_images")
        rows["data"] = f"{data} ({train:,} train / {val:,} val images)" if train and val else data
    size = job.setting("data.image_size")
    if size is not None:
        rows["image size"] = f"{size}x{size}"
    elif job.setting("data.min_size") is not None:
        rows["image size"] = (
            f"shorter side {job.setting('data.min_size')}, longer at most {job.setting('data.max_size')}"
        )
    rois = model.get("rois_per_image", job.setting("model.rois_per_image"))
    if rois is not None:
        rows["RoIs per image"] = str(rois)
    if model.get("mask_targets"):
        rows["mask targets"] = model["mask_targets"]
    steps, epochs = job.metrics.get("global_step"), job.setting("trainer.max_epochs")
    if steps is not None:
        rows["training"] = f"{steps:,} steps" + (
            f" ({epochs} epoch{'' if epochs == 1 else 's'})" if epochs is not None else ""
        )
    batch = job.setting("data.datamodule.batch_size")
    if batch is not None:
        # Images per optimizer step, as the module scales the learning rate (mrcnn.lit_module).
        accumulate = int(job.setting("trainer.accumulate_grad_batches", 1))
        global_batch = int(batch) * int(job.metrics.get("world_size", 1)) * accumulate
        rows["batch"] = f"{global_batch} images"
        base_lr, base_batch = job.setting("base_lr"), job.setting("module.base_batch_size", 16)
        if base_lr is not None:
            rows["learning rate"] = (
                f"{float(base_lr) * global_batch / int(base_batch):g} (base_lr {base_lr} at batch {base_batch})"
            )
    return rows


def our_setting(variants: list[Variant]) -> dict[str, str]:
    """The setting the sweep ran, row by row; a row that differs between variants lists them in variant order."""
    values: dict[str, list[str]] = {}
    for variant in variants:
        for job in variant.jobs:
            for key, value in _job_setting(job).items():
                if value not in values.setdefault(key, []):
                    values[key].append(value)
    seeds = sorted(
        {s for v in variants for s in v.seeds}, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s)
    )
    values["seeds"] = [", ".join(seeds)]
    return {key: " / ".join(values[key]) for key in SETTING_ROWS if key in values}


def _designs(text: str) -> set[str]:
    return set(re.findall(r"\b(C4|C5|FPN)\b", text))


def setting_notes(ours: dict[str, str], paper: dict[str, str]) -> list[str]:
    """Generated warnings where our setting departs from the paper's in what shapes the comparison."""
    notes = []
    our_designs, paper_designs = _designs(ours.get("backbone", "")), _designs(paper.get("backbone", ""))
    if our_designs and paper_designs and not our_designs <= paper_designs:
        notes.append(
            f"Not the paper's backbone design: these runs use {', '.join(sorted(our_designs))}; the paper's rows "
            f"were measured on {', '.join(sorted(paper_designs))}."
        )
    if ours.get("mask targets") and paper.get("mask targets") and ours["mask targets"] != paper["mask targets"]:
        notes.append(f"Mask targets: {ours['mask targets']} here, {paper['mask targets']} in the paper.")
    return notes


def compare_models(variants: list[Variant]) -> dict:
    """How the variants' built models differ (from their jobs' ``job.json``).

    Returns:
        ``varying``: description keys whose value differs between variants; ``shared``: the keys and values
        all variants share; ``inconsistent``: names of variants whose jobs built different models (a label
        that does not say what ran); ``missing``: variants without a recorded model.
    """
    models = {v.name: v.models() for v in variants}
    inconsistent = [name for name, m in models.items() if len(m) > 1]
    recorded = {name: m[0] for name, m in models.items() if m}
    keys = list(dict.fromkeys(k for m in recorded.values() for k in m))
    varying = [k for k in keys if len({json.dumps(m.get(k)) for m in recorded.values()}) > 1]
    shared = {k: next(iter(recorded.values())).get(k) for k in keys if k not in varying}
    missing = [name for name, m in models.items() if not m]
    return {"varying": varying, "shared": shared, "inconsistent": inconsistent, "missing": missing}


# ---- tables and chart ----------------------------------------------------------------------------------------


def _cell(variant: Variant, key: str) -> str:
    mean, std = 100 * variant.mean(key), 100 * variant.std(key)
    return f"{mean:.1f} ± {std:.1f}" if len(variant.runs) > 1 else f"{mean:.1f}"


def _format_value(value) -> str:
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return "-" if value is None else str(value)


def markdown_table(
    variants: list[Variant], title: str = "", paper: dict[str, list[float]] | None = None, setting: str | None = None
) -> str:
    """The paper's Table 2 layout: one row per variant; mask AP, AP50, AP75 and box AP (percent).

    Args:
        paper: optional published numbers per variant name, ``[AP, AP50, AP75, AP^bb or nan]``.
        setting: the ``setting=`` the jobs ran, named under the title.
    """
    header = "| variant | " + " | ".join(label for _, label in COLUMNS) + " | seeds |"
    if paper:
        header += " paper AP | paper AP50 | paper AP75 | paper AP^bb |"
    lines = [f"**{title}**", ""] if title else []
    if setting:
        lines += [f"Setting: `setting={setting}`" if " " not in setting else f"Setting: {setting}", ""]
    lines += [header, "|" + " --- |" * (header.count("|") - 1)]
    for v in variants:
        row = f"| {v.name} | " + " | ".join(_cell(v, k) for k, _ in COLUMNS) + f" | {len(v.runs)} |"
        if paper:
            numbers = paper.get(v.name)
            row += "".join(
                f" {x:.1f} |" if numbers and not math.isnan(x) else " - |" for x in (numbers or [math.nan] * 4)
            )
        lines.append(row)
    lines.append("")
    lines.append(
        "Mask AP (AP, AP50, AP75) and box AP (AP^bb) in percent, COCO-style (pycocotools), mean ± sample std over seeds."
    )
    return "\n".join(lines)


def setting_table(ours: dict[str, str], paper: dict[str, str]) -> str:
    """Our setting beside the paper's, one row per setting."""
    keys = [k for k in SETTING_ROWS if k in ours or k in paper]
    lines = ["| setting | ours | paper |", "| --- | --- | --- |"]
    lines += [f"| {k} | {ours.get(k, '-')} | {paper.get(k, '-')} |" for k in keys]
    return "\n".join(lines)


def _count(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e6:.3g} M" if count >= 1e6 else f"{count / 1e3:.3g} k"


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def cost_table(variants: list[Variant], comparison: dict) -> str:
    """Per variant: what differs in its built model, mask-head and total parameters, median step and job time."""
    varying = comparison["varying"]
    lines = [
        "| variant | built (what differs between the variants) | mask-head params | params | median step | job wall time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v in variants:
        models = v.models()
        built = ", ".join(f"{k}={_format_value(models[0].get(k))}" for k in varying) if models else "not recorded"
        if v.name in comparison["inconsistent"]:
            built = "**INCONSISTENT: its jobs built different models**"
        step, wall = v.record_mean("step_time_median_s"), v.record_mean("wall_time_s")
        lines.append(
            f"| {v.name} | {built or 'the same model'} | {_count(v.parameters('mask_head'))} | "
            f"{_count(v.parameters('total'))} | {'-' if math.isnan(step) else f'{step:.2f} s'} | {_duration(wall)} |"
        )
    return "\n".join(lines)


def markdown_report(
    variants: list[Variant],
    title: str = "",
    paper: dict[str, list[float]] | None = None,
    paper_setting: dict[str, str] | None = None,
    left_out: list | None = None,
) -> str:
    """The whole ``report.md``: the setting beside the paper's, the results, and what each variant built and cost.

    ``left_out``: ``(job folder, variant, why)`` of the sweep's jobs not in the table (:func:`collect`), named under
    it: a variant whose jobs all failed, or never started, would otherwise be missing from the table without a word.
    """
    ours = our_setting(variants)
    paper_setting = {**PAPER_SETTING, **(paper_setting or {})}
    comparison = compare_models(variants)
    parts = [markdown_table(variants, title, paper, setting_names(variants)), ""]
    if left_out:
        named = "; ".join(
            f"`{job}` {variant} ({why})" if job else f"{variant} ({why})" for job, variant, why in left_out
        )
        parts += [f"**Left out of the table: {len(left_out)} job(s)**: {named}.", ""]
    parts += ["Setting (ours from the jobs' configs and records):", ""]
    parts += [setting_table(ours, paper_setting), ""]
    parts += [f"- {note}" for note in setting_notes(ours, paper_setting)]
    parts += [
        "",
        "What was compared (from the models the jobs built, `job.json`):",
        "",
        cost_table(variants, comparison),
        "",
    ]
    if comparison["varying"]:
        parts.append("The variants' models differ only in: " + ", ".join(f"`{k}`" for k in comparison["varying"]) + ".")
    shared = ", ".join(f"{k}={_format_value(v)}" for k, v in comparison["shared"].items())
    if shared:
        parts.append(f"Shared by all: {shared}.")
    if comparison["inconsistent"]:
        parts.append("**Labels that do not match their models**: " + ", ".join(comparison["inconsistent"]) + ".")
    if comparison["missing"]:
        parts.append("No `job.json` (model not recorded) for: " + ", ".join(comparison["missing"]) + ".")
    rebuilt = sorted(
        {j.record["rebuilt_from"] for v in variants for j in v.jobs if (j.record or {}).get("rebuilt_from")}
    )
    if rebuilt:
        parts.append(
            "No `job.json` (recorded before it existed): models and parameters rebuilt from "
            + "; ".join(rebuilt)
            + " (no step or job times)."
        )
    parts += [
        "",
        "Mask-head params: the mask head's own (C4's res5 is the box head's). Median step: forward, backward and "
        "optimizer step of one training batch. Job wall time: building, training and the final evaluation.",
    ]
    return "\n".join(parts)


def chart_figure(
    variants: list[Variant],
    title: str = "",
    paper: dict[str, list[float]] | None = None,
    ours_label: str = "ours",
    paper_label: str = "paper (He et al. 2017, Table 2)",
):
    """Bars of mask AP, AP50, AP75 and box AP per variant (seed spread as error bars) and, where the paper has
    numbers for the variants, the paper's beside them on a second panel. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = {v.name: paper[v.name] for v in variants if paper and v.name in paper}
    panels = [(ours_label, {v.name: [100 * v.mean(k) for k, _ in COLUMNS] for v in variants}, True)]
    if paper:
        panels.append((paper_label, paper, False))
    width = 0.8 / len(COLUMNS)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(len(panels) * max(6, 1.6 * len(variants) + 2), 4), sharey=True, squeeze=False
    )
    for ax, (name, numbers, spread) in zip(axes[0], panels):
        for i, (key, label) in enumerate(COLUMNS):
            xs = [j + (i - (len(COLUMNS) - 1) / 2) * width for j in range(len(variants))]
            heights = [numbers.get(v.name, [math.nan] * 4)[i] for v in variants]
            errors = [100 * v.std(key) for v in variants] if spread else None
            ax.bar(xs, heights, width, yerr=errors, label=label, capsize=3)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels([v.name.replace(", ", "\n") for v in variants], fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("AP (%)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def chart(
    variants: list[Variant],
    path: str | Path,
    title: str = "",
    paper: dict[str, list[float]] | None = None,
    paper_setting: dict[str, str] | None = None,
) -> None:
    """Save :func:`chart_figure` as a PNG, each panel titled with its setting's backbone and data."""
    import matplotlib.pyplot as plt

    ours = our_setting(variants)
    paper_setting = {**PAPER_SETTING, **(paper_setting or {})}
    ours_label = (
        f"ours: {ours.get('backbone', '?')}, {ours.get('data', '?').split(' (')[0]} {ours.get('image size', '')}"
    )
    paper_label = f"paper (He et al. 2017, Table 2): {paper_setting.get('backbone', 'ResNet-50')}, COCO"
    fig = chart_figure(variants, title, paper, ours_label.strip(), paper_label)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(
    variants: list[Variant],
    title: str,
    variant_keys: list[str],
    paper: dict[str, list[float]] | None = None,
    paper_setting: dict[str, str] | None = None,
) -> dict:
    """The content of ``report.json``."""
    ours = our_setting(variants)
    paper_setting = {**PAPER_SETTING, **(paper_setting or {})}
    comparison = compare_models(variants)
    return {
        "title": title,
        "variant_keys": variant_keys,
        "setting": {
            "name": setting_names(variants),
            "ours": ours,
            "paper": paper_setting,
            "notes": setting_notes(ours, paper_setting),
        },
        "compared": comparison,
        "variants": [
            {
                "variant": v.name,
                "seeds": v.seeds,
                "runs": v.runs,
                "mean": {k: v.mean(k) for k, _ in COLUMNS},
                "std": {k: v.std(k) for k, _ in COLUMNS},
                "paper": (paper or {}).get(v.name),
                "model": (v.models() or [None])[0],
                "parameters": {"total": v.parameters("total"), "mask_head": v.parameters("mask_head")},
                "step_time_median_s": _or_none(v.record_mean("step_time_median_s")),
                "wall_time_s": _or_none(v.record_mean("wall_time_s")),
            }
            for v in variants
        ],
    }


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def write_report(
    sweep_dir: str | Path,
    variant_keys: list[str],
    title: str = "",
    order: list[str] | None = None,
    paper: dict[str, list[float]] | None = None,
    paper_setting: dict[str, str] | None = None,
    stem: str = "report",
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` into ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    left_out: list = []
    variants = collect(sweep_dir, variant_keys, order, left_out)
    if not variants:
        nested = sorted({str(f.parent.relative_to(sweep_dir)) for f in sweep_dir.glob("*/**/multirun.yaml")})
        inside = f" (the sweeps inside it have their own reports: {', '.join(nested)})" if nested else ""
        counts = collections.Counter(why for _, _, why in left_out)
        jobs = f"; its jobs: {', '.join(f'{n} {why}' for why, n in counts.items())}" if counts else ""
        raise ValueError(f"no finished runs (with metrics.json) under {sweep_dir}{inside}{jobs}")
    paths = {kind: sweep_dir / f"{stem}.{kind}" for kind in ("md", "json", "png")}
    summary = summarize(variants, title, variant_keys, paper, paper_setting)
    summary["left_out"] = [{"job": job, "variant": variant, "why": why} for job, variant, why in left_out]
    # Each file is written beside its place and moved there: a reader (or a job's report written at the same time,
    # AblationReportCallback.on_job_end) never sees half a file.
    _replace(
        paths["md"], lambda tmp: tmp.write_text(markdown_report(variants, title, paper, paper_setting, left_out) + "\n")
    )
    # NaN (a paper number the paper does not give) is written as null: report.json stays standard JSON.
    _replace(paths["json"], lambda tmp: tmp.write_text(json.dumps(_nan_to_none(summary), indent=2)))
    _replace(paths["png"], lambda tmp: chart(variants, tmp, title, paper, paper_setting))
    return paths


def _replace(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then move it to ``path`` in one step."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # the suffix names the chart's format
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _report_lock(sweep_dir: Path):
    """Held while a sweep's report is collected and written: jobs of a SLURM array that end together write it in
    turn, each from every job finished before it (else one that collected earlier could write last)."""
    with open(sweep_dir / ".report.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks: the files are still whole (_replace)
            log.warning("writing the report without a lock (%s): %s", sweep_dir, error)
        yield


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


class AblationReportCallback(Callback):
    """Hydra callback: write a sweep's ablation report into the sweep directory, after each job and when it ends.

    Configured by the ``experiment=ablation_*`` configs under ``hydra.callbacks``. When the sweep's
    logger is W&B, the tables and chart also go to a W&B run of ``job_type="report"`` in the
    experiment's group.

    Args:
        variant_keys: config groups or keys that define a variant (e.g. ``["model/pooler"]``); others (seed)
            are averaged.
        title: table and chart title.
        order: variant names in table order.
        paper: published numbers per variant name, ``[AP, AP50, AP75, AP^bb]`` (nan where not reported).
        paper_setting: the paper's setting for this table where it is not :data:`PAPER_SETTING` (e.g. its
            backbone and RoIs per image).
    """

    def __init__(self, variant_keys, title: str = "", order=None, paper=None, paper_setting=None):
        self.variant_keys = list(variant_keys)
        self.title = title
        self.order = list(order) if order else None
        self.paper = {k: [float(x) for x in v] for k, v in (paper or {}).items()}
        self.paper_setting = {str(k): str(v) for k, v in (paper_setting or {}).items()}

    def on_job_end(self, config, job_return, **kwargs) -> None:
        """After each job of a sweep, the report of the jobs finished so far.

        Hydra's sweeper raises on a failed job once every job has run, before ``on_multirun_end``: without this, one
        failed job of twelve would leave no report of the other eleven. A job's report comes after its
        ``metrics.json``; the last job's is the whole sweep's.
        """
        from mrcnn.engine.launch import is_first_process

        if str(config.hydra.mode) != "RunMode.MULTIRUN":
            return  # one job of an experiment run alone (or a DDP child process): no sweep to report
        if not is_first_process():
            return  # one of a job's SLURM tasks (srun starts each in the sweep's job): its first writes the report
        # From where the sweep was started (hydra.runtime.cwd): a job that runs in its own folder (hydra.job.chdir)
        # would read the relative default, multirun/<experiment>/<time>, from there.
        sweep_dir = Path(config.hydra.runtime.cwd, config.hydra.sweep.dir)
        if job_return.status == JobStatus.FAILED:
            log.error("job %s failed: the report leaves it out", config.hydra.job.num)
        try:
            with _report_lock(sweep_dir):
                paths = write_report(
                    sweep_dir, self.variant_keys, self.title, self.order, self.paper, self.paper_setting
                )
        except ValueError as error:
            log.info("no ablation report yet: %s", error)
            return
        except Exception:
            # The job's own results are written; a report can be rebuilt from them (python -m mrcnn.reporting).
            log.exception("the ablation report of the jobs finished so far was not written (%s)", sweep_dir)
            return
        log.info("ablation report of the jobs finished so far: %s", paths["md"])

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = config.hydra.sweep.dir
        try:
            paths = write_report(sweep_dir, self.variant_keys, self.title, self.order, self.paper, self.paper_setting)
        except ValueError as error:
            log.error("ablation report not written: %s", error)
            return
        log.info("ablation report: %s", ", ".join(str(p) for p in paths.values()))
        print(paths["md"].read_text(), flush=True)
        from mrcnn.engine.loggers import builds_wandb_logger

        if any(builds_wandb_logger(c) for c in (config.get("logger") or {}).values()):
            log_to_wandb(paths, config)


def wandb_rows(summary: dict) -> dict[str, tuple[list[str], list[list]]]:
    """The W&B tables of a report (``report.json`` content): ``{name: (columns, rows)}``.

    ``ablation/table``: per variant our means and spreads, the paper's numbers, parameters and times;
    ``ablation/setting``: our setting beside the paper's.
    """
    keys = [k for k, _ in COLUMNS]
    columns = ["variant", "seeds", *[f"{k} mean" for k in keys], *[f"{k} std" for k in keys]]
    columns += [f"paper {label}" for _, label in COLUMNS]
    columns += ["mask-head params", "params", "median step (s)", "job wall time (s)"]
    rows = []
    for v in summary["variants"]:
        paper = v["paper"] or [None] * len(COLUMNS)
        rows.append(
            [
                v["variant"],
                len(v["runs"]),
                *[v["mean"][k] for k in keys],
                *[v["std"][k] for k in keys],
                *paper,
                v["parameters"]["mask_head"],
                v["parameters"]["total"],
                v["step_time_median_s"],
                v["wall_time_s"],
            ]
        )
    setting = summary["setting"]
    keys = [k for k in SETTING_ROWS if k in setting["ours"] or k in setting["paper"]]
    setting_rows = [[k, setting["ours"].get(k, "-"), setting["paper"].get(k, "-")] for k in keys]
    return {"ablation/table": (columns, rows), "ablation/setting": (["setting", "ours", "paper"], setting_rows)}


def log_to_wandb(paths: dict[str, Path], config) -> None:
    """Log the report's tables and chart to a W&B run (offline unless credentials are set)."""
    import wandb

    from mrcnn.engine.loggers import builds_wandb_logger, wandb_mode

    summary = json.loads(paths["json"].read_text())
    logger_cfg = next(c for c in config.logger.values() if builds_wandb_logger(c))
    experiment = config.get("experiment_name") or "ablation"
    run = wandb.init(
        project=logger_cfg.get("project", "mrcnn"),
        group=experiment,
        job_type="report",
        name=f"{experiment}-report",
        dir=str(paths["md"].parent),
        # The jobs' own rule (WANDB_MODE, else online with credentials, else offline): never a login prompt.
        mode=wandb_mode(),
        config={"setting": summary["setting"], "compared": summary["compared"]},
    )
    tables = {name: wandb.Table(columns=columns, data=rows) for name, (columns, rows) in wandb_rows(summary).items()}
    run.log({**tables, "ablation/chart": wandb.Image(str(paths["png"]))})
    run.finish()


def settings_from_sweep(sweep_dir: str | Path) -> dict:
    """The report callback's arguments (variant keys, title, order, paper numbers and setting) as the sweep
    recorded them in ``<sweep_dir>/multirun.yaml``; empty when the sweep had no report callback."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return {}
    callback = OmegaConf.select(OmegaConf.load(path), "hydra.callbacks.ablation_report", default=None)
    if callback is None:
        return {}
    settings = OmegaConf.to_container(callback, resolve=False)
    settings.pop("_target_", None)
    return settings


def project_names(names: list[str], recorded_keys: list[str], keys: list[str]) -> dict[str, str]:
    """``{recorded variant name: its name under keys}``, for the names whose projection no other name shares.

    A report rebuilt with fewer variant keys than its sweep recorded (``--keys model/pooler`` on a sweep labelled by
    backbone and pooler) finds the paper's numbers and the row order under the recorded names: each is carried over
    to the name its values of ``keys`` give, unless two recorded names give the same one (which paper row would it
    be?). Keys that the recorded names do not hold carry nothing over.
    """
    if not set(keys) <= set(recorded_keys):
        return {}
    projected = {}
    for name in names:
        labels = dict(part.split("=", 1) for part in name.split(", ") if "=" in part)
        if set(recorded_keys) <= set(labels):
            projected[name] = variant_name({key: labels[key] for key in keys})
    counts = collections.Counter(projected.values())
    return {name: new for name, new in projected.items() if counts[new] == 1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Rebuild an ablation report from a sweep directory (e.g. after a sweep was stopped early)."
    )
    parser.add_argument("sweep_dir")
    parser.add_argument(
        "--keys",
        nargs="+",
        default=None,
        help="config groups or keys that define a variant, e.g. model/pooler (default: those in the sweep's multirun.yaml)",
    )
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if not Path(args.sweep_dir).is_dir():
        parser.error(f"{args.sweep_dir}: no such folder (give a sweep folder, e.g. multirun/ablation_mask_head/<time>)")
    settings = settings_from_sweep(args.sweep_dir)
    # A report grouped by other keys goes beside the sweep's own report files, never over them.
    stem = "report"
    if args.keys and args.keys != settings.get("variant_keys"):
        stem = "report_by_" + "_".join(re.sub(r"\W+", "-", key).strip("-") for key in args.keys)
    if args.keys:
        recorded = settings.get("variant_keys")
        if recorded and args.keys != recorded:
            # The paper's rows and the order are keyed by the recorded names: carried over where they map one to one,
            # among the variants the sweep ran (a roialign sweep of C4 jobs records Table 2d's C5 rows as well).
            log.disabled = True  # this pass only names the variants: the report's own pass says what it skips
            try:
                ran = {variant.name for variant in collect(args.sweep_dir, list(recorded))}
            finally:
                log.disabled = False
            names = [name for name in [*(settings.get("paper") or {}), *(settings.get("order") or [])] if name in ran]
            renamed = project_names(names, list(recorded), args.keys)
            if settings.get("paper"):
                settings["paper"] = {renamed[k]: v for k, v in settings["paper"].items() if k in renamed}
            if settings.get("order"):
                settings["order"] = list(dict.fromkeys(renamed[k] for k in settings["order"] if k in renamed))
        settings["variant_keys"] = args.keys
    if args.title is not None:
        settings["title"] = args.title
    if not settings.get("variant_keys"):
        sweep_record = Path(args.sweep_dir) / "multirun.yaml"
        # Naming a file that is not there as the one lacking the callback would send the user looking for it.
        if (Path(args.sweep_dir) / ".hydra" / "config.yaml").is_file() and not sweep_record.is_file():
            parser.error(
                f"{args.sweep_dir} is a single run's folder, not a sweep's: it has no multirun.yaml, which Hydra "
                "writes in the folder of a sweep started with -m (e.g. multirun/ablation_mask_head/<time>). Give "
                f"that folder; a single run's numbers are in {Path(args.sweep_dir) / 'metrics.json'}"
            )
        if not sweep_record.is_file():
            parser.error(
                f"--keys is needed: {args.sweep_dir} has no multirun.yaml (Hydra writes one in the folder of a sweep "
                "started with -m) to name the variant keys; give the sweep's folder, or --keys <config groups or keys "
                "that define a variant>"
            )
        parser.error(f"--keys is needed: {sweep_record} has no ablation_report callback")
    # The callback's own constructor normalises the recorded settings, as when Hydra built it for the sweep.
    report = AblationReportCallback(**settings)
    try:
        paths = write_report(
            args.sweep_dir, report.variant_keys, report.title, report.order, report.paper, report.paper_setting, stem
        )
    except ValueError as error:  # nothing to report yet: said, not a traceback
        parser.exit(1, f"{parser.prog}: {error}\n")
    print(paths["md"].read_text())
    print("wrote", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
