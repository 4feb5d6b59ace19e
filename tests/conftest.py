"""Fixtures every test shares; helpers to import live in ``tests/helpers/``."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    # The CI machine has 2 cores; keep tests from oversubscribing them.
    torch.set_num_threads(2)
    yield
