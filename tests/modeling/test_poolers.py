"""Poolers: hand-checked values on a linear ramp, quantization behaviour, FPN level assignment."""

from collections import OrderedDict

import pytest
import torch
from hydra.utils import instantiate
from torchvision.ops import MultiScaleRoIAlign

from mrcnn.modeling.poolers import (
    RoIAlignPooler,
    RoIPoolPooler,
    RoIWarpPooler,
    assign_levels,
    boxes_to_rois,
    round_like_roi_pool,
)
from tests.helpers.config import ROOT, TINY_MODEL, compose_config


def ramp(size: int = 16) -> dict[str, torch.Tensor]:
    """One 1-channel map whose value at pixel (y, x) is x: bilinear sampling of it is exact."""
    return {"0": torch.arange(size, dtype=torch.float32).repeat(size, 1)[None, None]}


def pool(pooler, features, boxes, image_size=16):
    return pooler(features, [torch.tensor(boxes, dtype=torch.float32)], [(image_size, image_size)])


def test_roi_align_avg_samples_bin_centres():
    # Box x in [2, 10] split into 4 bins of width 2: bin centres at x = 3, 5, 7, 9.
    out = pool(RoIAlignPooler(["0"], 4, sampling_ratio=2, aligned=False), ramp(), [[2, 2, 10, 10]])
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([3.0, 5.0, 7.0, 9.0]))
    # aligned=True shifts by half a pixel: pixel x's centre sits at continuous coordinate x + 0.5.
    out = pool(RoIAlignPooler(["0"], 4, sampling_ratio=2, aligned=True), ramp(), [[2, 2, 10, 10]])
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([2.5, 4.5, 6.5, 8.5]))


def test_roi_align_max_takes_the_largest_sample():
    # Bin [2, 4] with 2 samples per side: samples at x = 2.5 and 3.5, so max 3.5 vs average 3.0.
    out = pool(RoIAlignPooler(["0"], 4, sampling_ratio=2, mode="max"), ramp(), [[2, 2, 10, 10]])
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([3.5, 5.5, 7.5, 9.5]))


def test_roi_align_max_equals_avg_on_constant_features():
    features = {"0": torch.full((1, 3, 16, 16), 2.5)}
    boxes = [[1.3, 2.7, 11.1, 9.9]]
    avg = pool(RoIAlignPooler(["0"], 7, mode="avg"), features, boxes)
    mx = pool(RoIAlignPooler(["0"], 7, mode="max"), features, boxes)
    torch.testing.assert_close(avg, mx)


def test_roi_align_is_sensitive_to_subpixel_shifts_but_roi_pool_is_not():
    features = {"0": torch.randn(1, 4, 16, 16)}
    exact, shifted = [[2, 2, 10, 10]], [[2.3, 2.3, 9.8, 9.8]]
    roi_pool = RoIPoolPooler(["0"], 4)
    torch.testing.assert_close(pool(roi_pool, features, exact), pool(roi_pool, features, shifted))
    roi_align = RoIAlignPooler(["0"], 4)
    assert not torch.allclose(pool(roi_align, features, exact), pool(roi_align, features, shifted))


def test_roi_pool_takes_the_max_of_quantized_bins():
    # Box [0, 8] -> 8 feature columns, 2 bins of 4 columns: maxima of the ramp are x = 3 and 7.
    out = pool(RoIPoolPooler(["0"], 2), ramp(), [[0, 0, 7, 7]])
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([3.0, 7.0]))


def test_roi_warp_quantizes_the_box_then_samples_bilinearly():
    features = {"0": torch.randn(1, 4, 16, 16)}
    warp = RoIWarpPooler(["0"], 4)
    align = RoIAlignPooler(["0"], 4, aligned=False)
    quantized = pool(warp, features, [[2.3, 1.8, 9.6, 10.2]])
    torch.testing.assert_close(quantized, pool(warp, features, [[2, 2, 10, 10]]))
    torch.testing.assert_close(quantized, pool(align, features, [[2, 2, 10, 10]]))
    # On a ramp bilinear sampling is exact: the quantized box [2, 10] gives bin centres 3, 5, 7, 9.
    torch.testing.assert_close(pool(warp, ramp(), [[2.3, 2.3, 9.6, 9.6]])[0, 0, 0], torch.tensor([3.0, 5.0, 7.0, 9.0]))


