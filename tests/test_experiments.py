"""Every ablation experiment's default sweep: each variant composes and builds, and the variants differ only in
the switches the ablation is about (the same data, schedule, optimizer and seeds for all of them)."""

import itertools
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mrcnn.report import AblationReportCallback
from tests.helpers.config import CONFIG_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("ablation_*.yaml"))
# What must not change between the variants of one ablation.
SHARED = ("data", "trainer", "optimizer", "scheduler", "base_lr", "seed", "final_eval")


def sweep_variants(params):
    """An experiment's default sweep (``hydra.sweeper.params``) as lists of overrides, one list per variant
    (seeds left out)."""
    swept = {key: str(values).split(",") for key, values in params.items() if key != "seed"}
    assert str(params["seed"]).split(",") == ["0", "1", "2"]
    # Seeds outermost, so a sweep stopped early still has every variant.
    assert next(iter(params)) == "seed"
    return [
        [f"{key}={value}" for key, value in zip(swept, combo)]
        for combo in itertools.product(*swept.values())
    ]


def test_every_ablation_is_found():
    assert EXPERIMENTS == ["ablation_backbone", "ablation_mask_head", "ablation_mask_loss", "ablation_roialign"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_ablation_variants_build_with_identical_settings(name):
    hydra = compose_config([f"experiment={name}"], return_hydra_config=True).hydra
    variants = sweep_variants(hydra.sweeper.params)
    assert len(variants) >= 2
    callback = instantiate(hydra.callbacks.ablation_report)
    assert isinstance(callback, AblationReportCallback)

    shared = None
    for overrides in variants:
        cfg = compose_config([f"experiment={name}", *overrides])
        net = instantiate(cfg.model.net)
        assert sum(p.numel() for p in net.parameters()) > 0
        resolved = OmegaConf.to_container(cfg, resolve=True)
        settings = {key: resolved.get(key) for key in SHARED}
        shared = shared or settings
        assert settings == shared, f"{name}: {overrides} changes a setting shared by the ablation's variants"
        # The report puts the paper's numbers beside every default variant.
        variant_name = ", ".join(o.lstrip("+") for o in overrides)
        assert variant_name in callback.paper, f"{name}: no paper numbers for {variant_name}"
