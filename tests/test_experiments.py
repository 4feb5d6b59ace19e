"""Every ablation experiment: the jobs its sweep launches (also when a user narrows it), the label of each job
against the model it built, and that the variants differ only in the ablated part (the same data, schedule,
optimizer, seeds, and every other part of the model)."""

from pathlib import Path

import pytest
import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mrcnn.data.shapes import ShapesDataset
from mrcnn.modeling.mask_rcnn import LOSS_KEYS
from mrcnn.reporting.job_record import describe_model
from mrcnn.reporting.report import AblationReportCallback, label_value, settings_from_sweep, variant_name
from tests.helpers.config import CONFIG_DIR, TINY_MODEL, compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("ablation_*.yaml"))
# What must not change between the variants of one ablation.
SHARED = ("data", "trainer", "optimizer", "scheduler", "base_lr", "seed", "final_eval")

# What each option must build, written out here (not read from the option's file): the test's oracle that a job
# labelled `key=value` ran that model. Values are those of mrcnn.reporting.job_record.describe_model.
BUILT = {
    "model/pooler=roi_pool": {"pooler": "RoIPoolPooler", "pooler.mode": "max"},
    "model/pooler=roi_warp": {"pooler": "RoIWarpPooler", "pooler.mode": "avg", "pooler.sampling_ratio": 2},
    "model/pooler=roi_warp_max": {"pooler": "RoIWarpPooler", "pooler.mode": "max", "pooler.sampling_ratio": 2},
    "model/pooler=roi_align": {"pooler": "RoIAlignPooler", "pooler.mode": "avg", "pooler.aligned": False},
    "model/pooler=roi_align_max": {"pooler": "RoIAlignPooler", "pooler.mode": "max", "pooler.aligned": False},
    "model/pooler=roi_align_aligned": {
        "pooler": "RoIAlignPooler",
        "pooler.mode": "avg",
        "pooler.aligned": True,
        "mask_targets.aligned": True,
    },
    "model/backbone=c4": {"backbone": "ResNet-18-C4", "roi_heads": "Res5RoIHeads", "box_head": "Res5BoxHead"},
    "model/backbone=c5": {"backbone": "ResNet-18-C5", "roi_heads": "RoIHeads", "box_head": "MLPBoxHead"},
    "model/backbone=fpn": {"backbone": "ResNet-18-FPN", "roi_heads": "RoIHeads", "box_head": "MLPBoxHead"},
    # model=small: 64-channel FCN convs, so 4 x 64 = 256-wide MLP fc layers.
    "model/mask_head=mlp2": {"mask_head": "MLPMaskHead", "mask_head.fc": [256, 256], "mask_head.class_agnostic": False},
    "model/mask_head=mlp3": {
        "mask_head": "MLPMaskHead",
        "mask_head.fc": [256, 256, 256],
        "mask_head.class_agnostic": False,
    },
    "model/mask_head=fcn": {"mask_head": "FCNMaskHead", "mask_head.width": 64, "mask_head.class_agnostic": False},
    "ablation/mask_loss=softmax": {
        "mask_loss": "SoftmaxMaskLoss",
        "mask_head": "FCNMaskHead",
        "mask_head.class_agnostic": False,
    },
    "ablation/mask_loss=sigmoid": {
        "mask_loss": "SigmoidMaskLoss",
        "mask_head": "FCNMaskHead",
        "mask_head.class_agnostic": False,
    },
    "ablation/mask_loss=sigmoid_agnostic": {
        "mask_loss": "SigmoidMaskLoss",
        "mask_head": "FCNMaskHead",
        "mask_head.class_agnostic": True,
    },
}
# The parts of the built model each ablation is about: its variants' models may differ there and nowhere else.
ABLATED = {
    "ablation_roialign": {"pooler", "pooler.mode", "pooler.sampling_ratio", "pooler.aligned"},
    "ablation_mask_loss": {"mask_loss", "mask_head.class_agnostic"},
    # Normalised alike (model.head_norm): GroupNorm after every hidden layer of both at setting=cpu, none in either at
    # setting=paper.
    "ablation_mask_head": {"mask_head", "mask_head.convs", "mask_head.width", "mask_head.fc", "mask_head.input_size"},
    # C4 vs FPN is a different design of the whole network: res5 as the box head, one map, no mask convs.
    "ablation_backbone": {
        "backbone",
        "roi_heads",
        "box_head",
        "box_head.width",
        "pooler.box_size",
        "pooler.mask_size",
        "mask_head.convs",
        "mask_head.norm",  # C4's mask branch has no convs to normalise (res5 and a deconv)
    },
}


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The jobs ``python run.py *args`` launches: each job's overrides, as Hydra's basic sweeper makes them from
    the experiment's ``hydra.sweeper.params`` and the command line (a user's ``key=a,b`` replaces the sweep's
    entry for the same key)."""
    parser = OverridesParser.create()
    plain = [o.input_line for o in parser.parse_overrides(args) if not o.is_sweep_override()]
    params = compose_config(plain, return_hydra_config=True).hydra.sweeper.params
    overrides = parser.parse_overrides([f"{key}={value}" for key, value in params.items()] + list(args))
    [jobs] = BasicSweeper.split_arguments(overrides, None)
    return jobs


def job_label(cfg, variant_keys: list[str], overrides: list[str]) -> str:
    """The report's label of a job, from its composed config (as ``mrcnn.reporting.report`` reads it from the job folder)."""
    choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if v is not None}
    given = dict(o.lstrip("+").split("=", 1) for o in overrides)
    return variant_name({k: label_value(k, choices, given, cfg) for k in variant_keys})