def test_roi_warp_max_takes_the_largest_bilinear_sample_of_the_quantized_box():
    # The box rounds to [2, 10]; bin [2, 4] has samples at x = 2.5 and 3.5: max 3.5 where the average is 3.0.
    out = pool(RoIWarpPooler(["0"], 4, mode="max"), ramp(), [[2.3, 2.3, 9.6, 9.6]])
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([3.5, 5.5, 7.5, 9.5]))
    features = {"0": torch.full((1, 3, 16, 16), 2.5)}
    avg, mx = (pool(RoIWarpPooler(["0"], 7, mode=m), features, [[1.3, 2.7, 11.1, 9.9]]) for m in ("avg", "max"))
    torch.testing.assert_close(avg, mx)


def test_rounding_is_c_round_half_away_from_zero_like_roi_pool():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.49999997, -0.49999997, 2.4999998, 2.6, -2.6, 0.0])
    expected = torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 4.0, 0.0, -0.0, 2.0, 3.0, -3.0, 0.0])
    torch.testing.assert_close(round_like_roi_pool(x), expected)
    # torch.round rounds halves to even: the reason a RoIWarp built on it read other cells than RoIPool.
    assert torch.round(torch.tensor([0.5, 2.5])).tolist() == [0.0, 2.0]


def cells_read(pooler, box, stride, size=256):
    """The feature cells whose value reaches the pooled output, found by putting a spike on each cell in turn.

    One image of ``size`` pixels and its stride-``stride`` map; returns a set of ``(row, column)``.
    """
    side = size // stride
    read = set()
    for row in range(side):
        for column in range(side):
            spike = torch.zeros(1, 1, side, side)
            spike[0, 0, row, column] = 1.0
            out = pooler({"0": spike}, [torch.tensor([box], dtype=torch.float32)], [(size, size)])
            if out.abs().max() > 0:
                read.add((row, column))
    return read


def rectangle(first_row, last_row, first_column, last_column):
    return {(r, c) for r in range(first_row, last_row + 1) for c in range(first_column, last_column + 1)}


# Boxes with corners at exact half cells (x / stride = k + 0.5), where rounding half to even and half away
# from zero disagree (0.5, 2.5, 4.5 ...), and the cells RoIPool reads: from round(x1 / s) to round(x2 / s).
HALF_CELL_BOXES = [
    # stride 16: x 2.5 -> 3 .. 5.5 -> 6, y 0.5 -> 1 .. 4.5 -> 5 (half to even: x 2 .. 6, y 0 .. 4)
    (16, [40.0, 8.0, 88.0, 72.0], rectangle(1, 5, 3, 6)),
    # stride 16: a box inside one cell once quantized (2.5 -> 3 .. 2.9375 -> 3): RoIPool reads one cell
    (16, [40.0, 40.0, 47.0, 47.0], rectangle(3, 3, 3, 3)),
    # stride 32: x 0.5 -> 1 .. 2.5 -> 3, y 1.5 -> 2 .. 4.5 -> 5
    (32, [16.0, 48.0, 80.0, 144.0], rectangle(2, 5, 1, 3)),
    # stride 32: corners 6.5 -> 7 (the last cell of an 8x8 map) and 4.5 -> 5
    (32, [144.0, 144.0, 208.0, 208.0], rectangle(5, 7, 5, 7)),
]


