"""Training-step time of configured models, with each RoIAlign backward, on the built-in shapes.

Each ``--config`` is a space-separated list of Hydra overrides (on ``configs/train.yaml``); each is
timed with every ``--backward`` (the poolers' ``backward`` argument): ``auto`` (what the model uses),
``sparse`` or ``separable`` (one of ours, forced everywhere) and ``torchvision`` (torchvision's kernel
everywhere). A step is the model's forward with losses, their sum's backward and an SGD step, timed from
the batch on the host to the updated weights; data loading is outside the timing. The number is the median of
``--steps`` steps after ``--warmup`` discarded ones, per ``--rounds`` round; every round builds the
model and data afresh, and the backwards are alternated within a round so drift affects all alike.

    python benchmarks/step_time.py --config "experiment=ablation_roialign hydra.mode=RUN model/backbone=c4 model/pooler=roi_align" \\
        --backward auto,sparse,torchvision --steps 20 --rounds 2 --out step_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from benchmark import compose_config  # benchmarks/benchmark.py, beside this script (also registers the resolvers)
from hydra.utils import instantiate

from mrcnn.modeling import roi_align as roi_align_module

BACKWARDS = roi_align_module.BACKWARDS


def time_steps(model, optimizer, batches, warmup: int) -> list[float]:
    """Seconds per training step over ``batches``, the first ``warmup`` dropped."""
    times = []
    for images, targets in batches:
        start = time.perf_counter()
        _, losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="Hydra overrides, space-separated; repeatable")
    parser.add_argument("--backward", default="auto", help=f"comma-separated, of: {', '.join(BACKWARDS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and backward")
    parser.add_argument("--warmup", type=int, default=2, help="discarded steps before them")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the numbers to this json file")
    args = parser.parse_args(argv)
    backwards = [b for b in args.backward.split(",") if b]
    unknown = sorted(set(backwards) - set(BACKWARDS))
    if unknown or not backwards:
        parser.error(f"--backward {args.backward!r}: choose from {', '.join(BACKWARDS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    for config in args.config:
        cfg = compose_config(config.split())
        medians: dict[str, list[float]] = {b: [] for b in backwards}
        for _ in range(args.rounds):
            torch.manual_seed(0)
            datamodule = instantiate(cfg.data.datamodule)
            datamodule.setup("fit")
            loader = iter(datamodule.train_dataloader())
            # The same batches for every backward: fetched once, before any timing.
            batches = [next(loader) for _ in range(args.warmup + args.steps)]
            for backward in backwards:
                torch.manual_seed(0)
                model = instantiate(cfg.model.net, roi_heads={"pooler": {"backward": backward}}).train()
                optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                medians[backward].append(statistics.median(time_steps(model, optimizer, batches, args.warmup)))
        results[config] = {b: {"median_step_s_per_round": m} for b, m in medians.items()}
        print(config, "  ".join(f"{b}: {', '.join(f'{s:.3f}' for s in m)} s" for b, m in medians.items()), flush=True)
    if args.out:
        meta = {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "min_channels": roi_align_module.MIN_CHANNELS,
            "separable_max_ratio": roi_align_module.SEPARABLE_MAX_RATIO,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "configs": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