def resolved(cfg, key: str):
    value = cfg.get(key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def report_callback(name: str) -> AblationReportCallback:
    callback = instantiate(
        compose_config([f"experiment={name}"], return_hydra_config=True).hydra.callbacks.ablation_report
    )
    assert isinstance(callback, AblationReportCallback)
    return callback


def assert_built(label: str, model: dict) -> None:
    """The model a job labelled ``label`` built is what each ``key=value`` of the label names."""
    for part in label.split(", "):
        expected = BUILT[part]
        assert {k: model[k] for k in expected} == expected, f"{part} built {model}"


def test_every_ablation_is_found():
    assert EXPERIMENTS == ["ablation_backbone", "ablation_mask_head", "ablation_mask_loss", "ablation_roialign"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_job_is_labelled_by_the_model_it_built_and_siblings_differ_only_in_the_ablated_part(name):
    callback = report_callback(name)
    jobs = sweep_jobs([f"experiment={name}"])
    seeds = [dict(o.split("=", 1) for o in job)["seed"] for job in jobs]
    # Seeds outermost, so a sweep stopped early still has every variant; three seeds.
    assert seeds == sorted(seeds) and sorted(set(seeds)) == ["0", "1", "2"]
    first_seed = [job for job in jobs if "seed=0" in job]
    assert len(first_seed) >= 2 and len(jobs) == 3 * len(first_seed)

    models, shared = {}, None
    for overrides in first_seed:
        cfg = compose_config(overrides, return_hydra_config=True)
        label = job_label(cfg, callback.variant_keys, overrides)
        model = describe_model(instantiate(cfg.model.net))
        assert_built(label, model)
        models[label] = model
        # The report puts the paper's row beside every default variant.
        assert label in callback.paper, f"{name}: no paper numbers for {label}"
        settings = {key: resolved(cfg, key) for key in SHARED}
        shared = shared or settings
        assert settings == shared, f"{name}: {overrides} changes a setting shared by the ablation's variants"
    assert len(models) == len(first_seed), f"{name}: two jobs got the same label"
    reference = next(iter(models.values()))
    for label, model in models.items():
        differs = {k for k in model.keys() | reference.keys() if model.get(k) != reference.get(k)}
        assert differs <= ABLATED[name], f"{name}: {label} also changes {differs - ABLATED[name]}"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_paper_row_maps_to_a_checked_option(name):
    """Each paper row is keyed by options whose built model the BUILT table pins (operator and reduction)."""
    callback = report_callback(name)
    for row in callback.paper:
        assert all(part in BUILT for part in row.split(", ")), row
    assert set(callback.order or []) >= set(callback.paper)


def test_the_roialign_rows_sit_beside_the_paper_rows_with_the_same_operator_and_reduction():
    paper = report_callback("ablation_roialign").paper
    # Table 2c: RoIPool 26.9; RoIWarp max 27.2, ave 27.1; RoIAlign max 30.2, ave 30.3.
    assert paper["model/backbone=c4, model/pooler=roi_warp_max"][0] == 27.2
    assert paper["model/backbone=c4, model/pooler=roi_warp"][0] == 27.1
    assert paper["model/backbone=c4, model/pooler=roi_align_max"][0] == 30.2
    assert paper["model/backbone=c4, model/pooler=roi_align"][0] == 30.3
    assert (
        BUILT["model/pooler=roi_warp_max"]["pooler.mode"] == "max"
        and BUILT["model/pooler=roi_warp"]["pooler.mode"] == "avg"
    )


def test_every_swept_option_has_an_oracle():
    for group in ("model/pooler", "model/backbone", "model/mask_head", "ablation/mask_loss"):
        for option in sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml")):
            if option != "fcn_agnostic":  # swept through ablation/mask_loss=sigmoid_agnostic
                assert f"{group}={option}" in BUILT, f"add {group}={option} to BUILT"


NARROWED = [
    # (what a user types, the labels of exactly the jobs it must run, in order)
    (
        ["experiment=ablation_mask_loss", "ablation/mask_loss=softmax,sigmoid", "seed=0"],
        ["ablation/mask_loss=softmax", "ablation/mask_loss=sigmoid"],
    ),
    (
        ["experiment=ablation_mask_loss", "ablation/mask_loss=sigmoid_agnostic", "seed=1,2"],
        ["ablation/mask_loss=sigmoid_agnostic"] * 2,
    ),
    (
        ["experiment=ablation_roialign", "model/pooler=roi_warp,roi_warp_max", "seed=0"],
        ["model/backbone=c4, model/pooler=roi_warp", "model/backbone=c4, model/pooler=roi_warp_max"],
    ),
    (
        ["experiment=ablation_roialign", "model/backbone=c5", "model/pooler=roi_pool,roi_align", "seed=2"],
        ["model/backbone=c5, model/pooler=roi_pool", "model/backbone=c5, model/pooler=roi_align"],
    ),
    (
        ["experiment=ablation_mask_head", "model/mask_head=fcn,mlp2", "seed=0"],
        ["model/mask_head=fcn", "model/mask_head=mlp2"],
    ),
    (["experiment=ablation_backbone", "model/backbone=fpn", "seed=0"], ["model/backbone=fpn"]),
]


@pytest.mark.parametrize("args, labels", NARROWED, ids=[" ".join(a[1:]) for a, _ in NARROWED])
def test_a_narrowed_sweep_runs_exactly_the_named_jobs_labelled_by_what_they_ran(args, labels):
    name = args[0].split("=", 1)[1]
    callback = report_callback(name)
    jobs = sweep_jobs(args)
    got = []
    for overrides in jobs:
        cfg = compose_config(overrides, return_hydra_config=True)
        label = job_label(cfg, callback.variant_keys, overrides)
        assert_built(label, describe_model(instantiate(cfg.model.net)))
        got.append(label)
    assert got == labels


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_one_job_of_an_experiment_runs_its_first_variant(name):
    """``python run.py experiment=X hydra.mode=RUN`` builds the sweep's first variant, not the default model."""
    callback = report_callback(name)
    first = sweep_jobs([f"experiment={name}"])[0]
    cfg = compose_config([f"experiment={name}", "hydra.mode=RUN"], return_hydra_config=True)
    label = job_label(cfg, callback.variant_keys, [])
    assert label == job_label(compose_config(first, return_hydra_config=True), callback.variant_keys, first)
    assert_built(label, describe_model(instantiate(cfg.model.net)))


def test_both_mask_losses_of_table_2b_train_on_the_same_binary_targets():
    for option in ("softmax", "sigmoid", "sigmoid_agnostic"):
        cfg = compose_config(["experiment=ablation_mask_loss", f"ablation/mask_loss={option}"])
        assert describe_model(instantiate(cfg.model.net))["mask_targets"] == "binary"
    # Everywhere else the parity default: torchvision's soft targets.
    assert describe_model(instantiate(compose_config([]).model.net))["mask_targets"] == "soft"


@pytest.mark.parametrize("model", ["small", "mask_rcnn"])
def test_the_mlp_mask_heads_are_narrowed_with_the_fcn(model):
    """The paper's MLP fc layers are 4x its FCN's conv width (1024 vs 256); a narrowed model keeps the ratio."""
    for head in ("mlp2", "mlp3"):
        built = describe_model(instantiate(compose_config([f"model={model}", f"model/mask_head={head}"]).model.net))
        fcn = describe_model(instantiate(compose_config([f"model={model}"]).model.net))
        assert set(built["mask_head.fc"]) == {4 * fcn["mask_head.width"]}
    assert fcn["mask_head.width"] == (256 if model == "mask_rcnn" else 64)


def test_an_mlp_mask_head_on_c4_builds_from_res5_output_and_trains():
    """Table 2e's heads on C4 (``experiment=ablation_mask_head model/backbone=c4``): the MLP reads res5's 7x7."""
    cfg = compose_config(["experiment=ablation_mask_head", "model/backbone=c4", *TINY_MODEL, "model/mask_head=mlp2"])
    net = instantiate(cfg.model.net)
    assert describe_model(net)["mask_head.input_size"] == 7
    image, target = ShapesDataset(num_images=1, image_size=64, seed=1)[0]
    net.train()
    _, losses = net([image], [target])
    assert set(losses) == set(LOSS_KEYS) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


EXPERIMENTS_DIR = Path(CONFIG_DIR).parent / "experiments"
RECORDED = sorted(p.relative_to(EXPERIMENTS_DIR).as_posix() for p in EXPERIMENTS_DIR.rglob("multirun.yaml"))
# Recorded commands that today's configs no longer take, and why (their records are kept for the history).
OLD_COMMANDS = {
    "ablation_mask_loss/multirun.yaml": "swept +ablation/mask_loss=..., before the experiment chose the group itself",
}


@pytest.mark.parametrize("name", RECORDED)
def test_every_recorded_sweep_still_composes_and_rebuilds_its_report(name):
    """A recorded ``experiments/**/multirun.yaml``: its report settings still build the report callback (what
    ``python -m mrcnn.reporting <sweep>`` rebuilds the report with), and its command composes every job with
    today's configs, each job's choices applied (so ``model/backbone=c4`` and the like keep their meaning)."""
    path = EXPERIMENTS_DIR / name
    recorded = OmegaConf.load(path)
    settings = settings_from_sweep(path.parent)
    assert settings.get("variant_keys"), f"{name}: no ablation_report settings"
    AblationReportCallback(**settings)
    if name in OLD_COMMANDS:
        return
    parser = OverridesParser.create()
    params = [f"{key}={value}" for key, value in recorded.hydra.sweeper.params.items()]
    [jobs] = BasicSweeper.split_arguments(parser.parse_overrides(params + list(recorded.hydra.overrides.task)), None)
    # The seeds change no choice: one job per variant.
    variants = {tuple(o for o in job if not o.startswith("seed=")): job for job in jobs}
    assert variants
    for job in variants.values():
        choices = compose_config(job, return_hydra_config=True).hydra.runtime.choices
        for override in job:
            key, value = override.lstrip("+").split("=", 1)
            if key in choices:
                assert choices[key] == value, f"{name}: {job}"


def test_the_mask_loss_ablation_keeps_each_variants_switch_when_the_head_is_narrowed():
    # model/mask_head=mlp2 narrows every variant to the MLP head; the agnostic variant still predicts one mask.
    from hydra.utils import instantiate

    from mrcnn.config import check_ablation_overrides

    for option, agnostic in (("sigmoid", False), ("sigmoid_agnostic", True), ("softmax", False)):
        cfg = compose_config(["experiment=ablation_mask_loss", f"ablation/mask_loss={option}", "model/mask_head=mlp2"])
        head = instantiate(cfg.model.net.roi_heads.mask_head)
        assert type(head).__name__ == "MLPMaskHead" and head.class_agnostic is agnostic, option
    # model/mask_loss= beside the ablation's switch would give every variant one loss under its own label.
    choices = {"ablation/mask_loss": "sigmoid", "model/mask_loss": "softmax"}
    with pytest.raises(ValueError, match=r"model/mask_loss=softmax: the ablation/mask_loss switch of this run picks"):
        check_ablation_overrides(choices, ["ablation/mask_loss=sigmoid,softmax", "model/mask_loss=softmax"])
    check_ablation_overrides(choices, ["ablation/mask_loss=sigmoid,softmax", "model/mask_head=mlp2"])
    check_ablation_overrides({"ablation/mask_loss": None}, ["model/mask_loss=softmax"])