@pytest.mark.parametrize("stride, box, cells", HALF_CELL_BOXES)
def test_roi_warp_reads_exactly_the_cells_roi_pool_reads_at_half_cells(stride, box, cells):
    """RoIWarp and RoIPool quantize the same way: at exact half cells both see the same feature cells and
    differ only in how they sample them (torchvision's RoIPool kernel is the reference)."""
    assert cells_read(RoIPoolPooler(["0"], 7), box, stride) == cells
    for mode in ("avg", "max"):
        assert cells_read(RoIWarpPooler(["0"], 7, mode=mode), box, stride) == cells
        assert cells_read(RoIWarpPooler(["0"], 14, sampling_ratio=1, mode=mode), box, stride) == cells
    # The boxes are ones where rounding halves to even would have picked other cells.
    quantized = torch.tensor(box) / stride
    assert not torch.equal(torch.round(quantized), round_like_roi_pool(quantized)) or len(cells) == 1


def test_roi_warp_of_a_one_cell_roi_is_that_cell_everywhere():
    # Quantized to the single cell (3, 3): every bin is that cell's value, as every RoIPool bin is.
    features = {"0": torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))}
    for pooler in (RoIWarpPooler(["0"], 7), RoIWarpPooler(["0"], 7, mode="max"), RoIPoolPooler(["0"], 7)):
        out = pooler(features, [torch.tensor([[40.0, 40.0, 47.0, 47.0]])], [(256, 256)])
        torch.testing.assert_close(out[0], features["0"][0, :, 3:4, 3:4].expand(2, 7, 7))


def test_spatial_scale_is_inferred_from_the_feature_stride():
    # A stride-4 map of a 64-pixel image: the image box [8, 40] is feature box [2, 10].
    features = {"0": torch.arange(16, dtype=torch.float32).repeat(16, 1)[None, None]}
    out = pool(RoIAlignPooler(["0"], 4), features, [[8, 8, 40, 40]], image_size=64)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([3.0, 5.0, 7.0, 9.0]))


