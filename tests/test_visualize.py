"""Overlays: masks in their instance's colour, the most confident one's where they overlap."""

import torch

from mrcnn.engine.visualize import blend_masks


def test_overlapping_masks_show_the_most_confident_ones_colour():
    canvas = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 1:5, 1:5] = True
    masks[1, 3:7, 3:7] = True
    red, blue = (255, 0, 0), (0, 0, 255)
    out = blend_masks(canvas, masks, [red, blue], 0.5, scores=torch.tensor([0.3, 0.9]))
    assert out[:, 0, 0].tolist() == [200, 200, 200]  # no mask: unchanged
    assert out[:, 1, 1].tolist() == [228, 100, 100]  # the first alone: half red
    assert out[:, 6, 6].tolist() == [100, 100, 228]  # the second alone: half blue
    assert out[:, 4, 4].tolist() == [100, 100, 228]  # both: the more confident (blue), not darkened
    assert blend_masks(canvas, masks, [red, blue], 0.5)[:, 4, 4].tolist() == [228, 100, 100]  # no scores: the first
