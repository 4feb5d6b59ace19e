"""Fixtures every test shares; helpers to import live in ``tests/helpers/``."""

import os
import resource

import pytest
import torch

from tests.helpers.config import ROOT

# What Python and pytest themselves write in the repository's folder while the tests run.
_TOOL_ENTRIES = {"__pycache__", ".pytest_cache"}

# Removed before any test: what a cluster, a launcher or a W&B login leaves in the shell that runs pytest. The tests
# set what they need themselves. Run inside a SLURM allocation, a DDP test's processes would take the ranks SLURM gave
# the shell and wait for peers that never come; a MASTER_PORT would make every DDP test share one port.
_FOREIGN_PREFIXES = ("SLURM_", "SUBMITIT_", "MRCNN_DDP_", "WANDB_", "PL_")
_FOREIGN_NAMES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE")
for _name in [name for name in os.environ if name.startswith(_FOREIGN_PREFIXES) or name in _FOREIGN_NAMES]:
    del os.environ[_name]


# No core files: a process the tests end with SIGABRT (tests/helpers/runs.py::run_process, at a hang) would write one
# of hundreds of MB per process, into the repository's folder where the kernel names them "core". Inherited by every
# process the tests start.
resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))

# Set in this process by Lightning's seed_everything (a training run in process sets them too) and read by the next
# run's datamodule and loader workers when it has no seed of its own: each test starts without them.
_SEED_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture(autouse=True)
def _no_seed_from_an_earlier_test(monkeypatch):
    for name in _SEED_ENV:
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture(autouse=True)
def _few_threads():
    # The CI machine has 2 cores; keep tests from oversubscribing them.
    torch.set_num_threads(2)
    yield


def _repository_entries() -> set[str]:
    return {entry.name for entry in os.scandir(ROOT)} - _TOOL_ENTRIES


@pytest.fixture(autouse=True)
def _writes_nothing_in_the_repository():
    # A test writes under tmp_path, which pytest deletes once the test passes (pyproject.toml's
    # tmp_path_retention_policy). What it wrote in the repository's folder instead (Lightning writes checkpoints/ and
    # lightning_logs/ under the working directory unless told otherwise) would pile up in CI's checkout and in a
    # developer's tree, and leave later tests a folder that is not empty.
    before = _repository_entries()
    yield
    left = sorted(_repository_entries() - before)
    if left:
        pytest.fail(f"the test left {left} in {ROOT}: write under tmp_path instead", pytrace=False)