def test_the_stride_of_every_map_is_right_at_every_image_height():
    # The batch is padded to a multiple of 32: a stride-s map has padded / s rows. torchvision's rounding took a
    # stride-32 map of a 40-pixel-high batch (2 rows) for stride 16; every height from 17 up is right here.
    import math

    from mrcnn.modeling.poolers import infer_scale

    for height in range(17, 1400):
        padded = math.ceil(height / 32) * 32
        for stride in (4, 8, 16, 32):
            assert infer_scale(padded // stride, height) == 1 / stride, (height, stride)


def test_fpn_level_assignment_follows_the_fpn_paper():
    # Levels P2..P5 (k = 2..5); a 224-pixel box goes to k0 = 4, halving the side lowers the level by one.
    boxes = torch.tensor(
        [[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 56, 56], [0, 0, 448, 448], [0, 0, 4, 4], [0, 0, 2000, 2000]]
    )
    levels = assign_levels([boxes.float()], 2, 5)
    assert levels.tolist() == [2, 1, 0, 3, 0, 3]


def test_multilevel_pooler_reads_each_roi_from_its_level():
    image = 512
    names = ["0", "1", "2", "3"]
    # Level l is constant l, so the pooled value tells which level was read.
    features = OrderedDict(
        (n, torch.full((1, 2, image // 2 ** (k + 2), image // 2 ** (k + 2)), float(k))) for k, n in enumerate(names)
    )
    boxes = torch.tensor([[0, 0, 40, 40], [0, 0, 112, 112], [0, 0, 224, 224], [10, 10, 500, 500]], dtype=torch.float32)
    poolers = (
        RoIAlignPooler(names, 7),
        RoIPoolPooler(names, 7),
        RoIWarpPooler(names, 7),
        RoIAlignPooler(names, 7, mode="max"),
        RoIWarpPooler(names, 7, mode="max"),
    )
    for pooler in poolers:
        out = pooler(features, [boxes], [(image, image)])
        assert out.shape == (4, 2, 7, 7)
        # (Bilinear weights sum to one up to float rounding.)
        torch.testing.assert_close(out.amax(dim=(1, 2, 3)), torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_roi_align_pooler_equals_torchvision_multiscale_roi_align():
    names = ["0", "1", "2", "3"]
    g = torch.Generator().manual_seed(0)
    features = OrderedDict((n, torch.randn(2, 8, 200 // 2**k, 304 // 2**k, generator=g)) for k, n in enumerate(names))
    image_shapes = [(800, 1216), (760, 1100)]
    boxes = []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=g) * 600
        boxes.append(torch.cat([xy, xy + 4 + torch.rand(30, 2, generator=g) * 500], dim=1))
    ours = RoIAlignPooler(names, 7, sampling_ratio=2, aligned=False)(features, boxes, image_shapes)
    theirs = MultiScaleRoIAlign(names, 7, 2)(features, boxes, image_shapes)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "pooler",
    [
        RoIAlignPooler(["0"], 7),
        RoIAlignPooler(["0"], 7, mode="max"),
        RoIPoolPooler(["0"], 7),
        RoIWarpPooler(["0"], 7),
        RoIWarpPooler(["0"], 7, mode="max"),
    ],
)
def test_no_boxes_gives_an_empty_batch(pooler):
    out = pooler({"0": torch.randn(2, 3, 16, 16)}, [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 64), (64, 64)])
    assert out.shape == (0, 3, 7, 7)


def test_max_mode_needs_a_fixed_sampling_ratio():
    with pytest.raises(ValueError, match="sampling_ratio"):
        RoIAlignPooler(["0"], 7, sampling_ratio=0, mode="max")
    with pytest.raises(ValueError, match="mode"):
        RoIAlignPooler(["0"], 7, mode="median")
    for mode in ("avg", "max"):
        with pytest.raises(ValueError, match="sampling_ratio"):
            RoIWarpPooler(["0"], 7, sampling_ratio=0, mode=mode)
    with pytest.raises(ValueError, match="mode"):
        RoIWarpPooler(["0"], 7, mode="median")


def test_gradients_flow_through_every_pooler():
    poolers = (
        RoIAlignPooler(["0"], 4),
        RoIAlignPooler(["0"], 4, mode="max"),
        RoIPoolPooler(["0"], 4),
        RoIWarpPooler(["0"], 4),
        RoIWarpPooler(["0"], 4, mode="max"),
    )
    for pooler in poolers:
        features = torch.randn(1, 2, 16, 16, requires_grad=True)
        pooler({"0": features}, [torch.tensor([[1.0, 1.0, 12.0, 9.0]])], [(16, 16)]).sum().backward()
        assert features.grad.abs().sum() > 0


def random_rois(num_images, height, width, scale, count, generator):
    """Boxes over and past the image edges, plus a few smaller than one feature cell."""
    size = torch.tensor([width, height]) / scale
    corner = torch.rand(count, 2, generator=generator, dtype=torch.float64) * size * 1.3 - 0.15 * size
    extent = torch.rand(count, 2, generator=generator, dtype=torch.float64) * size * 0.8
    extent[:4] = 0.2 / scale * torch.rand(4, 1, generator=generator, dtype=torch.float64)
    batch = torch.randint(0, num_images, (count, 1), generator=generator).double()
    return torch.cat([batch, corner, corner + extent], 1)


@pytest.mark.parametrize(
    "shape, scale, output_size, sampling_ratio, aligned",
    [
        ((2, 3, 10, 12), 1 / 4, 7, 2, False),
        ((2, 3, 10, 12), 1 / 4, 7, 2, True),
        ((3, 2, 9, 9), 1 / 16, 14, 1, False),
        ((2, 4, 4, 5), 1 / 32, 7, 3, True),
        ((1, 2, 1, 1), 1 / 32, 5, 2, False),  # a 1x1 map: every sample sits on the edge
    ],
)
@pytest.mark.parametrize("backward", ["sparse", "separable"])
def test_fast_cpu_roi_align_backward_equals_torchvision(
    shape, scale, output_size, sampling_ratio, aligned, backward, monkeypatch
):
    from torchvision.ops import roi_align as torchvision_roi_align

    from mrcnn.modeling import roi_align as module
    from mrcnn.modeling.roi_align import roi_align

    # Force one backward or the other, also on these few channels (they keep the test small).
    chosen = []
    for name in ("separable_backward", "sparse_backward"):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name: chosen.append(_n) or _f(*a))

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = random_rois(shape[0], shape[2], shape[3], scale, 40, generator)
    grad_out = torch.randn(40, shape[1], output_size, output_size, generator=generator, dtype=torch.float64)

    expected = torchvision_roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
    (expected_grad,) = torch.autograd.grad(expected, features, grad_out)
    ours = roi_align(features, rois, output_size, scale, sampling_ratio, aligned, backward=backward)
    assert ours.grad_fn is not None and "RoIAlignFunction" in type(ours.grad_fn).__name__  # the fast path ran
    (ours_grad,) = torch.autograd.grad(ours, features, grad_out)

    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-10, atol=1e-10)
    assert expected_grad.abs().sum() > 0
    assert chosen == [f"{backward}_backward"]


@pytest.mark.parametrize("rois_per_chunk", [None, 5, 1])
def test_separable_backward_in_chunks_of_rois_equals_torchvision_and_reads_the_host_once(rois_per_chunk):
    # Its largest intermediate is C*P*W values a RoI: a bounded chunk of RoIs at a time keeps the gradient.
    from torchvision.ops import roi_align as torchvision_roi_align

    from mrcnn.modeling.roi_align import separable_backward
    from tests.helpers.host_syncs import count_host_syncs

    shape, scale, output_size = (3, 4, 10, 12), 1 / 4, 7
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = random_rois(shape[0], shape[2], shape[3], scale, 40, generator)
    rois[:, 0] = rois[:, 0].clamp(max=1)  # the last image has no RoI; the others' RoIs are interleaved
    grad_out = torch.randn(40, shape[1], output_size, output_size, generator=generator, dtype=torch.float64)
    expected = torchvision_roi_align(features, rois, output_size, scale, 2, False)
    (expected_grad,) = torch.autograd.grad(expected, features, grad_out)

    per_roi = shape[1] * output_size * shape[3] * 8
    chunk_bytes = {} if rois_per_chunk is None else {"chunk_bytes": rois_per_chunk * per_roi + 3}
    grad, counts = count_host_syncs(separable_backward, grad_out, rois, scale, 2, False, shape, **chunk_bytes)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)
    assert dict(counts) == {"Tensor.tolist": 1}, counts.report()  # each image's RoI count, once


def test_separable_backward_is_chosen_for_small_maps_and_sparse_for_large():
    from mrcnn.modeling.roi_align import MIN_CHANNELS, choose_backward

    # (channels, height, width, output size, sampling ratio)
    assert choose_backward(64, 16, 16, 14, 2) == "separable"  # C4 at 256 px: a 16x16 stride-16 map, 14x14 RoIs
    assert choose_backward(128, 8, 8, 7, 2) == "separable"  # C5 at 256 px
    assert choose_backward(64, 64, 64, 7, 2) == "sparse"  # FPN P2 at 256 px
    assert choose_backward(256, 200, 334, 7, 2) == "sparse"  # FPN P2 of an 800x1333 COCO image
    assert choose_backward(MIN_CHANNELS - 1, 16, 16, 14, 2) == "torchvision"  # narrow maps
    assert choose_backward(256, 16, 16, 14, -1) == "torchvision"  # adaptive sampling: a grid per RoI
    for forced in ("torchvision", "sparse", "separable"):
        assert choose_backward(8, 200, 334, 7, 2, backward=forced) == forced
    assert choose_backward(256, 16, 16, 14, -1, backward="sparse") == "torchvision"
    with pytest.raises(ValueError, match="backward must be one of"):
        choose_backward(64, 16, 16, 14, 2, backward="fast")


def test_fast_roi_align_falls_back_to_torchvision_where_it_does_not_apply():
    from mrcnn.modeling.roi_align import MIN_CHANNELS, roi_align

    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]])
    wide = torch.randn(1, MIN_CHANNELS, 8, 8, requires_grad=True)
    assert "RoIAlignFunction" in type(roi_align(wide, rois, 7, 1.0, 2).grad_fn).__name__
    # Narrow maps: torchvision's backward is cheaper than building the matrix.
    narrow = torch.randn(1, MIN_CHANNELS // 2, 8, 8, requires_grad=True)
    assert "RoIAlignFunction" not in type(roi_align(narrow, rois, 7, 1.0, 2).grad_fn).__name__
    features = wide
    # Adaptive sampling (a different grid per RoI) keeps torchvision's backward.
    assert "RoIAlignFunction" not in type(roi_align(features, rois, 7, 1.0, -1).grad_fn).__name__
    with torch.no_grad():
        assert roi_align(features, rois, 7, 1.0, 2).grad_fn is None
    empty = roi_align(features, rois[:0], 7, 1.0, 2)
    assert empty.shape == (0, MIN_CHANNELS, 7, 7)


@pytest.mark.parametrize(
    "pooler_cls, kwargs",
    [
        (RoIAlignPooler, {"mode": "max"}),
        (RoIAlignPooler, {"aligned": True}),
        (RoIWarpPooler, {}),
        (RoIWarpPooler, {"mode": "max"}),
    ],
)
def test_poolers_on_wide_float32_maps_give_torchvision_gradients(pooler_cls, kwargs):
    """At real widths the poolers take the fast backward; gradients (through max-pool's non-contiguous
    gradient, too) match torchvision's kernel in float32."""
    from mrcnn.modeling import roi_align as module

    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, module.MIN_CHANNELS, 8, 10, generator=generator)
    boxes = [
        torch.tensor([[3.0, 5.0, 60.0, 40.0], [-20.0, 1.0, 10.0, 12.0]]),
        torch.tensor([[100.0, 2.0, 170.0, 130.0]]),
    ]
    grads = []
    for backward in ("auto", "torchvision"):  # ours (at MIN_CHANNELS), then torchvision's backward
        pooler = pooler_cls(["0"], 7, **kwargs, backward=backward)
        leaf = features.clone().requires_grad_()
        out = pooler({"0": leaf}, boxes, [(128, 160)] * 2)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_fast_roi_align_backward_in_bf16_and_with_far_out_boxes():
    from torchvision.ops import roi_align as torchvision_roi_align

    from mrcnn.modeling.roi_align import MIN_CHANNELS, roi_align

    features = torch.randn(1, MIN_CHANNELS, 6, 6)
    # A box far outside int64 range once floored (inf boxes already crash torchvision's forward kernel).
    rois = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0], [0.0, 1e20, 0.0, 2e20, 2.0]])
    grads = []
    for fn in (roi_align, torchvision_roi_align):
        leaf = features.clone().requires_grad_()
        fn(leaf, rois, 7, 1.0, 2).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])
    # bf16 features (CPU autocast): the sparse product runs in float32, the gradient comes back in bf16.
    leaf = features.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(leaf, rois[:1].to(torch.bfloat16), 7, 1.0, 2)
    out.float().sum().backward()
    assert leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(leaf.grad.float(), grads[0], rtol=0.02, atol=0.02)


