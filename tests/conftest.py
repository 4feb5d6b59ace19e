"""Fixtures every test shares; helpers to import live in ``tests/helpers/``."""

import os

import pytest
import torch

# Removed before any test: what a cluster, a launcher or a W&B login leaves in the shell that runs pytest. The tests
# set what they need themselves. Run inside a SLURM allocation, a DDP test's processes would take the ranks SLURM gave
# the shell and wait for peers that never come; a MASTER_PORT would make every DDP test share one port.
_FOREIGN_PREFIXES = ("SLURM_", "SUBMITIT_", "MRCNN_DDP_", "WANDB_", "PL_")
_FOREIGN_NAMES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE")
for _name in [name for name in os.environ if name.startswith(_FOREIGN_PREFIXES) or name in _FOREIGN_NAMES]:
    del os.environ[_name]


@pytest.fixture(autouse=True)
def _few_threads():
    # The CI machine has 2 cores; keep tests from oversubscribing them.
    torch.set_num_threads(2)
    yield
