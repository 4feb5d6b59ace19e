"""Overlays: masks in their instance's colour, the most confident one's where they overlap."""

import torch

from mrcnn.engine.visualize import blend_masks, draw_instances, instance_colors


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


def test_draw_instances_colours_an_overlap_like_its_best_detection():
    image = torch.full((3, 64, 64), 0.8)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, 10:40, 10:40] = 1.0
    masks[1, 0, 20:50, 20:50] = 1.0
    detections = {
        "boxes": torch.tensor([[10.0, 10, 40, 40], [20, 20, 50, 50]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.95, 0.6]),
        "masks": masks,
    }
    drawn = draw_instances(image, detections, ["a", "b"], score_threshold=0.5, min_size=0)
    first = torch.tensor(instance_colors(2)[0], dtype=torch.float32)
    expected = (204 * 0.5 + first * 0.5).round()  # alpha 0.5 over the grey 0.8 * 255
    assert torch.equal(drawn[:, 30, 30].float(), expected), (drawn[:, 30, 30], expected)
