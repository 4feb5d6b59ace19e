"""torch.compile of the heads (``module.compile=true``): a bounded number of graphs, whatever the number of RoIs.

The RoI buckets make the heads' row counts repeat, but a step still brings one of several (the mask head's positives
padded to 16, 32, 64, ...). Compiled for static shapes, each new count would be one more graph, and past dynamo's
cache limit (8) the head would silently fall back to eager. ``MaskRCNNModule`` compiles the heads with
``dynamic=True``: one graph for every count. One exception: when the first count equals a channel count of the head
(``model=small``: 64 positives and 64 channels), dynamo's duck sizing ties the two and specializes the row count, so
the next count compiles a second, dynamic graph; then no more. The ``aot_eager`` backend traces what inductor would
get, in seconds.
"""

import logging

import pytest
import torch
from hydra.utils import instantiate
from torch._dynamo.utils import counters

from tests.helpers.config import TINY_MODEL, compose_config


def _graphs_after_calls(row_counts) -> int:
    """Unique graphs traced for the tiny model's compiled box and mask heads over calls with ``row_counts`` rows."""
    torch._dynamo.reset()
    counters.clear()
    cfg = compose_config([*TINY_MODEL, "module.compile=true", "+module.compile_kwargs.backend=aot_eager"])
    torch.manual_seed(0)
    heads = instantiate(cfg.module).model.roi_heads
    channels, box_side, mask_side = cfg.model.feature_channels, cfg.model.box_resolution, cfg.model.mask_resolution
    for rows in row_counts:
        heads.box_head(torch.randn(rows, channels, box_side, box_side)).sum().backward()
        heads.mask_head(torch.randn(rows, channels, mask_side, mask_side)).sum().backward()
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(
    "row_counts, graphs",
    [
        ((32, 16, 64, 128, 48, 256), 2),  # one graph a head
        ((16, 32, 64, 128, 48, 256), 4),  # the first count is the heads' 16 channels: two a head, then no more
    ],
)
def test_the_compiled_heads_trace_one_graph_each_for_every_number_of_rois(row_counts, graphs):
    assert _graphs_after_calls(row_counts) == graphs


def test_compiling_says_the_first_steps_wait_and_arguments_without_it_are_named(caplog):
    with caplog.at_level(logging.INFO, logger="mrcnn.lit_module"):
        instantiate(compose_config([*TINY_MODEL, "module.compile=true"]).module)
    assert (
        "module.compile=true: the backbone and the box and mask heads are compiled at their first calls" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mrcnn.lit_module"):
        instantiate(compose_config([*TINY_MODEL, "+module.compile_kwargs.mode=max-autotune"]).module)
    assert "module.compile_kwargs={'mode': 'max-autotune'} is read only with module.compile=true" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mrcnn.lit_module"):
        instantiate(compose_config(TINY_MODEL).module)
    assert "compile" not in caplog.text