def test_boxes_to_rois_index_every_box_by_its_image():
    for lengths in ([3, 3, 3], [2, 0, 4], [0, 0]):
        boxes = [torch.rand(n, 4) for n in lengths]
        rois = boxes_to_rois(boxes)
        expected = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)], dtype=torch.float32)
        assert rois.shape == (sum(lengths), 5) and torch.equal(rois[:, 0], expected)
        assert torch.equal(rois[:, 1:], torch.cat(boxes))


POOLER_OPTIONS = sorted(path.stem for path in (ROOT / "configs" / "model" / "pooler").glob("*.yaml"))


def configured_pooler(name: str):
    """The box pooler ``model/pooler=<name>`` builds for the tiny FPN model (levels P2-P5)."""
    cfg = compose_config([*TINY_MODEL, f"model/pooler={name}"])
    return instantiate(cfg.model.net).roi_heads.box_pooler


def pyramid(requires_grad=True, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """P2-P5 maps of a batch of 2 images of 64 px, values exact in bf16."""
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(2, 4, side, side, generator=generator)
        .to(torch.bfloat16)
        .to(dtype)
        .requires_grad_(requires_grad)
        for name, side in zip(("0", "1", "2", "3"), (16, 8, 4, 2))
    }


# At 64 px every box maps to P2 (k = floor(4 + log2(sqrt(area) / 224)) <= 2): P3-P5 get no RoIs, as an FPN level
# often does at any size (and the mask pooler's levels at a step without positives).
PYRAMID_BOXES = [torch.tensor([[2.0, 3.0, 40.0, 50.0]]), torch.tensor([[0.0, 0.0, 63.0, 63.0], [5.0, 5.0, 9.0, 30.0]])]


