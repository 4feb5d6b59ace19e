"""One command that measures everything GPU-related, ready for the moment a GPU is lent.

The steps, in the order of what matters most. Each one is a subprocess (or several side by side) with its own
time limit, in a process group of its own that is killed when the limit passes, so a hang or a CUDA crash ends
that step only and the others still run; a step stopped at its limit still reports what it finished (the
benchmark's rounds, the training runs' logged steps, the tests that ended):

1. ``environment``: GPU name and memory; python, torch, torchvision, CUDA, cuDNN, NCCL, lightning, hydra and
   the other versions; whether the project imports.
2. ``bench_eager``: ``benchmarks/benchmark.py`` at 800x1333, batch 8, ours beside torchvision in one process,
   alternating, new batches every round, bf16 autocast, eager, no cuDNN autotuning: training throughput,
   inference (model only) latency at batch 1 and throughput at batch 8, peak memory; then host synchronisations
   per training step, a torch.profiler table of 2 steps of each, and the RoI heads' distinct input shapes.
3. ``bench_fast``: ours on the fast path (bf16 + channels_last + cuDNN autotuning) beside torchvision eager (bf16,
   default memory format, no autotuning), in one process, without the profile.
4. ``train_bf16``: ``run.py trainer=gpu`` on the built-in shapes, ``--train-steps`` steps, alone: its steps/s and AP.
5. ``gpu_tests``: ``pytest -m gpu tests/modeling/test_gpu.py`` (bf16 autocast, channels_last, torch.compile,
   SyncBatchNorm, DDP on one GPU; comparisons in full fp32, TF32 off). Without CUDA the tests skip and the step
   says "skipped (no CUDA)".
6. ``train_batched`` (only with ``--steps``): ``train_bf16`` with the batched switches (``model.batched_sampling``,
   ``model.batched_proposals``), alone: their steps/s beside the default's, the number that says whether
   ``trainer=gpu`` should turn them on.
7. ``train_others`` (only with ``--steps``): the shapes run in fp32 and on the fast path, side by side: their AP
   beside bf16's.
8. ``gpu_determinism`` (only with ``--steps``): ``pytest -m gpu tests/modeling/test_gpu_determinism.py``:
   ``trainer.deterministic=true`` repeats bit for bit, and the step time with and without it.
9. ``bench_compile`` (only with ``--steps``): as ``bench_fast`` with ``module.compile=true``, training only.

Then the project's GPU goals (benchmarks/README.md) are read off the numbers. After every step
``gpu_check.json`` and ``gpu_check.md`` are rewritten in ``--out`` (and, with ``--copy-to DIR``, copied into DIR
with the profile tables and an archive of the rest: a folder that comes back from a machine even if the check is cut
off); each step's whole
output is in ``--out/logs/<step>.log``, its files beside them (``train_*/``, ``bench_*.json``,
``bench_eager_profile_*.txt``, ``gpu_tests.xml``).
The exit status is 1 when a step failed; 143 when the check was stopped by SIGTERM (the step it was running is
recorded as stopped, with what it finished, and the later ones as not run).

This script imports nothing beyond the standard library; the steps run with whatever torch, torchvision and
Lightning the machine has (and record them). ``--dry-run`` runs the same steps on the CPU at tiny sizes
(a tiny model, a few steps, 64-pixel images) in a few minutes: it tests this script, not the GPU.

Usage::

    python benchmarks/gpu_check.py --out gpu_check              # one H100/H200-class GPU: at most 7 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/check   # the same steps on the CPU
    python benchmarks/gpu_check.py --out gpu_check --steps bench_compile --budget bench_compile=300  # one more
"""

import argparse
import contextlib
import csv
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "benchmark.py"
GPU_TESTS = "tests/modeling/test_gpu.py"
# The test files of the steps that run GPU tests.
TEST_STEPS = {"gpu_tests": GPU_TESTS, "gpu_determinism": "tests/modeling/test_gpu_determinism.py"}

STEPS = (
    "environment",
    "bench_eager",
    "bench_fast",
    "train_bf16",
    "gpu_tests",
    "train_batched",
    "train_others",
    "gpu_determinism",
    "bench_compile",
)
# Only when asked for (--steps): train_batched (one more shapes run: 50-75 s), train_others (two more shapes runs;
# with train_bf16 and the tests they do not fit 7 minutes), gpu_determinism (trainer.deterministic=true: the same
# steps twice, bit for bit, and what the deterministic kernels cost) and bench_compile (compiling R50-FPN takes
# minutes, and compiled it ran at 0.28x torchvision on the H200 while the heads' shapes still varied,
# gpu/2026-12-04-h200).
DEFAULT_STEPS = ("environment", "bench_eager", "bench_fast", "train_bf16", "gpu_tests")
DESCRIPTIONS = {
    "environment": "GPU, memory, versions; the project imports",
    "bench_eager": "benchmark.py, ours and torchvision, bf16 autocast, eager; host syncs, profile, head shapes; ours with the batched switches beside",
    "bench_fast": "benchmark.py, ours on the fast path (bf16, channels_last, RoI buckets, batched switches, FrozenBatchNorm folded into its convolution, cuDNN autotuning) and torchvision eager (bf16, default memory format), training only; ours with float32 FrozenBatchNorm beside",
    "train_bf16": "run.py trainer=gpu on shapes (bf16), alone: the default run's steps/s",
    "train_batched": "run.py trainer=gpu on shapes (bf16) with the batched switches, alone: their steps/s",
    "train_others": "run.py on shapes in fp32 and on the fast path (+ channels_last, autotuning), side by side: their AP",
    "gpu_tests": f"pytest -m gpu {GPU_TESTS}",
    "gpu_determinism": f"pytest -m gpu {TEST_STEPS['gpu_determinism']}: deterministic mode repeats bit for bit; its cost",
    "bench_compile": "benchmark.py, as bench_fast with our module.compile=true (training only)",
}
# The training runs on the shapes, by name: fp32, bf16 (trainer=gpu's default) and the fast path. No cuDNN
# autotuning: the RoI heads' shapes change from step to step, and autotuning every new shape made Mask R-CNN
# training 5x slower on the H200 (../shared/PITFALLS.md).
TRAIN_RUNS = {
    "fp32": ["trainer.precision=32-true"],
    "bf16": ["trainer.precision=bf16-mixed"],
    # bf16 with the sync-free switches (off by default until measured): its steps/s beside bf16's.
    "batched": ["trainer.precision=bf16-mixed", "model.batched_proposals=true", "model.batched_sampling=true"],
    # The shapes' images all have one size and the default model buckets its RoIs: every shape repeats.
    "fast": [
        "trainer.precision=bf16-mixed",
        "module.channels_last=true",
        "trainer.benchmark=true",
        "model.batched_proposals=true",
        "model.batched_sampling=true",
    ],
}
# Which training runs each training step runs, at the same time.
TRAIN_STEPS = {"train_bf16": ("bf16",), "train_batched": ("batched",), "train_others": ("fp32", "fast")}
# The fast path: bf16, channels_last, and RoI buckets (model.roi_buckets, off in the parity configuration that
# bench_eager measures), which make every shape the convolutions see repeat at a fixed image size, so cuDNN
# autotuning may join it (it tunes each shape once).
# It also takes the batched proposals and sampling (RPN and RoI heads: one host sync per training step instead of
# about 55, and fixed head shapes whatever the buckets), and FrozenBatchNorm folded into its convolution
# (model.fold_frozen_bn: the norms' activation-sized kernels go and the backbone's activations stay bf16; 44% of the
# bytes a training step writes, counted on the CPU; it supersedes model.frozen_bn_keeps_dtype, which then has no norm
# left to change); all three are off by default until measured.
FAST_OVERRIDES = [
    "model.roi_buckets=[16,32,64,128,256,512,1024,2048,4096]",
    "model.batched_proposals=true",
    "model.batched_sampling=true",
    "model.fold_frozen_bn=true",
]
# Configurations of ours measured in the same rounds as ours in a benchmark step (benchmark.py --variant), each
# differing from ours in the named switches only, so one run says what a switch that is off by default until measured
# is worth on the GPU: the batched RPN proposals and detections and the batched anchor/RoI sampling beside the parity
# configuration in eager mode (training and inference), and torchvision's float32 FrozenBatchNorm beside the fast path
# (whose folded one it replaces). One variant each: more would not fit the check's 7 minutes.
BENCH_VARIANTS = {
    "bench_eager": {"batched": ["model.batched_sampling=true", "model.batched_proposals=true"]},
    "bench_fast": {"frozen_bn_float32": ["model.fold_frozen_bn=false"]},
}
BENCH_SWITCHES = {
    "bench_eager": ["--precision", "bf16-mixed", "--profile"],
    "bench_fast": ["--precision", "bf16-mixed", "--channels-last", "--cudnn-benchmark", "--torchvision-eager"],
    "bench_compile": ["--precision", "bf16-mixed", "--channels-last", "--cudnn-benchmark"],
}
# The distributions whose versions the environment records (those of mrcnn's requirements are added).
VERSIONS_OF = (
    "torch",
    "torchvision",
    "triton",
    "lightning",
    "hydra-core",
    "omegaconf",
    "numpy",
    "pycocotools",
    "albumentations",
    "pytest",
    "mrcnn",
)
# What the steps import: if one of them fails, the environment step fails and says why.
STEP_IMPORTS = ("mrcnn.engine.train", "mrcnn.evaluation", "pytest")

