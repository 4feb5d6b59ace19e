"""The project's config as tests compose it, and the tiny model the tests share."""

import copy
import functools
from pathlib import Path

from omegaconf import DictConfig

import mrcnn.config
from mrcnn.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[2]
assert Path(CONFIG_DIR) == ROOT / "configs"

# The model of the unit tests (configs/model/tiny.yaml: same code paths as the real ones) on 64x64 shapes, as
# `python run.py debug=fast` trains it (configs/debug/fast.yaml).
TINY_MODEL = ["model=tiny", "data.image_size=64"]


def compose_config(overrides=(), run_dir="/tmp/mrcnn-test-run", return_hydra_config=False):
    """:func:`mrcnn.config.compose_config`, with a run folder for tests.

    A composition takes about 0.15 s and the suite asks for the same one many times, so each is composed once per
    test session and handed out as a copy (a test may change its config). Only the project's own configs are
    cached: they do not change while the tests run, where a test's own config folder (``hydra.searchpath``) may;
    and not with the ``hydra`` node, which holds the process's state (its working folder).
    """
    overrides = tuple(overrides)
    if return_hydra_config or any(override.lstrip("+").startswith("hydra.searchpath") for override in overrides):
        return mrcnn.config.compose_config(overrides, run_dir=run_dir, return_hydra_config=return_hydra_config)
    return copy.deepcopy(_composed(overrides, run_dir))


@functools.cache
def _composed(overrides: tuple[str, ...], run_dir: str) -> DictConfig:
    return mrcnn.config.compose_config(overrides, run_dir=run_dir)
