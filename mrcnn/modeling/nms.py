"""Non-maximum suppression within many independent groups at once: the RPN's (image, level) pairs.

torchvision's ``nms`` runs one group per call (or several, offset into disjoint coordinate ranges, which costs the
pairwise work of all of them together), and its output has a data-dependent length, so the host waits for it. The
RPN's proposals come in fixed groups: every image has the same per-level segments of ``pre_nms_top_n`` boxes, each
already sorted by score. :func:`grouped_nms` suppresses within every group and returns a keep mask of the input's
shape, so nothing waits on the host:

* on a GPU, one Triton kernel with one program per group (:func:`_nms_program`): each walks its group in score order
  as torchvision's NMS does, and the groups run side by side (torchvision's CUDA NMS ends in a single-block pass over
  all the boxes of a call: the RPN's NMS was 19% of the kernels' GPU time of a training step on the H200);
* on the CPU, torchvision's ``nms`` per group (a host read costs nothing there).

Both keep exactly the boxes torchvision's CPU ``nms`` keeps for each group alone: the same IoU arithmetic in
float32, each step rounded (the kernel is compiled without fused multiply-adds, and divides with IEEE rounding), the
same strict comparison with the threshold (taken in double precision there), the same greedy order
(``tests/modeling/test_nms.py`` runs the kernel in Triton's interpreter on the CPU). torchvision's CUDA ``nms``
may differ from its CPU ``nms`` in the last bit of an IoU (and its ``batched_nms`` offsets the coordinates), so on a
GPU a pair at the threshold can be decided either way.
"""

import contextlib
import functools
import warnings

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import nms

try:  # Triton comes with torch's CUDA builds on Linux; without it the CPU path is all there is
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# Boxes one program compares with the box it keeps, per pass: a group longer than this takes several passes.
BLOCK = 1024

# Why the Triton kernel failed in this process ("ErrorType: message"), or None while it has not. Set by the first
# failure: later calls go straight to torchvision's per-group nms (Triton caches compiled kernels only, so a failed
# compile would be tried again at every call), and benchmarks record it beside their numbers (benchmarks/benchmark.py).
triton_failure: str | None = None
# The start of the warning the first failure gives (benchmarks/gpu_check.py looks for it in training runs' logs).
FALLBACK_WARNING = "grouped NMS: the Triton kernel failed"


if tl is not None:

    def _nms_program(boxes, keep, starts, ends, lengths, row_length, threshold, BLOCK: tl.constexpr):
        """One group: image ``program_id(0)``, boxes ``starts[g] .. ends[g] - 1`` of its row, ``g = program_id(1)``,
        of which only the first ``lengths[image, g]`` can be kept (``lengths`` may be a null pointer: all of them).

        ``keep`` enters as the candidates (1) and leaves as the kept boxes: walking the group in order, a box still
        marked when its turn comes is kept and unmarks every later box of the group whose IoU with it exceeds the
        threshold. Plain Python for ``triton.jit`` (compiled on first use on a GPU) and for Triton's interpreter (the
        CPU tests).
        """
        row = tl.program_id(0).to(tl.int64) * row_length
        start = tl.load(starts + tl.program_id(1))
        end = tl.load(ends + tl.program_id(1))
        if lengths is not None:
            end = tl.minimum(end, start + tl.load(lengths + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)))
        for i in range(start, end):
            if tl.load(keep + row + i) != 0:
                x1 = tl.load(boxes + (row + i) * 4)
                y1 = tl.load(boxes + (row + i) * 4 + 1)
                x2 = tl.load(boxes + (row + i) * 4 + 2)
                y2 = tl.load(boxes + (row + i) * 4 + 3)
                area = (x2 - x1) * (y2 - y1)
                for first in range(i + 1, end, BLOCK):
                    j = first + tl.arange(0, BLOCK)
                    inside = j < end
                    bx1 = tl.load(boxes + (row + j) * 4, mask=inside, other=0.0)
                    by1 = tl.load(boxes + (row + j) * 4 + 1, mask=inside, other=0.0)
                    bx2 = tl.load(boxes + (row + j) * 4 + 2, mask=inside, other=0.0)
                    by2 = tl.load(boxes + (row + j) * 4 + 3, mask=inside, other=0.0)
                    # torchvision's arithmetic: the intersection's sides clamped at 0, IoU by IEEE division.
                    width = tl.maximum(tl.minimum(x2, bx2) - tl.maximum(x1, bx1), 0.0)
                    height = tl.maximum(tl.minimum(y2, by2) - tl.maximum(y1, by1), 0.0)
                    inter = width * height
                    iou = tl.math.div_rn(inter, area + (bx2 - bx1) * (by2 - by1) - inter)
                    tl.store(keep + row + j, tl.full([BLOCK], 0, tl.int8), mask=inside & (iou > threshold))
            # The next box's mark may have been cleared by another thread of this program: make its store visible.
            tl.debug_barrier()


@functools.cache
def _kernel(interpret: bool):
    """The compiled kernel (``interpret=False``) or Triton's interpreter of it (CPU tensors); ``None`` without
    Triton."""
    if triton is None:
        return None
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_nms_program)
    return triton.jit(_nms_program)