# The GPU goals of issue #22 (benchmarks/README.md), at 800x1333, batch 8: ours against torchvision in one
# process, alternating, on the same batches.
GOAL_EAGER_VS_TV = 1.3  # training, bf16 autocast, eager: ours / torchvision
GOAL_FAST_VS_TV_EAGER = 2.0  # training, ours on the fast path / torchvision eager (bf16)
GOAL_FAST_IMAGES_PER_S = 100.0  # training images/s, ours on the fast path
GOAL_SHAPES_STEPS_PER_S = 30.0  # run.py trainer=gpu on the shapes (batch 8, 128 px)
GOAL_INFER_VS_TV = 1.3  # inference, model only: batch 8 throughput and batch 1 latency, ours / torchvision
GOAL_HOST_SYNCS = 8  # host synchronisations per training step
# Mask AP points by which bf16 and the fast path may differ from fp32 and still count as unchanged: about one
# seed-to-seed standard deviation of the CPU ablations (FPN 26.6 +- 2.9, experiments/ablation_backbone); a
# coarse check that they break nothing, not a test of equality.
AP_TOLERANCE = 3.0

TAIL_LINES = 40
# The start of the warning mrcnn.modeling.nms gives when its Triton kernel fails and the batched paths fall back to
# torchvision's per-group nms (nms.FALLBACK_WARNING; this script imports nothing of the project's).
NMS_FALLBACK_WARNING = "grouped NMS: the Triton kernel failed"
# Seconds to wait for a step's process to end after SIGKILL. A CUDA process stuck in the driver may never end: the
# check records it and goes on rather than waiting for it.
REAP_TIMEOUT_S = 10
# A step is not started with less time than this left in the total budget: it could not get past its imports.
MIN_STEP_S = 5


@dataclasses.dataclass
class Profile:
    """Sizes and time limits of one kind of run: on a GPU, or the CPU dry run.

    Attributes:
        device: ``cuda`` or ``cpu``.
        budgets: time limit of each step, seconds.
        total_budget: time limit of the whole check, seconds; a step gets at most what is left.
        train_steps: optimizer steps of each training run.
        train_batch: the training runs' batch (the shapes' ``data.datamodule.batch_size``), for steps/s.
        train_overrides: run.py overrides of both training runs (the trainer, sizes, loader workers).
        bench_image: benchmark image (height, width).
        bench_batch: training and inference-throughput batch of the benchmark.
        bench_steps: training steps per benchmark round.
        bench_repeats: measured rounds (median).
        bench_warmup: discarded rounds before them (one-time costs: allocator growth, cuDNN autotuning, compiling).
        bench_overrides: Hydra overrides of our model in the benchmark.
        compile_overrides: added for bench_compile.
        compile_skip: benchmark phases bench_compile skips.
    """

    device: str
    budgets: dict
    total_budget: int
    train_steps: int
    train_batch: int
    train_overrides: list
    bench_image: tuple
    bench_batch: int
    bench_steps: int
    bench_repeats: int
    bench_warmup: int
    bench_overrides: list
    compile_overrides: list
    compile_skip: str


# One H100/H200-class GPU. The limits are what each step took in the check of 2026-12-04 on an H200
# (benchmarks/README.md, "Results: GPU") plus about 50%; the default steps' add up to 420 s, inside the 7 minutes
# a check may take and the 10 minutes one device command may run with the wheels' install:
# environment 17.4 s (the first imports on a fresh machine; the first check of that day stopped it at its 20 s limit,
# gpu/2026-12-04-h200/README.md, so it gets 45 s); bench_eager 64.5 s (128 images of 800x1333
# generated, both models built, the first CUDA step, 4 rounds x 5 steps x 2 systems, 3 profiled steps, model-only
# inference); bench_fast 55.1 s with inference, about 40 s without; train_bf16 50.7 s (300 steps at 13.2
# steps/s, start-up, 200 validation images); gpu_tests 74.7 s. train_others ran past 75 s (two runs side by
# side, their validations slowed each other down). The BENCH_VARIANTS came later, not yet measured: a variant adds a
# model build, 4 Lightning fits of 5 steps (about 4 s of steps at the 2026-12-04 step time of 0.18 s), in bench_eager
# its inference rounds, and the batched path compiles its Triton NMS kernel (twice: with and without lengths) on a
# fresh machine: about 25 s for bench_eager and 15 s for bench_fast, estimated; with them the limits leave 40-50%.
# To give the environment its 45 s inside 420, bench_fast went from 80 to 70 s (about 55 s estimated: 40 s measured
# without inference plus its variant's 15 s; 27% left) and train_bf16 from 75 to 70 s (50.7 s measured; 38% left).
GPU = Profile(
    device="cuda",
    budgets={
        "environment": 45,
        "bench_eager": 125,
        "bench_fast": 70,
        "train_bf16": 70,
        "gpu_tests": 110,
        # train_bf16's run with two switches: its limit.
        "train_batched": 75,
        # Not yet run on a GPU: 40 s for the steps test and 60-90 s for two run.py launches, estimated.
        "gpu_determinism": 200,
        "train_others": 120,
        "bench_compile": 200,
    },
    total_budget=420,
    train_steps=300,
    train_batch=8,
    # The default run: trainer=gpu's shapes loader has 4 persistent workers and pinned memory (configs/data/shapes.yaml).
    train_overrides=["trainer=gpu"],
    bench_image=(800, 1333),
    bench_batch=8,
    bench_steps=5,
    bench_repeats=3,
    bench_warmup=1,
    bench_overrides=["model=torchvision_r50_fpn"],
    compile_overrides=["module.compile=true"],
    compile_skip="infer,eval",
)