@pytest.mark.parametrize("name", POOLER_OPTIONS)
def test_every_pooler_runs_under_bf16_autocast_and_pools_what_it_pools_in_float32(name):
    # Under autocast the backbone hands the poolers bf16 maps while the boxes stay float32: each pooler must take
    # the pair (torchvision's roi_pool has no CPU autocast kernel and refused it) and give the float32 result.
    pooler = configured_pooler(name)
    reference_maps = pyramid()
    reference = pooler(reference_maps, PYRAMID_BOXES, [(64, 64)] * 2)
    reference.sum().backward()
    maps = pyramid(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pooler(maps, PYRAMID_BOXES, [(64, 64)] * 2)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    torch.testing.assert_close(out.float(), reference, rtol=0.01, atol=0.02)
    for level, map_ in maps.items():
        assert map_.grad.dtype == torch.bfloat16
        grad, expected = map_.grad.float(), reference_maps[level].grad
        if pooler.mode == "max" and not isinstance(pooler, RoIPoolPooler):
            # The max of bilinear samples computed in bf16 can pick another of two near-equal samples: the
            # gradient then lands elsewhere, but each output still sends its whole gradient to the map.
            grad, expected = grad.sum(), expected.sum()
        torch.testing.assert_close(grad, expected, rtol=0.01, atol=0.02)


@pytest.mark.parametrize("name", POOLER_OPTIONS)
@pytest.mark.parametrize("autocast", [False, True])
def test_the_deterministic_gpu_path_of_every_pooler_takes_levels_without_rois(name, autocast, monkeypatch):
    # trainer.deterministic=true on a GPU: the poolers' own backwards replace torchvision's atomic adds. Forced
    # here on the CPU (needs_deterministic_path says yes), where the CPU's choice of backward does not run first
    # for an empty level: every level but P2 has no RoIs, which once raised "needs a fixed sampling_ratio".
    pooler = configured_pooler(name)
    dtype = torch.bfloat16 if autocast else torch.float32
    expected_maps = pyramid(dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = pooler(expected_maps, PYRAMID_BOXES, [(64, 64)] * 2)
    expected.float().sum().backward()
    monkeypatch.setattr("mrcnn.modeling.roi_align.needs_deterministic_path", lambda features: True)
    monkeypatch.setattr("mrcnn.modeling.poolers.needs_deterministic_path", lambda features: True)
    maps = pyramid(dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = pooler(maps, PYRAMID_BOXES, [(64, 64)] * 2)
    out.float().sum().backward()
    assert torch.equal(out, expected)
    for level, map_ in maps.items():
        assert map_.grad.dtype == dtype
        torch.testing.assert_close(map_.grad, expected_maps[level].grad, rtol=1e-5, atol=1e-5)
        if level != "0":
            assert not map_.grad.any()  # no RoI read these levels
