"""RoIAlign forward + backward on the CPU: torchvision's kernel vs ours (mrcnn.modeling.roi_align).

"ours" is always the sparse-matrix backward here, also for maps narrower than ``MIN_CHANNELS``, where the
model itself keeps torchvision's; these numbers are how that threshold was chosen.

The shapes are those of one training step of the CPU presets (batch 8 of 128x128 shapes images, 64 RoIs
per image) plus one COCO-sized FPN level. Medians of --repeats after one warm-up; the two are alternated.

    python benchmarks/roi_align_backward.py [--repeats 5] [--threads N] [--cases C5,C4] [--out roi_align.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torchvision.ops import roi_align as torchvision_roi_align

from mrcnn.modeling import roi_align as module
from mrcnn.modeling.roi_align import roi_align

# name: (feature map N, C, H, W), spatial scale, number of RoIs, output size
CASES = {
    "C5 box (stride 32, 512 ch, 7x7)": ((8, 512, 4, 4), 1 / 32, 512, 7),
    "C4 box/mask (stride 16, 256 ch, 14x14)": ((8, 256, 8, 8), 1 / 16, 512, 14),
    "FPN P2 box (stride 4, 64 ch, 7x7)": ((8, 64, 32, 32), 1 / 4, 512, 7),
    "COCO FPN P2 box (800x1333, 256 ch, 7x7)": ((2, 256, 200, 334), 1 / 4, 1024, 7),
}


def random_rois(shape: tuple[int, ...], scale: float, count: int, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = shape
    size = torch.tensor([w, h]) / scale
    corner = torch.rand(count, 2, generator=generator) * size * 0.9
    extent = (torch.rand(count, 2, generator=generator) * 0.5 + 0.05) * size
    batch = torch.randint(0, n, (count, 1), generator=generator).float()
    return torch.cat([batch, corner, (corner + extent).minimum(size)], 1)


def time_once(fn, features, rois, output_size, scale, grad) -> float:
    start = time.perf_counter()
    fn(features, rois, output_size, scale, 2, False).backward(grad)
    elapsed = time.perf_counter() - start
    features.grad = None
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", default="", help="comma-separated prefixes of the cases to run (default: all)")
    parser.add_argument("--out", default=None, help="write the numbers to this json file")
    args = parser.parse_args(argv)
    prefixes = [p for p in args.cases.split(",") if p]
    cases = {k: v for k, v in CASES.items() if not prefixes or any(k.startswith(p) for p in prefixes)}
    if not cases:
        parser.error(f"--cases {args.cases!r} matches none of: {', '.join(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Time the sparse backward at every width, also below the MIN_CHANNELS where the model stops using it.
    module.MIN_CHANNELS = 1
    generator = torch.Generator().manual_seed(0)
    results = {}
    print(f"{'case':42s} {'torchvision ms':>15s} {'ours ms':>9s} {'speed-up':>9s}")
    for name, (shape, scale, count, output_size) in cases.items():
        features = torch.randn(*shape, generator=generator, requires_grad=True)
        rois = random_rois(shape, scale, count, generator)
        grad = torch.randn(count, shape[1], output_size, output_size, generator=generator)
        times: dict[str, list[float]] = {"torchvision": [], "ours": []}
        for round_ in range(args.repeats + 1):
            for key, fn in (("torchvision", torchvision_roi_align), ("ours", roi_align)):
                elapsed = time_once(fn, features, rois, output_size, scale, grad)
                if round_ > 0:  # the first round is warm-up
                    times[key].append(elapsed)
        tv_ms, ours_ms = (1000 * statistics.median(times[k]) for k in ("torchvision", "ours"))
        results[name] = {"torchvision_ms": tv_ms, "ours_ms": ours_ms, "speedup": tv_ms / ours_ms}
        print(f"{name:42s} {tv_ms:15.1f} {ours_ms:9.1f} {tv_ms / ours_ms:9.2f}")
    if args.out:
        meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": args.repeats}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "cases": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