@functools.lru_cache(maxsize=16)
def _segments(segments: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """The segments' starts and ends on ``device``, made once per layout and copied from pinned memory, which does
    not wait for the GPU's queue. (The layout follows the padded image size, whose smallest FPN levels hold fewer
    boxes than ``pre_nms_top_n``: COCO's sizes give dozens of layouts, so a cache miss is an ordinary step.)"""
    pinned = device.type == "cuda"
    starts = torch.tensor([s for s, _ in segments], dtype=torch.int64, pin_memory=pinned)
    ends = torch.tensor([e for _, e in segments], dtype=torch.int64, pin_memory=pinned)
    return starts.to(device, non_blocking=True), ends.to(device, non_blocking=True)


def grouped_nms_triton(
    boxes: Tensor,
    valid: Tensor,
    segments: list[tuple[int, int]],
    threshold: float,
    lengths: Tensor | None = None,
    block: int = BLOCK,
) -> Tensor:
    """:func:`grouped_nms` with the Triton kernel (on CPU tensors: in Triton's interpreter, for tests). ``block``:
    the boxes a program compares per pass (a power of two)."""
    kernel = _kernel(boxes.device.type == "cpu")
    if kernel is None:
        raise RuntimeError("grouped_nms_triton needs Triton (pip install triton)")
    boxes = boxes.to(torch.float32).contiguous()
    keep = valid.to(torch.int8).contiguous()
    starts, ends = _segments(tuple((int(s), int(e)) for s, e in segments), boxes.device)
    if lengths is not None:
        lengths = lengths.to(torch.int64).contiguous()
    # One program per (image, segment); each walks its own group of boxes, in order. Without fused multiply-adds,
    # so every IoU is rounded as on the CPU. Triton launches on the current CUDA device and its stream: for boxes on
    # another GPU (a model moved to cuda:1 without torch.cuda.set_device) that device must be made current first.
    guard = torch.cuda.device(boxes.device) if boxes.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[(boxes.shape[0], len(segments))](
            boxes,
            keep,
            starts,
            ends,
            lengths,
            boxes.shape[1],
            float32_threshold(threshold),
            BLOCK=block,
            enable_fp_fusion=False,
        )
    return keep.bool()


def float32_threshold(threshold: float) -> float:
    """The float32 ``t`` with ``iou > t`` exactly when ``iou > threshold`` for every float32 ``iou``: torchvision's CPU
    ``nms`` compares the float IoU with the threshold in double precision. ``threshold`` itself if float32 holds it
    (0.5), else the largest float32 below it (float32(0.6) is above 0.6: an IoU of exactly float32(0.6) exceeds 0.6)."""
    value = np.float32(threshold)
    if float(value) > threshold:
        value = np.nextafter(value, np.float32(-np.inf))
    return float(value)


def grouped_nms_torchvision(
    boxes: Tensor, valid: Tensor, segments: list[tuple[int, int]], threshold: float, lengths: Tensor | None = None
) -> Tensor:
    """:func:`grouped_nms` by one torchvision ``nms`` call per group (each waits on the host for its output).
    ``lengths`` is not needed: the boxes past them are not ``valid``."""
    keep = torch.zeros_like(valid)
    for image in range(boxes.shape[0]):
        for start, end in segments:
            candidates = torch.where(valid[image, start:end])[0] + start
            # torchvision's nms sorts by score; the group is in score order already, so any decreasing score will do.
            order = torch.arange(len(candidates), 0, -1, dtype=torch.float32, device=boxes.device)
            kept = nms(boxes[image, candidates].float(), order, threshold)
            keep[image, candidates[kept]] = True
    return keep


def _on_gpu(boxes: Tensor) -> bool:
    """Whether :func:`grouped_nms` tries the Triton kernel for ``boxes``: on a GPU (tests pretend, on the CPU)."""
    return boxes.device.type == "cuda"


def grouped_nms(
    boxes: Tensor, valid: Tensor, segments: list[tuple[int, int]], threshold: float, lengths: Tensor | None = None
) -> Tensor:
    """NMS within every (image, segment) group of boxes sorted by score, as torchvision's ``nms`` on each alone.

    Args:
        boxes: ``[B, N, 4]`` xyxy; within each segment of each row, in decreasing score order.
        valid: bool ``[B, N]``: the candidates; the others take no part (neither kept nor suppressing).
        segments: ``(start, end)`` column ranges, the same for every image: the groups.
        threshold: suppress a box whose IoU with a kept, higher-scoring box of its group exceeds this.
        lengths: ``None``, or int ``[B, len(segments)]`` on the boxes' device: every candidate of a group is among
            its first ``lengths`` boxes (e.g. those above a score threshold), so the kernel walks only those.

    Returns:
        bool ``[B, N]``: the kept boxes. On a GPU no host synchronisation (the Triton kernel; if Triton fails,
        torchvision's per-group loop, with one warning and ``triton_failure`` set, from then on); on the CPU
        torchvision's per-group loop.
    """
    global triton_failure
    if _on_gpu(boxes) and triton_failure is None:
        try:
            return grouped_nms_triton(boxes, valid, segments, threshold, lengths)
        except Exception as error:  # no Triton, or a version that cannot compile the kernel: still correct
            triton_failure = f"{type(error).__name__}: {error}".splitlines()[0]
            warnings.warn(f"{FALLBACK_WARNING} ({triton_failure}); using torchvision's nms per group", stacklevel=2)
    return grouped_nms_torchvision(boxes, valid, segments, threshold)
