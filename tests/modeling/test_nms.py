"""NMS within many groups at once (mrcnn.modeling.nms): torchvision's ``nms`` on each group alone, box for box, and
the GPU kernel's launch waits on nothing. The Triton kernel runs here in Triton's interpreter."""

import warnings

import pytest
import torch
from torchvision.ops import nms

from mrcnn.modeling import nms as nms_module
from mrcnn.modeling.nms import grouped_nms, grouped_nms_torchvision, grouped_nms_triton
from tests.helpers.host_syncs import count_host_syncs
from tests.helpers.triton_interpreter import require_interpreter

pytest.importorskip("triton")


def grouped_boxes(num_images: int, segments: list[tuple[int, int]], seed: int = 0):
    """Crowded random boxes, each segment in decreasing score order, about 10% not candidates; at the front of the
    first segment a pair at IoU exactly 0.5, a duplicate pair (IoU 1) and a pair at IoU 3/5 (float32(0.6), which is
    above 0.6)."""
    generator = torch.Generator().manual_seed(seed)
    length = segments[-1][1]
    centres = torch.rand(num_images, length, 2, generator=generator) * 60
    sides = torch.rand(num_images, length, 2, generator=generator) * 30 + 1
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=-1)
    boxes[:, 0:6] = torch.tensor(
        [
            [0.0, 0.0, 3.0, 1.0],
            [1.0, 0.0, 4.0, 1.0],
            [5.0, 5.0, 9.0, 9.0],
            [5.0, 5.0, 9.0, 9.0],
            [20.0, 20.0, 24.0, 21.0],
            [21.0, 20.0, 25.0, 21.0],
        ]
    )
    valid = torch.rand(num_images, length, generator=generator) > 0.1
    valid[:, 0:6] = True
    return boxes, valid


def reference(boxes, valid, segments, threshold):
    """torchvision's nms on each (image, segment) group alone, with decreasing scores in the group's order."""
    keep = torch.zeros_like(valid)
    for image in range(boxes.shape[0]):
        for start, end in segments:
            index = torch.arange(start, end)[valid[image, start:end]]
            scores = torch.linspace(1, 0, end - start)[index - start]
            keep[image, index[nms(boxes[image, index], scores, threshold)]] = True
    return keep


SEGMENTS = [(0, 150), (150, 180), (180, 181), (181, 181), (181, 260)]


@pytest.mark.parametrize("threshold", [0.5, 0.6, 0.7])
def test_the_kernel_keeps_what_torchvision_keeps_in_each_group(threshold):
    require_interpreter()
    boxes, valid = grouped_boxes(2, SEGMENTS)
    expected = reference(boxes, valid, SEGMENTS, threshold)
    # A block of 64 boxes per pass: the 150-box group takes three passes.
    got = grouped_nms_triton(boxes, valid, SEGMENTS, threshold, block=64)
    assert torch.equal(got, expected)
    assert torch.equal(grouped_nms_torchvision(boxes, valid, SEGMENTS, threshold), expected)
    # Some boxes suppressed, some kept; never a non-candidate; the pair at IoU exactly 0.5 both kept.
    assert 0 < expected.sum() < valid.sum() and not (expected & ~valid).any()
    assert expected[:, :2].all() and expected[:, 2].all() and not expected[:, 3].any()
    # IoU 3/5 is float32(0.6) > 0.6: suppressed at 0.5 and 0.6, kept at 0.7.
    assert expected[:, 4].all() and bool(expected[:, 5].all()) == (threshold == 0.7)


def test_a_wrong_kernel_is_caught():
    require_interpreter()
    # The same check fails for a kernel that ignores the group bounds (one group over the whole row).
    boxes, valid = grouped_boxes(1, SEGMENTS, seed=3)
    whole_row = grouped_nms_triton(boxes, valid, [(0, SEGMENTS[-1][1])], 0.5, block=64)
    assert not torch.equal(whole_row, reference(boxes, valid, SEGMENTS, 0.5))


