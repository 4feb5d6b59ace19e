"""RoIAlign forward + backward on the CPU: torchvision's kernel vs our two backwards (mrcnn.modeling.roi_align).

Both of ours are timed at every shape, also where the model would pick the other one or (below
``MIN_CHANNELS``) torchvision's; these numbers are how ``MIN_CHANNELS`` and ``SEPARABLE_MAX_RATIO`` were
chosen. ``chosen`` says which backward the model uses for the shape, ``speedup`` is torchvision's time
over that one's.

The shapes are those of one training step of the CPU settings (batch 8, 64 RoIs per image; 128 and 256 px
shapes images, full and quarter width) plus COCO-sized FPN levels (P2 to P4). Medians of --repeats after one
warm-up round; the three are alternated within each round.

    python benchmarks/roi_align_backward.py [--repeats 5] [--threads N] [--cases C5,C4] [--out roi_align.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mrcnn.modeling import roi_align as module
from mrcnn.modeling.roi_align import roi_align

# name: (feature map N, C, H, W), spatial scale, number of RoIs, output size
CASES = {
    "C5 box (stride 32, 512 ch, 7x7)": ((8, 512, 4, 4), 1 / 32, 512, 7),
    "C4 box/mask (stride 16, 256 ch, 14x14)": ((8, 256, 8, 8), 1 / 16, 512, 14),
    "C4 256px width 16 (stride 16, 64 ch, 14x14)": ((8, 64, 16, 16), 1 / 16, 512, 14),
    "C5 256px width 16 (stride 32, 128 ch, 7x7)": ((8, 128, 8, 8), 1 / 32, 512, 7),
    "FPN P2 box (stride 4, 64 ch, 7x7)": ((8, 64, 32, 32), 1 / 4, 512, 7),
    "FPN P2 256px box (stride 4, 64 ch, 7x7)": ((8, 64, 64, 64), 1 / 4, 512, 7),
    "FPN P3 256px box (stride 8, 64 ch, 7x7)": ((8, 64, 32, 32), 1 / 8, 512, 7),
    "FPN P2 256px mask (stride 4, 64 ch, 14x14)": ((8, 64, 64, 64), 1 / 4, 128, 14),
    "FPN P2 256px full width box (stride 4, 256 ch, 7x7)": ((8, 256, 64, 64), 1 / 4, 512, 7),
    "FPN P2 256px full width mask (stride 4, 256 ch, 14x14)": ((8, 256, 64, 64), 1 / 4, 128, 14),
    "COCO FPN P2 box (800x1333, 256 ch, 7x7)": ((2, 256, 200, 334), 1 / 4, 1024, 7),
    "COCO FPN P3 box (800x1333, 256 ch, 7x7)": ((2, 256, 100, 167), 1 / 8, 1024, 7),
    "COCO FPN P3 mask (800x1333, 256 ch, 14x14)": ((2, 256, 100, 167), 1 / 8, 256, 14),
    "COCO FPN P4 box (800x1333, 256 ch, 7x7)": ((2, 256, 50, 84), 1 / 16, 1024, 7),
    "COCO FPN P4 mask (800x1333, 256 ch, 14x14)": ((2, 256, 50, 84), 1 / 16, 256, 14),
}


def random_rois(shape: tuple[int, ...], scale: float, count: int, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = shape
    size = torch.tensor([w, h]) / scale
    corner = torch.rand(count, 2, generator=generator) * size * 0.9
    extent = (torch.rand(count, 2, generator=generator) * 0.5 + 0.05) * size
    batch = torch.randint(0, n, (count, 1), generator=generator).float()
    return torch.cat([batch, corner, (corner + extent).minimum(size)], 1)


METHODS = ("torchvision", "sparse", "separable")


def time_once(backward: str, features, rois, output_size, scale, grad) -> float:
    start = time.perf_counter()
    roi_align(features, rois, output_size, scale, 2, False, backward=backward).backward(grad)
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
    generator = torch.Generator().manual_seed(0)
    results = {}
    width = max(len(name) for name in cases)
    print(
        f"{'case':{width}s} {'torchvision ms':>15s} {'sparse ms':>10s} {'separable ms':>13s} {'chosen':>12s} {'speed-up':>9s}"
    )
    for name, (shape, scale, count, output_size) in cases.items():
        features = torch.randn(*shape, generator=generator, requires_grad=True)
        rois = random_rois(shape, scale, count, generator)
        grad = torch.randn(count, shape[1], output_size, output_size, generator=generator)
        times: dict[str, list[float]] = {key: [] for key in METHODS}
        for round_ in range(args.repeats + 1):
            for key in METHODS:
                elapsed = time_once(key, features, rois, output_size, scale, grad)
                if round_ > 0:  # the first round is warm-up
                    times[key].append(elapsed)
        numbers = {f"{key}_ms": 1000 * statistics.median(values) for key, values in times.items()}
        chosen = module.choose_backward(shape[1], shape[2], shape[3], output_size, 2)
        numbers["chosen"] = chosen
        numbers["speedup"] = numbers["torchvision_ms"] / numbers[f"{chosen}_ms"]
        results[name] = numbers
        print(
            f"{name:{width}s} {numbers['torchvision_ms']:15.1f} {numbers['sparse_ms']:10.1f} "
            f"{numbers['separable_ms']:13.1f} {chosen:>12s} {numbers['speedup']:9.2f}"
        )
    if args.out:
        meta = {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "repeats": args.repeats,
            "min_channels": module.MIN_CHANNELS,
            "separable_max_ratio": module.SEPARABLE_MAX_RATIO,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "cases": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