# The CPU dry run: the same steps at the sizes of the tests (tests/helpers/config.py's TINY_MODEL and
# tests/benchmarks/test_benchmark.py's small heads, fewer still). torch.compile uses the aot_eager backend,
# which traces what inductor would get without minutes of C++ compilation.
DRY_RUN = Profile(
    device="cpu",
    # Generous: the dry run tests the script, and a shared 2-core machine can be several times slower than an idle one.
    budgets={
        "environment": 120,
        "bench_eager": 420,
        "bench_fast": 300,
        "train_bf16": 240,
        "train_batched": 240,
        "train_others": 360,
        "gpu_tests": 180,
        "gpu_determinism": 180,
        "bench_compile": 300,
    },
    total_budget=1800,
    train_steps=3,
    train_batch=2,
    train_overrides=[
        "trainer=cpu",
        "model.depth=18",
        "model.fpn_channels=16",
        "model.mask_head_dim=16",
        "model.box_head_dim=32",
        "model.rois_per_image=32",
        "data.image_size=64",
        "data.num_train_images=6",
        "data.num_val_images=4",
        "data.datamodule.batch_size=2",
        "trainer.log_every_n_steps=1",
    ],
    bench_image=(64, 64),
    bench_batch=1,
    bench_steps=3,
    bench_repeats=1,
    bench_warmup=0,
    bench_overrides=[
        "model=torchvision_r50_fpn",
        "model.rpn_pre_nms_top_n_train=100",
        "model.rpn_post_nms_top_n_train=50",
        "model.rois_per_image=16",
        "model.rpn_pre_nms_top_n_test=50",
        "model.rpn_post_nms_top_n_test=20",
        "model.detections_per_img=5",
    ],
    compile_overrides=["module.compile=true", "++module.compile_kwargs.backend=aot_eager"],
    compile_skip="infer,eval",
)


# ---- the environment (run in its own process) ----------------------------------------------------------


def distribution_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def project_requirements() -> list[str]:
    """The distributions mrcnn requires (not its extras), from its installed metadata."""
    try:
        requirements = importlib.metadata.requires("mrcnn") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in requirements if "extra ==" not in r]


def command_output(command: list[str]) -> str | None:
    """stdout of ``command`` (stripped), or None if it cannot run."""
    try:
        result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def gpu_info(torch) -> dict:
    """The first CUDA device: name, memory, capability, and the result of a small computation on it."""
    props = torch.cuda.get_device_properties(0)
    x = torch.randn(1024, 1024, device="cuda")
    finite = bool(torch.isfinite(x @ x).all())  # a device that cannot compute fails here, not in every step
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "count": torch.cuda.device_count(),
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "matmul_finite": finite,
        "nvidia_smi": command_output(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        ),
    }


