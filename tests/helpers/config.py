"""The project's config as tests compose it, and the tiny model the tests share."""

from pathlib import Path

import mrcnn.config
from mrcnn.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[2]
assert Path(CONFIG_DIR) == ROOT / "configs"

# The model of the unit tests (configs/model/tiny.yaml: same code paths as the real ones) on 64x64 shapes, as
# `python run.py debug=fast` trains it (configs/debug/fast.yaml).
TINY_MODEL = ["model=tiny", "data.image_size=64"]


def compose_config(overrides=(), run_dir="/tmp/mrcnn-test-run", return_hydra_config=False):
    """:func:`mrcnn.config.compose_config`, with a run folder for tests."""
    return mrcnn.config.compose_config(overrides, run_dir=run_dir, return_hydra_config=return_hydra_config)