def test_the_kernel_launch_waits_on_nothing():
    require_interpreter()
    boxes, valid = grouped_boxes(2, SEGMENTS)
    # Triton's interpreter reads the tensors' memory directly, which the counter does not see: what it counts is
    # the launch's own work, which a GPU would wait on.
    _, counts = count_host_syncs(grouped_nms_triton, boxes, valid, SEGMENTS, 0.7, block=64)
    assert sum(counts.values()) == 0, counts.report()


def test_cpu_tensors_take_torchvisions_nms_per_group(monkeypatch):
    monkeypatch.setattr(nms_module, "grouped_nms_triton", lambda *args, **kwargs: pytest.fail("no kernel on a CPU"))
    boxes, valid = grouped_boxes(2, SEGMENTS)
    assert torch.equal(grouped_nms(boxes, valid, SEGMENTS, 0.7), reference(boxes, valid, SEGMENTS, 0.7))


def test_a_failed_kernel_is_recorded_and_not_tried_again(monkeypatch):
    # A GPU whose Triton cannot compile the kernel, pretended on the CPU: the first call warns, records why and
    # falls back to torchvision's nms per group; later calls go straight to the fallback.
    tries = []

    def failing_kernel(*args, **kwargs):
        tries.append(1)
        raise RuntimeError("PassManager::run failed\nmore compiler output")

    monkeypatch.setattr(nms_module, "_on_gpu", lambda boxes: True)
    monkeypatch.setattr(nms_module, "grouped_nms_triton", failing_kernel)
    monkeypatch.setattr(nms_module, "triton_failure", None)
    boxes, valid = grouped_boxes(2, SEGMENTS)
    expected = reference(boxes, valid, SEGMENTS, 0.7)
    with pytest.warns(UserWarning, match=nms_module.FALLBACK_WARNING) as caught:
        assert torch.equal(grouped_nms(boxes, valid, SEGMENTS, 0.7), expected)
    assert len(caught) == 1 and nms_module.triton_failure == "RuntimeError: PassManager::run failed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(grouped_nms(boxes, valid, SEGMENTS, 0.7), expected)
    assert len(tries) == 1


def test_the_kernel_compiles_for_a_hopper_gpu():
    # Triton's compiler and ptxas need no GPU: a kernel that would fail to compile fails here, not in a GPU session.
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        "boxes": "*fp32",
        "keep": "*i8",
        "starts": "*i64",
        "ends": "*i64",
        "lengths": "*i64",
        "row_length": "i32",
        "threshold": "fp32",
        "BLOCK": "constexpr",
    }
    kernel = triton.jit(nms_module._nms_program)
    # With a bound per (image, group) and without (lengths=None: a constant, as a launch with None compiles it).
    for lengths in ("*i64", "constexpr"):
        constexprs = {"BLOCK": 1024, **({"lengths": None} if lengths == "constexpr" else {})}
        source = ASTSource(fn=kernel, signature={**signature, "lengths": lengths}, constexprs=constexprs)
        # As grouped_nms_triton launches it: without fused multiply-adds.
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
        ptx = compiled.asm["ptx"]
        assert "div.rn.f32" in ptx and "bar.sync" in ptx  # IEEE division; the barrier between a group's boxes
        assert "fma.rn.f32" not in ptx  # every product rounded, as on the CPU
        assert compiled.asm["cubin"]


def test_lengths_bound_each_groups_walk():
    require_interpreter()
    boxes, valid = grouped_boxes(2, SEGMENTS, seed=5)
    sizes = torch.tensor([end - start for start, end in SEGMENTS])
    lengths = (torch.rand(2, len(SEGMENTS), generator=torch.Generator().manual_seed(5)) * (sizes + 1)).long()
    for image in range(2):
        for (start, end), length in zip(SEGMENTS, lengths[image]):
            valid[image, start + length : end] = False  # the candidates are among each group's first `lengths`
    expected = reference(boxes, valid, SEGMENTS, 0.6)
    assert torch.equal(grouped_nms_triton(boxes, valid, SEGMENTS, 0.6, lengths, block=64), expected)
    # A bound that cuts candidates off drops them: the kernel does read it.
    shorter = (lengths - 1).clamp(min=0)
    assert not torch.equal(grouped_nms_triton(boxes, valid, SEGMENTS, 0.6, shorter, block=64), expected)
