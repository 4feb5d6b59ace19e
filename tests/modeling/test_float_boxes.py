"""Box coordinates stay in float32 under bf16 autocast: anchors, proposals, regression targets and detections.

torchvision makes anchors in the feature maps' dtype and decodes boxes in the regression outputs' dtype, so under
bf16 autocast every coordinate is rounded to bf16's spacing: 4 px from 512, 8 px from 1024. At COCO's 800x1333 that
moves anchors by up to 7 px and makes about 9% of them duplicates, and the RoI heads cast the ground-truth boxes to
the proposals' dtype before matching them. Under autocast ours keeps the box arithmetic in float32 (or the inputs' wider
dtype), where it is torchvision's, bit for bit (tests/modeling/test_parity.py); a model run in half precision without
autocast keeps its dtype, as torchvision.
"""

import pytest
import torch
from hydra.utils import instantiate
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from mrcnn.modeling.rpn import AnchorGenerator
from mrcnn.modeling.transform import BoxCoder
from tests.helpers.config import TINY_MODEL, compose_config

SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
STRIDES = (4, 8, 16, 32, 64)


def _inputs(height, width, dtype, images=2):
    image_list = ImageList(torch.zeros(images, 3, height, width), [(height, width)] * images)
    maps = [torch.zeros(images, 1, height // s, width // s, dtype=dtype) for s in STRIDES]
    return image_list, maps


def test_anchors_under_autocast_are_the_float32_anchors_of_torchvision():
    # COCO's padded 800x1333 batch: torchvision's anchors for float32 maps, bit for bit, whatever the maps' dtype.
    reference = TorchvisionAnchorGenerator(SIZES, RATIOS)(*_inputs(800, 1344, torch.float32))
    rounded = TorchvisionAnchorGenerator(SIZES, RATIOS)(*_inputs(800, 1344, torch.bfloat16))
    assert (rounded[0].float() - reference[0]).abs().max() >= 4  # what the test guards against: bf16's rounding
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            anchors = AnchorGenerator(SIZES, RATIOS)(*_inputs(800, 1344, dtype))
        assert len(anchors) == 2
        for ours, theirs in zip(anchors, reference):
            assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        doubles = AnchorGenerator(SIZES, RATIOS)(*_inputs(64, 64, torch.float64))
    assert doubles[0].dtype == torch.float64  # a wider dtype is kept


def test_without_autocast_anchors_and_boxes_keep_the_models_dtype():
    # A model run in half precision (model.half(), trainer.precision=16-true): RoIAlign and NMS need the boxes in
    # the features' dtype, so it is torchvision's behaviour there.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        theirs = TorchvisionAnchorGenerator(SIZES, RATIOS)(*_inputs(256, 256, dtype))[0]
        ours = AnchorGenerator(SIZES, RATIOS)(*_inputs(256, 256, dtype))[0]
        assert ours.dtype == dtype and torch.equal(ours, theirs)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    assert coder.decode(torch.zeros(3, 4, dtype=torch.float16), [torch.ones(3, 4)]).dtype == torch.float16


def test_anchors_are_made_once_per_input_size(monkeypatch):
    generator = AnchorGenerator(SIZES, RATIOS, cache_size=2)
    calls = []
    grid_anchors = generator.grid_anchors
    monkeypatch.setattr(generator, "grid_anchors", lambda *a: calls.append(1) or grid_anchors(*a))
    with torch.inference_mode():  # a validation first: training reuses what it made
        first = generator(*_inputs(128, 128, torch.float32))
    assert not first[0].is_inference()
    again = generator(*_inputs(128, 128, torch.float32, images=3))
    assert len(calls) == 1 and len(again) == 3 and torch.equal(again[2], first[0])
    generator(*_inputs(128, 192, torch.float32))
    generator(*_inputs(192, 128, torch.float32))  # a third size pushes out the first
    generator(*_inputs(128, 128, torch.float32))
    assert len(calls) == 4
    reference = TorchvisionAnchorGenerator(SIZES, RATIOS)(*_inputs(192, 128, torch.float32))
    assert torch.equal(generator(*_inputs(192, 128, torch.float32))[0], reference[0]) and len(calls) == 4
    generator.to(torch.float64)  # moved or cast: nothing kept
    generator(*_inputs(192, 128, torch.float32))
    assert len(calls) == 5
    uncached = AnchorGenerator(SIZES, RATIOS, cache_size=0)
    assert torch.equal(uncached(*_inputs(64, 64, torch.float32))[0], uncached(*_inputs(64, 64, torch.float32))[0])


def test_decoding_bf16_regression_outputs_under_autocast_gives_float32_boxes():
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    torch.manual_seed(0)
    boxes = torch.rand(50, 4) * 600
    boxes[:, 2:] += boxes[:, :2] + 700  # coordinates over 1024, where bf16 steps by 8
    codes = torch.randn(50, 8) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = coder.decode(codes.bfloat16(), [boxes])
        wider = coder.decode(codes.double(), [boxes])
    assert decoded.dtype == torch.float32 and wider.dtype == torch.float64  # a wider dtype is kept
    assert torch.equal(decoded, coder.decode(codes.bfloat16().float(), [boxes]))


@pytest.mark.parametrize("training", [True, False])
def test_a_bf16_autocast_forward_keeps_every_box_in_float32(training):
    cfg = compose_config([*TINY_MODEL, "data.image_size=96"])
    torch.manual_seed(0)
    model = instantiate(cfg.model.net).train(training)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = output

        return hook

    model.rpn.anchor_generator.register_forward_hook(record("anchors"))
    images = [torch.rand(3, 96, 96), torch.rand(3, 96, 80)]
    masks = torch.zeros(1, 96, 96, dtype=torch.uint8)
    masks[0, 20:60, 30:70] = 1
    targets = [{"boxes": torch.tensor([[30.0, 20.0, 70.0, 60.0]]), "labels": torch.tensor([1]), "masks": masks}] * 2
    proposals = {}
    propose = model.rpn.propose

    def spy(*args, **kwargs):
        proposals["boxes"], valid, losses = propose(*args, **kwargs)
        return proposals["boxes"], valid, losses

    model.rpn.propose = spy
    encoded = []
    encode_single = model.roi_heads.box_coder.encode_single
    model.roi_heads.box_coder.encode_single = lambda gt, rois: encoded.append((gt, rois)) or encode_single(gt, rois)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(training):
        detections, losses = model(images, [dict(t) for t in targets] if training else None)
    assert all(a.dtype == torch.float32 for a in seen["anchors"])
    assert all(p.dtype == torch.float32 for p in proposals["boxes"])
    if training:  # the RoI heads' regression targets: ground truth and RoIs in float32
        assert encoded and all(gt.dtype == rois.dtype == torch.float32 for gt, rois in encoded)
        assert all(torch.isfinite(v) for v in losses.values())
    else:
        assert all(d["boxes"].dtype == torch.float32 for d in detections)
