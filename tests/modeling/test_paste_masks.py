"""Masks pasted into the image for all detections at once (issue 22): torchvision's pixels, no host read per detection."""

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from mrcnn.modeling.transform import RCNNTransform, paste_masks
from tests.helpers.host_syncs import count_host_syncs


def detections(count, height, width, size=28, seed=0):
    """Random masks and boxes clipped to the image, some on its borders, none thinner than the model keeps."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(count, 1, size, size, generator=g)
    corner = torch.rand(count, 2, generator=g) * torch.tensor([width, height]) * 1.1 - 5
    extent = torch.rand(count, 2, generator=g) * torch.tensor([width, height]) * 0.6 + 0.02
    boxes = torch.cat([corner, corner + extent], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2:] - boxes[:, :2] > 0.01).all(dim=1)  # fast_rcnn_inference's remove_small_boxes
    return masks[keep], boxes[keep]


@pytest.mark.parametrize("size", [28, 14, 7])
@pytest.mark.parametrize("seed", range(4))
def test_pasted_masks_are_torchvisions_to_float_rounding(size, seed):
    height, width = 70 + 37 * seed, 120 - 13 * seed
    masks, boxes = detections(25, height, width, size, seed)
    expected = paste_masks_in_image(masks, boxes, (height, width))
    got = paste_masks(masks, boxes, (height, width))
    assert got.shape == expected.shape == (len(masks), 1, height, width) and len(masks) > 15
    # The same two bilinear taps per pixel, weights and sums rounded in another order: a few float32 ulps (a pixel
    # pasted one place off, or a box one pixel wider, would differ by a mask value).
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_no_detections_and_low_precision():
    masks, boxes = detections(6, 40, 50)
    assert paste_masks(masks[:0], boxes[:0], (40, 50)).shape == (0, 1, 40, 50)
    half = paste_masks(masks.bfloat16(), boxes, (40, 50))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), paste_masks(masks, boxes, (40, 50)), rtol=0, atol=4e-3)


def test_pasting_under_bf16_autocast_computes_in_float32():
    # A bf16-mixed validation pastes under autocast: the products must not drop to bf16 there.
    masks, boxes = detections(20, 90, 110, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = paste_masks(masks, boxes, (90, 110))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, paste_masks(masks, boxes, (90, 110)), rtol=0, atol=0)


def test_postprocess_pastes_without_a_host_read_per_detection():
    transform = RCNNTransform((64,), 96, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    masks, boxes = detections(30, 48, 64)
    result = [{"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64), "masks": masks}]
    _, theirs = count_host_syncs(lambda: paste_masks_in_image(masks, boxes, (96, 128)))
    (pasted,), ours = count_host_syncs(
        lambda: transform.postprocess([dict(r) for r in result], [(48, 64)], [(96, 128)])
    )
    assert sum(ours.values()) == 0, ours.report()
    assert sum(theirs.values()) >= len(boxes)  # torchvision reads every box's corners on the host
    torch.testing.assert_close(
        pasted["masks"], paste_masks_in_image(masks, pasted["boxes"], (96, 128)), rtol=0, atol=2e-6
    )
