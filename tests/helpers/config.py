"""Compose the project's Hydra config without running Hydra's app, and the tiny model the tests share."""

from pathlib import Path

from hydra import compose, initialize_config_dir

import mrcnn.config  # noqa: F401  (registers the config resolvers)

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "configs")

# A model small enough for unit tests: same code paths as the real ones.
TINY_MODEL = [
    "model.depth=18",
    "model.fpn_channels=16",
    "model.mask_head_dim=16",
    "model.box_head_dim=32",
    "model.rois_per_image=32",
    "data.image_size=64",
]


def compose_config(overrides=(), run_dir="/tmp/mrcnn-test-run", return_hydra_config=False):
    """The composed ``train`` config with ``overrides`` (Hydra's override syntax), as ``run.py`` would build it."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"run_dir={run_dir}", *overrides], return_hydra_config=return_hydra_config)
