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

``--count-ops`` also counts the operators a step's forward and backward dispatch (on the last batch), with and
without views: on a GPU each of the others is a kernel launch, host time that a small model on small images does
not hide (the CPU's own RoIAlign backward and NMS loops, which a GPU replaces by one kernel each, are counted
apart). It also sums the bytes those kernels write, by dtype, and counts the dtype casts among them: on a GPU the
elementwise kernels are bound by memory traffic, so the bytes are what they cost, whatever a CPU's time says.
``--autocast bf16`` runs the forward under bf16 autocast (``trainer.precision=bf16-mixed``'s arithmetic).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time

import torch
import torch.utils._pytree as pytree
from benchmark import compose_config  # benchmarks/benchmark.py, beside this script (also registers the resolvers)
from hydra.utils import get_class, instantiate
from torch.utils._python_dispatch import TorchDispatchMode

from mrcnn.modeling import roi_align as roi_align_module
from mrcnn.modeling.mask_rcnn import check_targets

BACKWARDS = roi_align_module.BACKWARDS
# Operators that make no new data (views, metadata): no kernel on a GPU.
VIEW_OPS = {
    "alias",
    "as_strided",
    "chunk",
    "detach",
    "expand",
    "flatten",
    "lift_fresh",
    "narrow",
    "permute",
    "reshape",
    "select",
    "slice",
    "split",
    "split_with_sizes",
    "squeeze",
    "t",
    "transpose",
    "unbind",
    "unflatten",
    "unsqueeze",
    "view",
    "_reshape_alias",
    "_unsafe_view",
}
# Code that runs on a CPU only, as (file, function): a GPU runs one kernel instead (torchvision's RoIAlign backward
# for our sparse and separable ones, the Triton NMS for the loop over groups).
CPU_ONLY = {("mrcnn/modeling/roi_align.py", "backward"), ("mrcnn/modeling/nms.py", "grouped_nms_torchvision")}


# Operators that convert a tensor to another dtype (autocast's casts among them).
CAST_OPS = {"_to_copy", "copy_"}


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched inside it: ``total``, ``kernels`` (no views) and ``cpu_only`` (kernels
    dispatched under a function of ``CPU_ONLY``). Of the other kernels (those a GPU runs too), ``bytes_written``
    sums the outputs by dtype name, and ``casts`` counts those of ``CAST_OPS`` that change a tensor's dtype."""

    def __init__(self):
        super().__init__()
        self.total = self.kernels = self.cpu_only = self.casts = 0
        self.bytes_written: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in VIEW_OPS:
            return out
        self.kernels += 1
        frame = sys._getframe(1)
        while frame is not None and not any(
            frame.f_code.co_filename.endswith(file) and frame.f_code.co_name == function for file, function in CPU_ONLY
        ):
            frame = frame.f_back
        if frame is not None:
            self.cpu_only += 1
            return out
        tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        for tensor in tensors:
            dtype = str(tensor.dtype).removeprefix("torch.")
            self.bytes_written[dtype] = self.bytes_written.get(dtype, 0) + tensor.numel() * tensor.element_size()
        if name in CAST_OPS and tensors:
            source = args[1] if name == "copy_" else args[0]
            self.casts += isinstance(source, torch.Tensor) and source.dtype != tensors[0].dtype
        return out


def forward_backward(model, images, targets, autocast: str = "none") -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bf16"):
        _, losses = model(images, targets, targets_checked=True)  # checked once, below, as run.py does on the host
    sum(losses.values()).backward()


def train_step(model, optimizer, images, targets, autocast: str = "none") -> None:
    forward_backward(model, images, targets, autocast)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_steps(model, optimizer, batches, warmup: int, autocast: str = "none") -> list[float]:
    """Seconds per training step over ``batches``, the first ``warmup`` dropped."""
    times = []
    for images, targets in batches:
        start = time.perf_counter()
        train_step(model, optimizer, images, targets, autocast)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def count_ops(model, optimizer, images, targets, autocast: str = "none") -> dict:
    """The operators one training step's forward and backward dispatch (see :class:`OpCounter`). The optimizer step
    is left out: on a GPU torch's SGD updates all parameters with a few foreach kernels, on the CPU it loops."""
    with OpCounter() as counter:
        forward_backward(model, images, targets, autocast)
    optimizer.zero_grad(set_to_none=True)
    return {
        "ops": counter.total,
        "kernels": counter.kernels,
        "cpu_only_kernels": counter.cpu_only,
        "casts": counter.casts,
        "bytes_written": dict(sorted(counter.bytes_written.items())),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="Hydra overrides, space-separated; repeatable")
    parser.add_argument("--backward", default="auto", help=f"comma-separated, of: {', '.join(BACKWARDS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and backward")
    parser.add_argument("--warmup", type=int, default=2, help="discarded steps before them")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the numbers to this json file")
    parser.add_argument("--count-ops", action="store_true", help="also count the operators of one step (first round)")
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none", help="the forward under bf16 autocast")
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
        # Only RoIAlign poolers take a backward (RoIPool has one, torchvision's); `auto` is the model as configured.
        pooler = get_class(cfg.model.net.roi_heads.pooler._target_)
        takes_backward = "backward" in inspect.signature(pooler).parameters
        if not takes_backward and backwards != ["auto"]:
            parser.error(
                f"--config {config!r} builds {pooler.__name__}, which has no RoIAlign backward to choose: time it "
                "with --backward auto (the default), or give it model/pooler=roi_align"
            )
        medians: dict[str, list[float]] = {b: [] for b in backwards}
        ops: dict[str, dict] = {}
        for round_index in range(args.rounds):
            torch.manual_seed(0)
            datamodule = instantiate(cfg.data.datamodule)
            datamodule.setup("fit")
            loader = iter(datamodule.train_dataloader())
            # The same batches for every backward: fetched once, before any timing.
            batches = [next(loader) for _ in range(args.warmup + args.steps)]
            for _, targets in batches:
                check_targets(targets)  # on the host, before the steps, as run.py does
            for backward in backwards:
                torch.manual_seed(0)
                chosen = {"roi_heads": {"pooler": {"backward": backward}}} if takes_backward else {}
                model = instantiate(cfg.model.net, **chosen).train()
                optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                times = time_steps(model, optimizer, batches, args.warmup, args.autocast)
                medians[backward].append(statistics.median(times))
                if args.count_ops and round_index == 0:
                    ops[backward] = count_ops(model, optimizer, *batches[-1], args.autocast)
        results[config] = {
            b: {"median_step_s_per_round": m, **({"ops_per_step": ops[b]} if b in ops else {})}
            for b, m in medians.items()
        }
        print(config, "  ".join(f"{b}: {', '.join(f'{s:.3f}' for s in m)} s" for b, m in medians.items()), flush=True)
        for backward, counts in ops.items():
            print(
                f"  {backward}: {counts['ops']} ops a step, {counts['kernels']} of them not views, "
                f"{counts['cpu_only_kernels']} of those CPU-only (RoIAlign backward, NMS loops); {counts['casts']} "
                "casts; MB written: "
                + ", ".join(f"{dtype} {size / 2**20:.1f}" for dtype, size in counts["bytes_written"].items()),
                flush=True,
            )
    if args.out:
        meta = {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "autocast": args.autocast,
            "min_channels": roi_align_module.MIN_CHANNELS,
            "separable_max_ratio": roi_align_module.SEPARABLE_MAX_RATIO,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "configs": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
