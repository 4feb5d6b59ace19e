"""Peak host memory and time of the mask targets of one batch of dense images, whole vs in bounded chunks.

``mrcnn.modeling.mask_head.mask_targets`` converts the ground-truth masks to float for RoIAlign. All at once that
is 4 bytes a pixel of every instance of every image (``model.batched_sampling`` stacks the whole batch); in chunks
of at most ``MASK_TARGET_CHUNK_BYTES`` the peak is bounded and the targets are the same bit for bit. Each setting
runs in a new process, so that each peak RSS (``ru_maxrss``) is its own.

    python benchmarks/mask_target_memory.py [--images 8] [--instances 90] [--height 800] [--width 1333]
        [--rois 512] [--bound BYTES] [--out mask_target_memory.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time

import torch

from mrcnn.modeling.mask_head import MASK_TARGET_CHUNK_BYTES, mask_targets_batched

UNBOUNDED = 2**62


def measure(images: int, instances: int, height: int, width: int, rois: int, chunk_bytes: int) -> dict:
    """One setting, in this process: seconds, peak RSS and a hash of the targets."""
    generator = torch.Generator().manual_seed(0)
    masks = [torch.zeros(instances, height, width, dtype=torch.uint8) for _ in range(images)]
    for m in masks:
        m[:, height // 8 : height // 2, width // 6 : width // 2] = 1
    image_of_roi = torch.arange(images).repeat_interleave(-(-rois // images))[:rois]
    corners = torch.rand(rois, 2, generator=generator) * torch.tensor([width / 2, height / 2])
    sizes = 8 + torch.rand(rois, 2, generator=generator) * torch.tensor([width / 3, height / 3])
    boxes = torch.cat([corners, corners + sizes], 1)
    matched = torch.randint(instances, (rois,), generator=generator)
    inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    targets = mask_targets_batched(masks, image_of_roi, boxes, matched, 28, chunk_bytes=chunk_bytes)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "chunk_bytes": chunk_bytes,
        "seconds": round(seconds, 3),
        "peak_rss_gib": round(peak / 2**20, 3),  # ru_maxrss is in KiB on Linux
        "rss_before_gib": round(inputs / 2**20, 3),
        "sha256": hashlib.sha256(targets.numpy().tobytes()).hexdigest(),  # the targets, bit for bit
    }


def in_new_process(shape: tuple[int, ...], chunk_bytes: int) -> dict:
    """:func:`measure` in a new Python process, so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--chunk-bytes", str(chunk_bytes)]
    command += [f"--{k}={v}" for k, v in zip(("images", "instances", "height", "width", "rois"), shape)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--instances", type=int, default=90)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--bound", type=int, default=MASK_TARGET_CHUNK_BYTES, help="the chunked run's chunk_bytes")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="measure this one setting in this process")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shape = (args.images, args.instances, args.height, args.width, args.rois)
    if args.chunk_bytes is not None:
        result = measure(*shape, args.chunk_bytes)
        print(json.dumps(result))
        return result
    rows = [in_new_process(shape, chunk_bytes) for chunk_bytes in (UNBOUNDED, args.bound)]
    float_bytes = args.images * args.instances * args.height * args.width * 4
    report = {
        "shape": dict(zip(("images", "instances", "height", "width", "rois"), shape)),
        "float_masks_gib": round(float_bytes / 2**30, 3),
        "whole": rows[0],
        "chunked": rows[1],
        "same_targets": rows[0]["sha256"] == rows[1]["sha256"],
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
