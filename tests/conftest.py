"""Shared helpers: compose the project's Hydra config without running Hydra's app."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import mrcnn.config  # noqa: F401  (registers the config resolvers)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

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
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose(
            "train", overrides=[f"run_dir={run_dir}", *overrides], return_hydra_config=return_hydra_config
        )


@pytest.fixture(autouse=True)
def _few_threads():
    # The CI machine has 2 cores; keep tests from oversubscribing them.
    torch.set_num_threads(2)
    yield
