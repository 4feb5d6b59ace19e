"""The project's config as tests compose it, and the tiny model the tests share."""

from pathlib import Path

import mrcnn.config
from mrcnn.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[2]
assert Path(CONFIG_DIR) == ROOT / "configs"

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
    """:func:`mrcnn.config.compose_config`, with a run folder for tests."""
    return mrcnn.config.compose_config(overrides, run_dir=run_dir, return_hydra_config=return_hydra_config)