def collect_environment() -> dict:
    """What the steps run with: python, versions, the GPU, and which of their imports fail."""
    names = dict.fromkeys([*VERSIONS_OF, *project_requirements()])
    info = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": command_output(["git", "rev-parse", "HEAD"]),
        "versions": {name: distribution_version(name) for name in names},
        "missing_requirements": [n for n in project_requirements() if distribution_version(n) is None],
        "import_errors": {},
    }
    for module in STEP_IMPORTS:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001  (any import failure is a finding, not a crash of this step)
            info["import_errors"][module] = f"{type(error).__name__}: {error}"
    try:
        import torch
    except ImportError as error:
        info["import_errors"]["torch"] = f"{type(error).__name__}: {error}"
        return info
    info.update(
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        cuda_available=torch.cuda.is_available(),
        torch_threads=torch.get_num_threads(),
        # fp32 convolutions and matmuls may run in TF32: part of what "fp32" means in the numbers.
        tf32={"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
    )
    if torch.cuda.is_available():
        info["gpu"] = gpu_info(torch)
        if torch.distributed.is_nccl_available():
            version = torch.cuda.nccl.version()  # a tuple, or one number in older torch
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return info


# ---- running one step ------------------------------------------------------------------------------------


def kill_group(pgid: int) -> None:
    """Kills what is left of a step's process group (workers, compile processes, a DDP child)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_command(command: list[str], log_path: Path, timeout_s: float) -> tuple[int | None, float]:
    """Runs ``command`` in ROOT, all its output to ``log_path``, in a process group of its own that is killed
    after ``timeout_s``, when it ends (its leftover workers), or when this script is stopped.

    Returns:
        The exit code (None if the time limit passed) and the seconds it ran.
    """
    returncodes, seconds, _ = run_commands({"": command}, {"": log_path}, timeout_s)
    return returncodes[""], seconds


def run_commands(commands: dict, log_paths: dict, timeout_s: float) -> tuple[dict, float, list]:
    """Runs ``commands`` (by name) side by side, as :func:`run_command` runs one, all stopped at ``timeout_s``.

    Each one runs in a process group of its own, in this script's session: a machine that ends a stopped
    command's processes by session ends the step's too.

    Returns:
        The exit code of each (None where the time limit passed), the seconds the step ran, and the names of the
        commands whose process had not ended ``REAP_TIMEOUT_S`` after SIGKILL (left behind, said in its log).
    """
    # No internet on a lent GPU machine: albumentations would try to reach PyPI for its version check on import.
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1"
    )
    # This checkout's mrcnn, also where the project is not installed (benchmark.py runs from benchmarks/).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    start = time.monotonic()
    processes, logs, stuck = {}, {}, []
    try:
        for name, command in commands.items():
            log_paths[name].parent.mkdir(parents=True, exist_ok=True)
            log = log_paths[name].open("w")
            logs[name] = log
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            # A session of its own (its process group's id is its pid: kill_group ends its workers with it). Not
            # preexec_fn=os.setpgrp: Python code between fork and exec can deadlock in a process with threads (the
            # tests call this from pytest's).
            processes[name] = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        returncodes = {}
        for name, process in processes.items():
            try:
                returncodes[name] = process.wait(timeout=max(timeout_s - (time.monotonic() - start), 0.01))
            except subprocess.TimeoutExpired:
                returncodes[name] = None
    finally:
        for name, process in processes.items():
            kill_group(process.pid)
            try:
                process.wait(timeout=REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                stuck.append(name)
                logs[name].write(
                    f"\ngpu_check: pid {process.pid} had not ended {REAP_TIMEOUT_S} s after SIGKILL; left\n"
                )
        for log in logs.values():
            log.close()
    return returncodes, time.monotonic() - start, stuck


def tail(log_path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` non-blank lines of a log, each as a terminal shows it (progress bars redraw
    their line after a carriage return), cut at 500 characters."""
    if not log_path.exists():
        return ""
    shown = [line.rsplit("\r", 1)[-1][:500] for line in log_path.read_text(errors="replace").splitlines()]
    return "\n".join([line for line in shown if line.strip()][-lines:])


# ---- what each step runs and what it found -----------------------------------------------------------------


def step_output(name: str, out: Path) -> Path:
    """The file or folder where step ``name`` (or training run ``name``) leaves its results."""
    if name == "environment":
        return out / "environment.json"
    if name in TEST_STEPS:
        return out / f"{name}.xml"
    if name in TRAIN_RUNS:
        return out / f"train_{name}"
    return out / f"{name}.json"


def log_path(name: str, run: str, out: Path, runs: int | None = None) -> Path:
    """The log of command ``run`` of step ``name``, which runs ``runs`` commands (default: its training runs)."""
    runs = len(TRAIN_STEPS.get(name, (name,))) if runs is None else runs
    return out / "logs" / (f"{name}.log" if runs == 1 else f"{name}.{run}.log")


def step_outputs(name: str, out: Path) -> list[Path]:
    """Every file or folder step ``name`` writes its results to (a benchmark's profiler tables and partial json too)."""
    if name in TRAIN_STEPS:
        return [step_output(run, out) for run in TRAIN_STEPS[name]]
    output = step_output(name, out)
    return [output, *sorted(out.glob(f"{output.stem}_profile_*.txt")), *sorted(out.glob(f"{output.name}.tmp"))]


def train_command(run: str, profile: Profile, args, out: Path) -> list[str]:
    """run.py for training run ``run`` (a key of TRAIN_RUNS) on the shapes."""
    # ++: add max_steps whether or not the trainer config has the key; the run stops at whichever of
    # max_steps and max_epochs comes first, and the lr schedule spans max_steps.
    return [
        sys.executable,
        str(ROOT / "run.py"),
        *profile.train_overrides,
        *TRAIN_RUNS[run],
        f"++trainer.max_steps={args.train_steps}",
        "seed=0",
        f"hydra.run.dir={step_output(run, out)}",
    ]


def step_commands(name: str, profile: Profile, args, out: Path) -> dict:
    """The command lines of step ``name``, by name (several for a step whose runs go side by side)."""
    if name in TRAIN_STEPS:
        return {run: train_command(run, profile, args, out) for run in TRAIN_STEPS[name]}
    return {name: step_command(name, profile, args, out)}


def dry_run_switches(switches: list[str]) -> list[str]:
    """A benchmark's switches for the CPU dry run: fp32 instead of bf16 autocast."""
    return ["32" if switch == "bf16-mixed" else switch for switch in switches]


def step_command(name: str, profile: Profile, args, out: Path) -> list[str]:
    """The command line of a step that runs one command."""
    python = sys.executable
    if name == "environment":
        return [python, str(Path(__file__).resolve()), "--collect-environment", str(step_output(name, out))]
    if name in TEST_STEPS:
        # -v prints each test's outcome as it ends: a run stopped at its limit still reports the finished ones;
        # -s puts what a test prints (the determinism test's step times) into the log.
        return [
            python,
            "-m",
            "pytest",
            "-m",
            "gpu",
            TEST_STEPS[name],
            "-v",
            "-s",
            "-rA",
            "-p",
            "no:cacheprovider",
            # No log capture: a failure's report would end with torch's DEBUG records, and the step's tail (the
            # last 40 lines) with them instead of the assertion.
            "-p",
            "no:logging",
            f"--junitxml={step_output(name, out)}",
        ]
    height, width = args.bench_image_size
    command = [
        python,
        str(BENCHMARK),
        "--device",
        profile.device,
        "--image-size",
        str(height),
        "--image-width",
        str(width),
        "--batch-size",
        str(args.bench_batch_size),
        "--infer-batch-size",
        str(args.bench_batch_size),
        "--steps",
        str(args.bench_steps),
        "--repeats",
        str(args.bench_repeats),
        "--warmup",
        str(args.bench_warmup),
        "--skip",
        profile.compile_skip if name in ("bench_fast", "bench_compile") else "eval",
        # Model-only inference is the goal; the COCO-json encoding of 100 masks an image is CPU work.
        "--infer-modes",
        "model",
        # The dry run measures in fp32: bf16 autocast on a CPU is many times slower and tests nothing of the GPU.
        *(BENCH_SWITCHES[name] if profile.device == "cuda" else dry_run_switches(BENCH_SWITCHES[name])),
        "--out",
        str(step_output(name, out)),
    ]
    for variant, overrides in BENCH_VARIANTS.get(name, {}).items():
        command += ["--variant", f"{variant}={' '.join(overrides)}"]
    fast = FAST_OVERRIDES if name in ("bench_fast", "bench_compile") else []
    compile_overrides = profile.compile_overrides if name == "bench_compile" else []
    return [*command, "--overrides", *profile.bench_overrides, *fast, *compile_overrides]


def gpu_test_results(junit_xml: Path, log_path: Path | None = None) -> dict:
    """Per test: passed, failed or skipped (with the reason), from pytest's junit xml; where pytest was stopped
    before writing it, the outcomes its ``-v`` output printed so far (``partial``: true)."""
    if not junit_xml.exists() and log_path is not None and log_path.exists():
        tests, current = {}, None
        for line in log_path.read_text(errors="replace").splitlines():
            # "<file>::<test> PASSED"; with -s a test's own output comes between its name and its outcome, which
            # then starts a line of its own.
            named = re.match(r"\S+::(\w+)(?: (PASSED|FAILED|SKIPPED|ERROR))?", line)
            if named:
                current, outcome = named.group(1), named.group(2)
            else:
                found = re.match(r"(PASSED|FAILED|SKIPPED|ERROR)\b", line)
                outcome = found.group(1) if found and current is not None else None
            if outcome:
                tests[current] = {"ERROR": "failed"}.get(outcome, outcome.lower())
                current = None
        counts = {o: sum(1 for v in tests.values() if v == o) for o in ("passed", "failed", "skipped")}
        return {**counts, "tests": tests, "skip_reasons": {}, "partial": True}
    tests, reasons = {}, {}
    for case in ElementTree.parse(junit_xml).iter("testcase"):
        name = case.get("name")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
                reasons[name] = child.get("message", "")
        if tests.get(name) != "failed":  # a test that failed in its teardown has a second entry
            tests[name] = outcome
    counts = {outcome: sum(1 for o in tests.values() if o == outcome) for outcome in ("passed", "failed", "skipped")}
    return {**counts, "tests": tests, "skip_reasons": reasons}


def last_logged(csv_path: Path, key: str) -> float | None:
    """The last value of column ``key`` in a Lightning CSV log, or None."""
    if not csv_path.exists():
        return None
    with csv_path.open() as file:
        values = [row[key] for row in csv.DictReader(file) if row.get(key)]
    return float(values[-1]) if values else None


def nms_fallback(log_path: Path) -> str | None:
    """The line of a log that says the Triton NMS kernel failed (the run's batched paths then ran torchvision's
    per-group nms), or None."""
    if not log_path.exists():
        return None
    for line in log_path.read_text(errors="replace").splitlines():
        if NMS_FALLBACK_WARNING in line:
            return line[line.index(NMS_FALLBACK_WARNING) :][:300]
    return None


def train_results(run_dir: Path, batch_size: int, log_path: Path | None = None) -> dict:
    """AP (in points) and steps from the run's metrics.json, its last logged throughput and steps/s; with
    ``log_path`` (its output), ``nms_fallback`` where the run's Triton NMS kernel failed.

    A run stopped before it wrote metrics.json (its time limit) still reports the steps it logged and its
    throughput, from the CSV log, with ``partial``: true.
    """
    csv_path = run_dir / "csv" / "metrics.csv"
    images_per_s = last_logged(csv_path, "train/images_per_sec")
    result = {
        "images_per_s": images_per_s,
        "steps_per_s": images_per_s / batch_size if images_per_s else None,
    }
    fallback = nms_fallback(log_path) if log_path is not None else None
    if fallback:
        result["nms_fallback"] = fallback
    if not (run_dir / "metrics.json").exists():
        step = last_logged(csv_path, "step")
        if step is None:
            raise FileNotFoundError(f"{run_dir}: neither metrics.json nor a logged step")
        return {**result, "global_step": int(step), "partial": True}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result.update({key: 100 * metrics[key] for key in ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP")})
    result["global_step"] = metrics["global_step"]
    return result


def bench_results(path: Path) -> dict:
    """The numbers of one benchmark.py run: training and inference per system, their ratios, peak memory, and
    (where it profiled) host syncs per step and the RoI heads' input shapes. ``partial``: the run was stopped
    before its end (its json holds the rounds it finished)."""
    bench = json.loads(path.read_text())
    result = {
        "hardware": bench["hardware"],
        "args": bench["args"],
        "partial": not bench.get("complete", True),
        # Why the Triton NMS kernel failed (its batched paths then measured torchvision's per-group nms), or None.
        "nms_triton_failure": bench.get("nms_triton_failure"),
    }
    if "train" in bench:
        train = bench["train"]
        result["train"] = {
            "ratio": train["ratio"],
            "rounds": train.get("rounds"),
            **{
                system: {
                    "images_per_s": train[system]["images_per_s"],
                    "images_per_s_range": train[system].get("images_per_s_range"),
                    "peak_mem_mib": train[system]["peak_mem_mib"],
                    "step_s": train[system]["median_s"] / bench["args"]["steps"],
                }
                for system in ("ours", "torchvision")
            },
        }
        if "variants" in train:
            result["train"]["variants"] = {
                name: {
                    "overrides": v["overrides"],
                    "images_per_s": v["images_per_s"],
                    "images_per_s_range": v.get("images_per_s_range"),
                    "peak_mem_mib": v["peak_mem_mib"],
                    "ratio": v["ratio"],
                    "vs_ours": v["vs_ours"],
                }
                for name, v in train["variants"].items()
            }
    if "infer" in bench:
        numbers = ("latency_ms", "images_per_s", "peak_mem_mib")
        result["infer"] = {
            key: {
                "ratio": entry["ratio"],
                **{system: {k: entry[system][k] for k in numbers} for system in ("ours", "torchvision")},
                **(
                    {
                        "variants": {
                            name: {k: v[k] for k in (*numbers, "ratio", "vs_ours")}
                            for name, v in entry["variants"].items()
                        }
                    }
                    if "variants" in entry
                    else {}
                ),
            }
            for key, entry in bench["infer"].items()
        }
    for key in ("profile", "head_shapes"):
        if key in bench:
            result[key] = bench[key]
    return result


def read_results(name: str, out: Path, args=None) -> dict:
    """What step ``name`` found, from the files it wrote (raises if they are missing or unreadable)."""
    path = step_output(name, out)
    if name == "environment":
        return json.loads(path.read_text())
    if name in TEST_STEPS:
        return gpu_test_results(path, out / "logs" / f"{name}.log")
    if name in TRAIN_STEPS:
        batch = 8 if args is None else args.train_batch_size
        results = {}
        for run in TRAIN_STEPS[name]:
            with contextlib.suppress(OSError, ValueError, KeyError):
                results[run] = train_results(step_output(run, out), batch, log_path(name, run, out))
        if not results:
            raise FileNotFoundError(f"no training run of {name} logged a step")
        return results
    return bench_results(path)


def judge(name: str, results: dict, dry_run: bool) -> tuple[str, str]:
    """Status and reason as a step's results say (its exit code and time are judged apart, in run_step)."""
    if name == "environment":
        if results["import_errors"]:
            return "failed", "cannot import: " + "; ".join(f"{m} ({e})" for m, e in results["import_errors"].items())
        if not dry_run and not results.get("cuda_available"):
            return "failed", "no CUDA device (use --dry-run on a machine without one)"
        if results.get("gpu", {}).get("matmul_finite") is False:
            return "failed", "a matrix product on the GPU gave non-finite values"
    if name in TEST_STEPS:
        if results["failed"]:
            return "failed", "failed: " + ", ".join(t for t, o in results["tests"].items() if o == "failed")
        if not results["passed"]:
            reasons = sorted(set(results["skip_reasons"].values())) or ["no tests collected"]
            return "skipped", f"skipped ({'; '.join(reasons)})"
    if name in TRAIN_STEPS:
        missing = [run for run in TRAIN_STEPS[name] if run not in results]
        if missing:
            return "failed", "no results from " + ", ".join(missing)
    return "passed", ""


def error_line(log_path: Path) -> str:
    """The last line of a log that names an error, for the reason of a failed step."""
    for line in reversed(tail(log_path, 200).splitlines()):
        if re.search(r"(Error|Exception|error:)", line):
            return line.strip()[:300]
    return ""


def run_step(name: str, command, out: Path, timeout_s: float, dry_run: bool = False, args=None) -> dict:
    """Runs one step (``command``: one command line, or several by name that run side by side) and reads what
    it found.

    Returns:
        ``name``, ``status`` (passed, failed, skipped), ``reason``, ``seconds``, ``time_limit_s``, ``command``,
        ``log`` (relative to ``out``), ``results`` (whatever could be read, also after a failure or a stop at the
        time limit: the rounds and steps it finished) and, for a failed step, ``tail`` (the end of its output);
        ``stopped`` (the exit code to end with) when the check itself was stopped from outside during the step, and
        ``unreaped`` (the commands whose process did not end after SIGKILL) where there are such.
    """
    commands = command if isinstance(command, dict) else {name: command}
    log_paths = {run: log_path(name, run, out, len(commands)) for run in commands}
    # Results of an earlier check in the same folder must not pass for this one's.
    for output in step_outputs(name, out):
        if output.is_dir():
            shutil.rmtree(output)
        else:
            output.unlink(missing_ok=True)
    start, stopped, stuck = time.monotonic(), None, []
    try:
        returncodes, seconds, stuck = run_commands(commands, log_paths, timeout_s)
    except SystemExit as stop:  # the check was stopped from outside (main's SIGTERM handler): keep what it finished
        stopped, returncodes, seconds = stop.code, dict.fromkeys(commands), time.monotonic() - start
    record = {
        "name": name,
        "description": DESCRIPTIONS.get(name, ""),
        "seconds": round(seconds, 1),
        "time_limit_s": round(timeout_s, 1),
        "command": command,
        "log": ", ".join(str(p.relative_to(out)) for p in log_paths.values()),
        "results": {},
    }
    try:
        record["results"] = read_results(name, out, args)
        status, reason = judge(name, record["results"], dry_run)
    except (OSError, ValueError, KeyError, TypeError, ElementTree.ParseError) as error:
        status, reason = "failed", f"no results ({type(error).__name__}: {error})"
    if stopped is not None:
        status, reason = "failed", f"stopped from outside after {seconds:.0f} s (the check was ended)"
        record["stopped"] = stopped
        if record["results"]:
            reason += "; partial results kept"
    elif None in returncodes.values():
        status, reason = "failed", f"timed out after {timeout_s:.0f} s (its time limit)"
        if record["results"]:
            reason += "; partial results kept"
    elif any(returncodes.values()):
        # What the results say (e.g. which tests failed), else the error the output ends with.
        run, code = next((r, c) for r, c in returncodes.items() if c)
        detail = reason if status == "failed" and record["results"] else error_line(log_paths[run])
        prefix = f"{run}: " if len(commands) > 1 else ""
        status, reason = "failed", f"{prefix}exit code {code}" + (f": {detail}" if detail else "")
    if stuck:
        record["unreaped"] = stuck
        reason += f"; {', '.join(stuck)}: still not ended {REAP_TIMEOUT_S} s after SIGKILL (stuck in the driver?), left"
    record.update(status=status, reason=reason.removeprefix("; "))
    if status == "failed":
        record["tail"] = "\n".join(
            (f"--- {run}\n" if len(commands) > 1 else "") + tail(path) for run, path in log_paths.items()
        )
    return record


def earlier_records(out: Path, dry_run: bool) -> dict:
    """The records of the steps an earlier check of the same kind ran in ``out``, by name: a check that reruns
    some steps (``--steps``) keeps the others' results in its report."""
    path = out / "gpu_check.json"
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if earlier.get("dry_run") != dry_run:
        return {}
    # A record carried over before keeps the date of the run that made it.
    return {s["name"]: {"earlier_run": earlier["started"], **s} for s in earlier["steps"] if "time_limit_s" in s}


def not_run(name: str, reason: str) -> dict:
    return {
        "name": name,
        "description": DESCRIPTIONS[name],
        "status": "skipped",
        "reason": reason,
        "seconds": 0.0,
        "results": {},
    }


# ---- the goals -------------------------------------------------------------------------------------------


def goal(text: str, target: str, value: float | None, met: bool | None, source: str) -> dict:
    return {"goal": text, "target": target, "value": value, "met": met, "source": source}


def read_goals(steps: dict, dry_run: bool, ap_tolerance: float) -> list[dict]:
    """The GPU goals of issue #22, each with the measured value (None where its steps did not run) and whether
    it is met (None in a dry run or when not measured)."""

    def results(name):
        return steps.get(name, {}).get("results", {})

    def check(value, ok):
        return None if dry_run or value is None else ok(value)

    eager, fast = results("bench_eager").get("train"), results("bench_fast").get("train")
    infer = results("bench_eager").get("infer") or {}
    batches = sorted(int(k.removeprefix("model_batch")) for k in infer if k.startswith("model_batch"))
    infer_large = infer[f"model_batch{batches[-1]}"]["ratio"] if batches and batches[-1] > 1 else None
    infer_one = infer["model_batch1"]["ratio"] if "model_batch1" in infer else None
    eager_ratio = eager and eager["ratio"]
    # bench_fast runs torchvision eager (--torchvision-eager) beside ours on the fast path, in one process.
    fast_vs_eager = fast and fast["ratio"]
    fast_images = fast and fast["ours"]["images_per_s"]
    shapes = results("train_bf16").get("bf16", {}).get("steps_per_s")
    shapes_batched = results("train_batched").get("batched", {}).get("steps_per_s")
    profile = results("bench_eager").get("profile") or {}
    syncs = host_syncs_per_step(profile.get("ours", {}))
    # The batched switches' variant: the path built to meet this goal.
    batched_syncs = host_syncs_per_step(profile.get("variants", {}).get("batched", {}))
    fp32 = results("train_others").get("fp32", {}).get("segm_AP")
    ap = {
        run: results(step).get(run, {}).get("segm_AP")
        for step, run in (("train_bf16", "bf16"), ("train_others", "fast"))
    }
    change = {run: v - fp32 if None not in (v, fp32) else None for run, v in ap.items()}
    within = lambda v: abs(v) <= ap_tolerance  # noqa: E731
    return [
        goal(
            "training, bf16 eager: ours / torchvision",
            f">= {GOAL_EAGER_VS_TV}",
            eager_ratio,
            check(eager_ratio, lambda v: v >= GOAL_EAGER_VS_TV),
            "bench_eager",
        ),
        goal(
            "training: ours on the fast path / torchvision eager",
            f">= {GOAL_FAST_VS_TV_EAGER}",
            fast_vs_eager,
            check(fast_vs_eager, lambda v: v >= GOAL_FAST_VS_TV_EAGER),
            "bench_fast",
        ),
        goal(
            "training images/s, ours on the fast path",
            f">= {GOAL_FAST_IMAGES_PER_S}",
            fast_images,
            check(fast_images, lambda v: v >= GOAL_FAST_IMAGES_PER_S),
            "bench_fast",
        ),
        goal(
            "run.py trainer=gpu on the shapes, steps/s",
            f">= {GOAL_SHAPES_STEPS_PER_S}",
            shapes,
            check(shapes, lambda v: v >= GOAL_SHAPES_STEPS_PER_S),
            "train_bf16",
        ),
        goal(
            "run.py trainer=gpu on the shapes with the batched switches, steps/s",
            f">= {GOAL_SHAPES_STEPS_PER_S}",
            shapes_batched,
            check(shapes_batched, lambda v: v >= GOAL_SHAPES_STEPS_PER_S),
            "train_batched (optional)",
        ),
        goal(
            "inference, model only, largest batch: ours / torchvision throughput",
            f">= {GOAL_INFER_VS_TV}",
            infer_large,
            check(infer_large, lambda v: v >= GOAL_INFER_VS_TV),
            "bench_eager",
        ),
        goal(
            "inference, model only, batch 1: torchvision / ours latency",
            f">= {GOAL_INFER_VS_TV}",
            infer_one,
            check(infer_one, lambda v: v >= GOAL_INFER_VS_TV),
            "bench_eager",
        ),
        goal(
            "host synchronisations per training step, ours",
            f"<= {GOAL_HOST_SYNCS}",
            syncs,
            check(syncs, lambda v: v <= GOAL_HOST_SYNCS),
            "bench_eager (profile)",
        ),
        goal(
            "host synchronisations per training step, ours with the batched switches",
            f"<= {GOAL_HOST_SYNCS}",
            batched_syncs,
            check(batched_syncs, lambda v: v <= GOAL_HOST_SYNCS),
            "bench_eager (profile, variant batched)",
        ),
        goal(
            "mask AP change, bf16 - fp32 (points)",
            f"within +-{ap_tolerance}",
            change["bf16"],
            check(change["bf16"], within),
            "train_bf16 - train_others fp32",
        ),
        goal(
            "mask AP change, fast path - fp32 (points)",
            f"within +-{ap_tolerance}",
            change["fast"],
            check(change["fast"], within),
            "train_others fast - fp32",
        ),
    ]


# ---- the report ------------------------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def environment_lines(env: dict) -> list[str]:
    gpu = env.get("gpu") or {}
    versions = env.get("versions", {})
    rows = [
        (
            "GPU",
            f"{gpu['name']}, {gpu['memory_gib']} GiB, capability {gpu['capability']}, {gpu['count']} device(s)"
            if gpu
            else "none (CUDA available: " + str(env.get("cuda_available")) + ")",
        ),
        ("driver (nvidia-smi)", gpu.get("nvidia_smi")),
        ("python", f"{env.get('python')} ({env.get('executable')})"),
        (
            "torch / CUDA / cuDNN / NCCL",
            f"{env.get('torch')} / {env.get('cuda')} / {env.get('cudnn')} / {env.get('nccl')}",
        ),
        ("TF32 allowed (cuDNN, matmul)", str(env.get("tf32"))),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
        ("missing requirements", ", ".join(env.get("missing_requirements", [])) or "none"),
        ("import errors", "; ".join(f"{k}: {v}" for k, v in env.get("import_errors", {}).items()) or "none"),
        ("platform", f"{env.get('platform')}, {env.get('cpu_count')} CPUs"),
        ("git commit", env.get("git_commit")),
    ]
    return ["| | |", "| --- | --- |", *(f"| {k} | {v if v is not None else '-'} |" for k, v in rows)]


def host_syncs_per_step(counts: dict) -> float | None:
    """A system's host synchronisations per training step from benchmark.py's profile: on a GPU, the waits torch's
    sync debug mode saw; else (the CPU dry run) the sync ops torch.profiler counted. The profiler's count also holds
    reads of host tensors (the non-finite check reads the losses' asynchronous host copies), which wait for nothing
    on a GPU."""
    debug = (counts.get("sync_debug") or {}).get("per_step")
    return debug if debug is not None else counts.get("aten_total_per_step")


def uses_grouped_nms(name: str, variant: str | None = None) -> bool:
    """Whether benchmark step ``name``'s ours (or its ``variant``) runs the batched proposals, whose NMS is the
    Triton kernel on a GPU (mrcnn.modeling.nms.grouped_nms)."""
    fast = FAST_OVERRIDES if name in ("bench_fast", "bench_compile") else []
    overrides = [*fast, *BENCH_VARIANTS.get(name, {}).get(variant, [])]
    values = [o.partition("=")[2] for o in overrides if o.startswith("model.batched_proposals=")]
    return bool(values) and values[-1] == "true"


def fallback_mark(failure: str | None, name: str, variant: str | None = None) -> str:
    """What a benchmark row's label gets when the Triton NMS kernel of its step failed and the row used it."""
    return " **(NMS fallback)**" if failure and uses_grouped_nms(name, variant) else ""


def bench_lines(steps: dict) -> list[str]:
    header = (
        "| run | ours train img/s (range) | torchvision train img/s (range) | ours/tv | rounds | "
        "train peak MiB ours / tv | infer b1 latency ms ours / tv | infer largest batch img/s ours / tv | "
        "infer peak MiB ours / tv |"
    )
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def with_range(entry):
        low, high = entry.get("images_per_s_range") or (None, None)
        return f"{fmt(entry['images_per_s'])} ({fmt(low)}-{fmt(high)})"

    def row(label, train, infer, pick, not_run="not run"):
        """One table row for ours or a variant (``pick(entry)``: its numbers in a train or infer entry, or None)."""
        cells = [label]
        mine = pick(train) if train else None
        if mine:
            note = "" if mine is train["ours"] else f"; {fmt(mine['vs_ours'])}x ours"
            tv = train["torchvision"]
            cells += [
                with_range(mine) + note,
                with_range(tv),
                fmt(train["ratio"] if mine is train["ours"] else mine["ratio"]),
                fmt(train.get("rounds")),
                f"{fmt(mine['peak_mem_mib'], 4)} / {fmt(tv['peak_mem_mib'], 4)}",
            ]
        else:
            cells += ["-"] * 5
        batches = sorted(int(k.removeprefix("model_batch")) for k in infer if k.startswith("model_batch"))
        one, model = (infer[f"model_batch{b}"] for b in (batches[0], batches[-1])) if batches else (None, None)
        if one and pick(one) and pick(model):
            cells += [
                f"{fmt(pick(one)['latency_ms'])} / {fmt(one['torchvision']['latency_ms'])}",
                f"{fmt(pick(model)['images_per_s'])} / {fmt(model['torchvision']['images_per_s'])}",
                f"{fmt(pick(model)['peak_mem_mib'], 4)} / {fmt(model['torchvision']['peak_mem_mib'], 4)}",
            ]
        else:
            cells += [not_run, "-", "-"]
        return "| " + " | ".join(cells) + " |"

    notes = []
    for name in ("bench_eager", "bench_fast", "bench_compile"):
        results = steps.get(name, {}).get("results", {})
        if not results:
            lines.append(f"| {name} | not measured | | | | | | | |")
            continue
        train, infer = results.get("train"), results.get("infer", {})
        failure = results.get("nms_triton_failure")
        label = name + (" (partial)" if results.get("partial") else "") + fallback_mark(failure, name)
        lines.append(row(label, train, infer, lambda e: e["ours"]))
        for variant, overrides in BENCH_VARIANTS.get(name, {}).items():
            label = f"{name}, variant `{variant}` ({' '.join(overrides)}){fallback_mark(failure, name, variant)}"
            lines.append(row(label, train, infer, lambda e, v=variant: e.get("variants", {}).get(v), not_run="-"))
        if failure:
            notes.append(
                f"**{name}: the Triton NMS kernel failed ({failure}).** Its rows with `model.batched_proposals=true`, "
                "marked NMS fallback, measured torchvision's per-group nms instead."
            )
    return lines + (["", *notes] if notes else [])


def profile_lines(steps: dict) -> list[str]:
    """Host syncs per training step and the RoI heads' input shapes, ours beside torchvision (bench_eager)."""
    results = steps.get("bench_eager", {}).get("results", {})
    profile, shapes = results.get("profile"), results.get("head_shapes")
    if not profile and not shapes:
        return ["not measured"]
    lines = [
        "| | ours | torchvision |",
        "| --- | --- | --- |",
    ]
    systems = ("ours", "torchvision")
    if profile:
        lines.append(
            "| sync ops per step (aten: item/tolist, nonzero, ...) | "
            + " | ".join(f"{fmt(profile[s]['aten_total_per_step'])} {profile[s]['aten_per_step']}" for s in systems)
            + " |"
        )
        lines.append(
            "| CUDA runtime waits per step | "
            + " | ".join(str(profile[s]["cuda_runtime_per_step"] or "-") for s in systems)
            + " |"
        )
        lines.append(
            "| syncs per step (sync debug mode) | "
            + " | ".join(fmt((profile[s]["sync_debug"] or {}).get("per_step")) for s in systems)
            + " |"
        )
    for head in ("box_head", "mask_head"):
        if shapes:
            cells = []
            for s in systems:
                h = shapes[s][head]
                cells.append(f"{h['distinct_shapes']} in {h['calls']} calls, RoI counts {h['roi_counts']}")
            lines.append(f"| {head} input shapes in training | " + " | ".join(cells) + " |")
    where = {s: (profile or {}).get(s, {}).get("sync_debug", {}).get("where") for s in systems}
    for s in systems:
        if where[s]:
            lines += ["", f"Where {s}'s step waits (sync debug mode, per 2 steps): " + json.dumps(where[s])]
    lines += ["", "Profiler tables (top 25 ops by GPU and by CPU time): `bench_eager_profile_*.txt`."]
    return lines


def markdown(report: dict) -> str:
    """The summary: steps, environment, goals, training and benchmark numbers, GPU tests, failures' output."""
    steps = {s["name"]: s for s in report["steps"]}
    head = (
        "GPU check, dry run on the CPU (tiny sizes: the numbers test the script, not the GPU)"
        if report["dry_run"]
        else "GPU check"
    )
    started = (
        f"Started {report['started']}, {report['seconds']:.0f} s of the {report['total_budget_s']:.0f} s "
        f"allowed. Command: `{report['command']}`"
    )
    lines = [
        f"# {head}",
        "",
        started,
        "",
        "## Steps",
        "",
        "| step | what | status | seconds | limit | why |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in report["steps"]:
        reason = "; ".join(
            filter(None, [s["reason"], s.get("earlier_run") and f"from the check of {s['earlier_run']}"])
        )
        lines.append(
            f"| {s['name']} | {s['description']} | {s['status']} | {s['seconds']} | "
            f"{s.get('time_limit_s', '-')} | {reason} |"
        )
    lines += ["", "## Environment", "", *environment_lines(steps.get("environment", {}).get("results", {}))]
    lines += ["", "## Goals", "", "| goal | target | measured | met | from |", "| --- | --- | --- | --- | --- |"]
    for g in report["goals"]:
        met = "n/a (dry run)" if report["dry_run"] else {True: "yes", False: "NO", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['target']} | {fmt(g['value'])} | {met} | {g['source']} |")
    args = report["args"]
    lines += [
        "",
        f"## Training on the shapes ({args['train_steps']} steps, seed 0)",
        "",
        "| run | step | mask AP | AP50 | AP75 | box AP | steps | images/s (last logged) | steps/s | step seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fallbacks = []
    for step, runs in TRAIN_STEPS.items():
        for run in runs:
            r = steps.get(step, {}).get("results", {}).get(run, {})
            if r.get("nms_fallback"):
                fallbacks.append(f"**{run} ({step}): {r['nms_fallback']}.**")
            label = (
                run
                + (" (partial)" if r.get("partial") else "")
                + (" **(NMS fallback)**" if r.get("nms_fallback") else "")
            )
            lines.append(
                f"| {label} | {step} | {fmt(r.get('segm_AP'))} | "
                f"{fmt(r.get('segm_AP50'))} | {fmt(r.get('segm_AP75'))} | {fmt(r.get('bbox_AP'))} | "
                f"{fmt(r.get('global_step'))} | {fmt(r.get('images_per_s'))} | {fmt(r.get('steps_per_s'))} | "
                f"{steps.get(step, {}).get('seconds', '-')} |"
            )
    lines += ["", "train_others runs its two runs side by side on the GPU: their steps/s are shared-GPU numbers."]
    lines += [line for fallback in fallbacks for line in ("", fallback)]
    height, width = args["bench_image_size"]
    title = (
        f"## Benchmark ({height}x{width}, batch {args['bench_batch_size']}, {args['bench_steps']} steps a "
        f"round, median of {args['bench_repeats']} rounds after {args['bench_warmup']})"
    )
    lines += ["", title, "", *bench_lines(steps)]
    lines += ["", "## Host synchronisations and head shapes (bench_eager)", "", *profile_lines(steps)]
    tests = {
        f"{test} ({name})": outcome
        for name in TEST_STEPS
        for test, outcome in steps.get(name, {}).get("results", {}).get("tests", {}).items()
    }
    lines += ["", "## GPU tests", ""] + ([f"- {t}: {o}" for t, o in tests.items()] or ["- not run"])
    failed = [s for s in report["steps"] if s["status"] == "failed"]
    if failed:
        lines += ["", "## Failures"]
        for s in failed:
            lines += [
                "",
                f"### {s['name']}: {s['reason']}",
                "",
                f"Log: `{s['log']}`. Its last lines:",
                "",
                "```",
                s.get("tail", ""),
                "```",
            ]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    """Rewrites gpu_check.json and gpu_check.md (after every step, so a check stopped early keeps its numbers)."""
    steps = {s["name"]: s for s in report["steps"]}
    report["goals"] = read_goals(steps, report["dry_run"], report["args"]["ap_tolerance"])
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


# What --copy-to archives of the rest of --out.
FILES_ARCHIVE = "gpu_check_files.tar.gz"


def copy_results(out: Path, to: Path, archive: bool = True) -> None:
    """Copies the report and the profile tables from ``out`` into ``to`` (``--copy-to``), with ``FILES_ARCHIVE``: the
    rest of ``out`` (logs, the benchmarks' jsons, the training runs without their checkpoints). Each goes through a
    temporary file: a check stopped from outside before its end (a machine's time limit) leaves there what it had
    found. ``archive``: make the archive too (after a step that ran; the others change nothing in it)."""
    to.mkdir(parents=True, exist_ok=True)
    for path in [out / "gpu_check.md", out / "gpu_check.json", *sorted(out.glob("*_profile_*.txt"))]:
        if path.is_file():
            tmp = to / f"{path.name}.tmp"
            shutil.copyfile(path, tmp)
            tmp.replace(to / path.name)
    if not archive:
        return
    tmp = to / f"{FILES_ARCHIVE}.tmp"
    try:
        with tarfile.open(tmp, "w:gz") as files:
            files.add(out, arcname=".", filter=lambda info: None if "checkpoints" in Path(info.name).parts else info)
        tmp.replace(to / FILES_ARCHIVE)
    except OSError as error:  # a file changed while read (a step's process outlived its kill): keep the last archive
        print(f"    could not archive {out} into {to}: {error}", flush=True)
        tmp.unlink(missing_ok=True)


# ---- the command line ------------------------------------------------------------------------------------


def parse_budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in STEPS or not seconds:
        raise argparse.ArgumentTypeError(f"--budget takes STEP=SECONDS with STEP one of {', '.join(STEPS)}")
    return name, float(seconds)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for gpu_check.json, gpu_check.md, logs/ and the steps' files")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    p.add_argument(
        "--copy-to",
        metavar="DIR",
        help="also copy gpu_check.md, gpu_check.json, the profile tables and an archive of the rest of --out "
        f"({FILES_ARCHIVE}: logs, jsons, training runs without checkpoints) into DIR after every step (a folder that "
        "comes back even if the check is stopped from outside, such as a lent machine's $OUT)",
    )
    p.add_argument(
        "--steps",
        default=",".join(DEFAULT_STEPS),
        help=f"comma-separated steps to run (default: {','.join(DEFAULT_STEPS)}; also: bench_compile)",
    )
    p.add_argument(
        "--budget",
        type=parse_budget,
        action="append",
        default=[],
        metavar="STEP=SECONDS",
        help="time limit of one step (repeatable); the defaults are in the profiles at the top",
    )
    p.add_argument("--total-budget", type=float, default=None, help="seconds for the whole check (GPU: 420)")
    p.add_argument("--train-steps", type=int, default=None, help="steps of each training run (GPU: 300)")
    p.add_argument(
        "--bench-image-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("HEIGHT", "WIDTH"),
        help="benchmark images (GPU: 800 1333)",
    )
    p.add_argument("--bench-batch-size", type=int, default=None, help="benchmark batch (GPU: 8)")
    p.add_argument("--bench-steps", type=int, default=None, help="training steps per benchmark round (GPU: 5)")
    p.add_argument("--bench-repeats", type=int, default=None, help="measured benchmark rounds (GPU: 3)")
    p.add_argument("--bench-warmup", type=int, default=None, help="discarded benchmark rounds (GPU: 1)")
    p.add_argument(
        "--ap-tolerance",
        type=float,
        default=AP_TOLERANCE,
        help="mask AP points by which bf16 may differ from fp32 and count as unchanged",
    )
    p.add_argument("--collect-environment", metavar="JSON", help=argparse.SUPPRESS)  # the environment step
    args = p.parse_args(argv)
    if args.collect_environment:
        return args
    if not args.out:
        p.error("--out is required")
    if args.copy_to and Path(args.copy_to).resolve().is_relative_to(Path(args.out).resolve()):
        p.error("--copy-to must be outside --out (it gets an archive of --out)")
    args.steps = [s for s in args.steps.split(",") if s]
    if set(args.steps) - set(STEPS):
        p.error(f"--steps takes {','.join(STEPS)}, got {','.join(args.steps)}")
    profile = DRY_RUN if args.dry_run else GPU
    defaults = {
        "total_budget": profile.total_budget,
        "train_steps": profile.train_steps,
        "bench_image_size": list(profile.bench_image),
        "bench_batch_size": profile.bench_batch,
        "bench_steps": profile.bench_steps,
        "bench_repeats": profile.bench_repeats,
        "bench_warmup": profile.bench_warmup,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.train_batch_size = profile.train_batch
    args.budgets = {**profile.budgets, **dict(args.budget)}
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the selected steps in order, rewriting the report after each; returns 1 if one failed."""
    args = parse_args(argv)
    # Stopped from outside (a `timeout` around the check): end the running step's process group (run_commands'
    # finally), record the step as stopped with what it finished, write and copy the report, then exit 143.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.collect_environment:
        Path(args.collect_environment).write_text(json.dumps(collect_environment(), indent=2) + "\n")
        return 0
    profile = DRY_RUN if args.dry_run else GPU
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    planned = sum(args.budgets[s] for s in args.steps)
    if planned > args.total_budget:
        print(
            f"note: the step limits add up to {planned:.0f} s, over the total of {args.total_budget:.0f} s: "
            "the last steps get what is left",
            flush=True,
        )
    report = {
        "dry_run": args.dry_run,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "total_budget_s": args.total_budget,
        "seconds": 0.0,
        "args": {k: v for k, v in vars(args).items() if k not in ("budget", "collect_environment")},
        "steps": [],
    }
    earlier = earlier_records(out, args.dry_run)
    start = time.monotonic()
    no_cuda, stopped = False, None
    for number, name in enumerate(STEPS, 1):
        left = args.total_budget - (time.monotonic() - start)
        ran = False
        if name not in args.steps:
            record = earlier.get(name) or not_run(name, "not selected (--steps)")
        elif stopped is not None:
            record = not_run(name, "not run: the check was stopped from outside")
        elif no_cuda:
            record = not_run(name, "not run: no CUDA device (see environment)")
        elif left < MIN_STEP_S:
            record = not_run(name, f"not run: the total budget of {args.total_budget:.0f} s was spent")
        else:
            limit = min(args.budgets[name], left)
            print(f"[{number}/{len(STEPS)}] {name}: {DESCRIPTIONS[name]} (limit {limit:.0f} s)", flush=True)
            record = run_step(name, step_commands(name, profile, args, out), out, limit, args.dry_run, args)
            ran = True
            no_cuda = name == "environment" and not args.dry_run and record["results"].get("cuda_available") is False
            stopped = record.get("stopped")
        kept = f" (from the check of {record['earlier_run']})" if record.get("earlier_run") else ""
        print(
            f"    {name}: {record['status']}{kept} in {record['seconds']} s"
            + (f": {record['reason']}" if record["reason"] else ""),
            flush=True,
        )
        report["steps"].append(record)
        report["seconds"] = round(time.monotonic() - start, 1)
        write_report(report, out)
        if args.copy_to:
            copy_results(out, Path(args.copy_to), archive=ran)
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}", flush=True)
    if stopped is not None:
        return stopped
    return 1 if any(s["status"] == "failed" for s in report["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
