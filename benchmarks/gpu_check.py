"""One command that measures everything GPU-related, ready for the moment a GPU is lent.

The steps, cheapest first. Each one is a subprocess with its own time limit, in a process group of its own
that is killed when the limit passes, so a hang or a CUDA crash ends that step only and the others still run:

1. ``environment``: GPU name and memory; python, torch, torchvision, CUDA, cuDNN, NCCL, lightning, hydra and
   the other versions; whether the project imports.
2. ``gpu_tests``: ``pytest -m gpu tests/modeling/test_gpu.py`` (bf16 autocast, channels_last, torch.compile,
   SyncBatchNorm, DDP on one GPU). Without CUDA the tests skip and the step says "skipped (no CUDA)".
3. ``train_fp32``, ``train_bf16``: ``run.py`` on the built-in shapes for ``--train-steps`` steps, in fp32 and
   on the fast path (bf16-mixed, channels_last, cuDNN autotuning), from the same seed; mask and box AP from
   ``<run dir>/metrics.json``.
4. ``bench_fp32``, ``bench_bf16``, ``bench_compile``: ``benchmarks/benchmark.py`` at 800x1333, batch 8, ours
   beside torchvision: both in fp32; both under bf16 autocast with channels_last and cuDNN autotuning; the
   same with our ``module.compile=true`` (training only by default: compiling for inference too does not fit
   the time). Training throughput, inference latency (batch 1) and throughput (batch 8), peak memory.

Then the project's GPU goals (benchmarks/README.md) are read off the numbers. After every step
``gpu_check.json`` and ``gpu_check.md`` are rewritten in ``--out``; each step's whole output is in
``--out/logs/<step>.log``, its files beside them (``train_*/``, ``bench_*.json``, ``gpu_tests.xml``).
The exit status is 1 when a step failed.

This script imports nothing beyond the standard library; the steps run with whatever torch, torchvision and
Lightning the machine has (and record them). ``--dry-run`` runs the same steps on the CPU at tiny sizes
(a tiny model, a few steps, 64-pixel images) in about two minutes: it tests this script, not the GPU.

Usage::

    python benchmarks/gpu_check.py --out gpu_check              # one H100/H200-class GPU: under 8 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/check   # the same steps on the CPU
    python benchmarks/gpu_check.py --out gpu_check --steps bench_compile --budget bench_compile=300  # one again
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
import time
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "benchmark.py"
GPU_TESTS = "tests/modeling/test_gpu.py"

STEPS = ("environment", "gpu_tests", "train_fp32", "train_bf16", "bench_fp32", "bench_bf16", "bench_compile")
DESCRIPTIONS = {
    "environment": "GPU, memory, versions; the project imports",
    "gpu_tests": f"pytest -m gpu {GPU_TESTS}",
    "train_fp32": "run.py on shapes, fp32",
    "train_bf16": "run.py on shapes, bf16-mixed + channels_last + cuDNN autotuning",
    "bench_fp32": "benchmark.py, ours and torchvision in fp32",
    "bench_bf16": "benchmark.py, bf16 autocast + channels_last + cuDNN autotuning (both)",
    "bench_compile": "benchmark.py, as bench_bf16 with our module.compile=true",
}
# The training runs' precision switches: fp32, and the fast path without torch.compile (its cost is measured
# by bench_compile; compiling the training run would spend most of its time limit).
TRAIN_SWITCHES = {
    "train_fp32": ["trainer.precision=32-true"],
    "train_bf16": ["trainer.precision=bf16-mixed", "module.channels_last=true", "trainer.benchmark=true"],
}
BENCH_SWITCHES = {
    "bench_fp32": ["--precision", "32"],
    "bench_bf16": ["--precision", "bf16-mixed", "--channels-last", "--cudnn-benchmark"],
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

# The GPU goals of benchmarks/README.md: ours on the fast path (bf16, channels_last, cuDNN autotuning, compile
# on or off, whichever is faster) against torchvision.
GOAL_TRAIN_VS_FP32 = 1.5  # training throughput / torchvision's in fp32
GOAL_TRAIN_VS_AUTOCAST = 1.1  # training throughput / torchvision's under the same autocast and switches
GOAL_TRAIN_IMAGES_PER_S = 30.0  # training images/s on one H100-class GPU at 800x1333
GOAL_INFER_VS_FP32 = 1.5  # inference throughput (model only, largest batch) / torchvision's in fp32
# Mask AP points by which bf16 may differ from fp32 and still count as unchanged: about one seed-to-seed
# standard deviation of the CPU ablations (FPN 26.6 +- 2.9, experiments/ablation_backbone); a coarse check
# that bf16 breaks nothing, not a test of equality.
AP_TOLERANCE = 3.0

TAIL_LINES = 40
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
    train_overrides: list
    bench_image: tuple
    bench_batch: int
    bench_steps: int
    bench_repeats: int
    bench_warmup: int
    bench_overrides: list
    compile_overrides: list
    compile_skip: str


# One H100/H200-class GPU. The limits add up to 470 s, inside the 8 minutes a check may take; the data for
# 300 steps and the 200 validation images of the shapes are generated by loader workers.
GPU = Profile(
    device="cuda",
    budgets={
        "environment": 20,
        "gpu_tests": 120,
        "train_fp32": 45,
        "train_bf16": 45,
        "bench_fp32": 75,
        "bench_bf16": 65,
        "bench_compile": 100,
    },
    total_budget=480,
    train_steps=300,
    train_overrides=[
        "trainer=gpu",
        "data.datamodule.num_workers=4",
        "data.datamodule.persistent_workers=true",
        "data.datamodule.pin_memory=true",
    ],
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
    budgets={
        "environment": 60,
        "gpu_tests": 90,
        "train_fp32": 90,
        "train_bf16": 90,
        "bench_fp32": 120,
        "bench_bf16": 120,
        "bench_compile": 150,
    },
    total_budget=720,
    train_steps=3,
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
    bench_steps=1,
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

    The group stays in this script's session: a machine that ends a stopped command's processes by session
    ends the step's too.

    Returns:
        The exit code (None if the time limit passed) and the seconds it ran.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", WANDB_MODE="disabled")
    # This checkout's mrcnn, also where the project is not installed (benchmark.py runs from benchmarks/).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        # preexec_fn is safe here (this script starts no threads); Popen's process_group needs Python 3.11.
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=os.setpgrp,
        )  # noqa: PLW1509
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            kill_group(process.pid)
            process.wait()
    return returncode, time.monotonic() - start


def tail(log_path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` non-blank lines of a log, each as a terminal shows it (progress bars redraw
    their line after a carriage return), cut at 500 characters."""
    if not log_path.exists():
        return ""
    shown = [line.rsplit("\r", 1)[-1][:500] for line in log_path.read_text(errors="replace").splitlines()]
    return "\n".join([line for line in shown if line.strip()][-lines:])


# ---- what each step runs and what it found -----------------------------------------------------------------


def step_output(name: str, out: Path) -> Path:
    """The file or folder where step ``name`` leaves its results."""
    if name == "environment":
        return out / "environment.json"
    if name == "gpu_tests":
        return out / "gpu_tests.xml"
    return out / name if name in TRAIN_SWITCHES else out / f"{name}.json"


def step_command(name: str, profile: Profile, args, out: Path) -> list[str]:
    """The command line of step ``name``."""
    python = sys.executable
    if name == "environment":
        return [python, str(Path(__file__).resolve()), "--collect-environment", str(step_output(name, out))]
    if name == "gpu_tests":
        return [
            python,
            "-m",
            "pytest",
            "-m",
            "gpu",
            GPU_TESTS,
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
            f"--junitxml={step_output(name, out)}",
        ]
    if name in TRAIN_SWITCHES:
        # ++: add max_steps whether or not the trainer config has the key; the run stops at whichever of
        # max_steps and max_epochs comes first, and the lr schedule spans max_steps.
        return [
            python,
            str(ROOT / "run.py"),
            *profile.train_overrides,
            *TRAIN_SWITCHES[name],
            f"++trainer.max_steps={args.train_steps}",
            "seed=0",
            f"hydra.run.dir={step_output(name, out)}",
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
        profile.compile_skip if name == "bench_compile" else "eval",
        *BENCH_SWITCHES[name],
        "--out",
        str(step_output(name, out)),
    ]
    compile_overrides = profile.compile_overrides if name == "bench_compile" else []
    return [*command, "--overrides", *profile.bench_overrides, *compile_overrides]


def gpu_test_results(junit_xml: Path) -> dict:
    """Per test: passed, failed or skipped (with the reason), from pytest's junit xml."""
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


def train_results(run_dir: Path) -> dict:
    """AP (in points) and steps from the run's metrics.json, its last logged throughput."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = {key: 100 * metrics[key] for key in ("segm_AP", "segm_AP50", "segm_AP75", "bbox_AP")}
    result.update(
        global_step=metrics["global_step"],
        images_per_s=last_logged(run_dir / "csv" / "metrics.csv", "train/images_per_sec"),
    )
    return result


def bench_results(path: Path) -> dict:
    """The numbers of one benchmark.py run: training and inference per system, their ratios, peak memory."""
    bench = json.loads(path.read_text())
    result = {"hardware": bench["hardware"], "args": bench["args"]}
    if "train" in bench:
        train = bench["train"]
        result["train"] = {
            "ratio": train["ratio"],
            **{
                system: {
                    "images_per_s": train[system]["images_per_s"],
                    "peak_mem_mib": train[system]["peak_mem_mib"],
                    "step_s": train[system]["median_s"] / bench["args"]["steps"],
                }
                for system in ("ours", "torchvision")
            },
        }
    if "infer" in bench:
        result["infer"] = {
            key: {
                "ratio": entry["ratio"],
                **{
                    system: {k: entry[system][k] for k in ("latency_ms", "images_per_s", "peak_mem_mib")}
                    for system in ("ours", "torchvision")
                },
            }
            for key, entry in bench["infer"].items()
        }
    return result


def read_results(name: str, out: Path) -> dict:
    """What step ``name`` found, from the files it wrote (raises if they are missing or incomplete)."""
    path = step_output(name, out)
    if name == "environment":
        return json.loads(path.read_text())
    if name == "gpu_tests":
        return gpu_test_results(path)
    if name in TRAIN_SWITCHES:
        return train_results(path)
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
    if name == "gpu_tests":
        if results["failed"]:
            return "failed", "failed: " + ", ".join(t for t, o in results["tests"].items() if o == "failed")
        if not results["passed"]:
            reasons = sorted(set(results["skip_reasons"].values())) or ["no tests collected"]
            return "skipped", f"skipped ({'; '.join(reasons)})"
    return "passed", ""


def error_line(log_path: Path) -> str:
    """The last line of a log that names an error, for the reason of a failed step."""
    for line in reversed(tail(log_path, 200).splitlines()):
        if re.search(r"(Error|Exception|error:)", line):
            return line.strip()[:300]
    return ""


def run_step(name: str, command: list[str], out: Path, timeout_s: float, dry_run: bool = False) -> dict:
    """Runs one step and reads what it found.

    Returns:
        ``name``, ``status`` (passed, failed, skipped), ``reason``, ``seconds``, ``time_limit_s``, ``command``,
        ``log`` (relative to ``out``), ``results`` (whatever could be read, also after a failure) and, for a
        failed step, ``tail`` (the end of its output).
    """
    log_path = out / "logs" / f"{name}.log"
    # Results of an earlier check in the same folder must not pass for this one's.
    output = step_output(name, out)
    if output.is_dir():
        shutil.rmtree(output)
    else:
        output.unlink(missing_ok=True)
    returncode, seconds = run_command(command, log_path, timeout_s)
    record = {
        "name": name,
        "description": DESCRIPTIONS.get(name, ""),
        "seconds": round(seconds, 1),
        "time_limit_s": round(timeout_s, 1),
        "command": command,
        "log": str(log_path.relative_to(out)),
        "results": {},
    }
    try:
        record["results"] = read_results(name, out)
        status, reason = judge(name, record["results"], dry_run)
    except (OSError, ValueError, KeyError, TypeError, ElementTree.ParseError) as error:
        status, reason = "failed", f"no results ({type(error).__name__}: {error})"
    if returncode is None:
        status, reason = "failed", f"timed out after {timeout_s:.0f} s (its time limit)"
    elif returncode != 0:
        # What the results say (e.g. which tests failed), else the error the output ends with.
        detail = reason if record["results"] else error_line(log_path)
        status, reason = "failed", f"exit code {returncode}" + (f": {detail}" if detail else "")
    record.update(status=status, reason=reason)
    if status == "failed":
        record["tail"] = tail(log_path)
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
    """The GPU goals, each with the measured value (None where its steps did not run) and whether it is met
    (None in a dry run or when not measured)."""

    def train(name):
        return steps.get(name, {}).get("results", {}).get("train")

    def infer(name):
        entries = steps.get(name, {}).get("results", {}).get("infer") or {}
        model = [k for k in entries if k.startswith("model_batch")]
        return entries[max(model, key=lambda k: int(k.removeprefix("model_batch")))] if model else None

    def check(value, ok):
        return None if dry_run or value is None else ok(value)

    fast = [(name, train(name)) for name in ("bench_bf16", "bench_compile") if train(name)]
    best_name, best = max(fast, key=lambda nt: nt[1]["ours"]["images_per_s"]) if fast else (None, None)
    fp32, fast_infer, fp32_infer = train("bench_fp32"), infer("bench_bf16"), infer("bench_fp32")
    vs_fp32 = best["ours"]["images_per_s"] / fp32["torchvision"]["images_per_s"] if best and fp32 else None
    infer_vs_fp32 = (
        fast_infer["ours"]["images_per_s"] / fp32_infer["torchvision"]["images_per_s"]
        if fast_infer and fp32_infer
        else None
    )
    ap = [steps.get(n, {}).get("results", {}).get("segm_AP") for n in ("train_fp32", "train_bf16")]
    ap_change = ap[1] - ap[0] if None not in ap else None
    return [
        goal(
            "training: ours, fast path, / torchvision fp32",
            f">= {GOAL_TRAIN_VS_FP32}",
            vs_fp32,
            check(vs_fp32, lambda v: v >= GOAL_TRAIN_VS_FP32),
            f"{best_name} / bench_fp32",
        ),
        goal(
            "training: ours, fast path, / torchvision autocast (same switches)",
            f">= {GOAL_TRAIN_VS_AUTOCAST}",
            best and best["ratio"],
            check(best and best["ratio"], lambda v: v >= GOAL_TRAIN_VS_AUTOCAST),
            f"{best_name}",
        ),
        goal(
            "training images/s, ours, fast path",
            f">= {GOAL_TRAIN_IMAGES_PER_S}",
            best and best["ours"]["images_per_s"],
            check(best and best["ours"]["images_per_s"], lambda v: v >= GOAL_TRAIN_IMAGES_PER_S),
            f"{best_name}",
        ),
        goal(
            "inference (model only, largest batch): ours bf16 / torchvision fp32",
            f">= {GOAL_INFER_VS_FP32}",
            infer_vs_fp32,
            check(infer_vs_fp32, lambda v: v >= GOAL_INFER_VS_FP32),
            "bench_bf16 / bench_fp32",
        ),
        goal(
            "mask AP change, bf16 - fp32 (points)",
            f"within +-{ap_tolerance}",
            ap_change,
            check(ap_change, lambda v: abs(v) <= ap_tolerance),
            "train_bf16 - train_fp32",
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


def bench_lines(steps: dict) -> list[str]:
    header = (
        "| run | ours train img/s | torchvision train img/s | ours/tv | train peak MiB ours / tv | "
        "infer b1 latency ms ours / tv | infer model-only largest batch img/s ours / tv | "
        "infer end-to-end largest batch img/s ours / tv | infer peak MiB ours / tv |"
    )
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("bench_fp32", "bench_bf16", "bench_compile"):
        results = steps.get(name, {}).get("results", {})
        if not results:
            lines.append(f"| {name} | not measured | | | | | | | |")
            continue
        train, infer = results.get("train"), results.get("infer", {})
        cells = [name]
        if train:
            cells += [
                fmt(train["ours"]["images_per_s"]),
                fmt(train["torchvision"]["images_per_s"]),
                fmt(train["ratio"]),
                f"{fmt(train['ours']['peak_mem_mib'], 4)} / {fmt(train['torchvision']['peak_mem_mib'], 4)}",
            ]
        else:
            cells += ["-"] * 4
        batches = sorted(int(k.removeprefix("model_batch")) for k in infer if k.startswith("model_batch"))
        if batches:
            one, model, e2e = (
                infer["model_batch1"],
                infer[f"model_batch{batches[-1]}"],
                infer[f"e2e_batch{batches[-1]}"],
            )
            cells += [
                f"{fmt(one['ours']['latency_ms'])} / {fmt(one['torchvision']['latency_ms'])}",
                f"{fmt(model['ours']['images_per_s'])} / {fmt(model['torchvision']['images_per_s'])}",
                f"{fmt(e2e['ours']['images_per_s'])} / {fmt(e2e['torchvision']['images_per_s'])}",
                f"{fmt(model['ours']['peak_mem_mib'], 4)} / {fmt(model['torchvision']['peak_mem_mib'], 4)}",
            ]
        else:
            cells += ["not run"] + ["-"] * 3
        lines.append("| " + " | ".join(cells) + " |")
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
        "| run | mask AP | AP50 | AP75 | box AP | steps | images/s (last logged) | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in TRAIN_SWITCHES:
        r = steps.get(name, {}).get("results", {})
        lines.append(
            f"| {name} | {fmt(r.get('segm_AP'))} | {fmt(r.get('segm_AP50'))} | {fmt(r.get('segm_AP75'))} | "
            f"{fmt(r.get('bbox_AP'))} | {fmt(r.get('global_step'))} | {fmt(r.get('images_per_s'))} | "
            f"{steps.get(name, {}).get('seconds', '-')} |"
        )
    height, width = args["bench_image_size"]
    title = (
        f"## Benchmark ({height}x{width}, batch {args['bench_batch_size']}, {args['bench_steps']} steps a "
        f"round, median of {args['bench_repeats']} rounds after {args['bench_warmup']})"
    )
    lines += ["", title, "", *bench_lines(steps)]
    tests = steps.get("gpu_tests", {}).get("results", {}).get("tests", {})
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
        "--steps", default=",".join(STEPS), help=f"comma-separated steps to run (default all: {','.join(STEPS)})"
    )
    p.add_argument(
        "--budget",
        type=parse_budget,
        action="append",
        default=[],
        metavar="STEP=SECONDS",
        help="time limit of one step (repeatable); the defaults are in the profiles at the top",
    )
    p.add_argument("--total-budget", type=float, default=None, help="seconds for the whole check (GPU: 480)")
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
    args.budgets = {**profile.budgets, **dict(args.budget)}
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the selected steps in order, rewriting the report after each; returns 1 if one failed."""
    args = parse_args(argv)
    # Stopped from outside: end the running step's process group too (run_command's finally), then exit.
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
    no_cuda = False
    for number, name in enumerate(STEPS, 1):
        left = args.total_budget - (time.monotonic() - start)
        if name not in args.steps:
            record = earlier.get(name) or not_run(name, "not selected (--steps)")
        elif no_cuda:
            record = not_run(name, "not run: no CUDA device (see environment)")
        elif left < MIN_STEP_S:
            record = not_run(name, f"not run: the total budget of {args.total_budget:.0f} s was spent")
        else:
            limit = min(args.budgets[name], left)
            print(f"[{number}/{len(STEPS)}] {name}: {DESCRIPTIONS[name]} (limit {limit:.0f} s)", flush=True)
            record = run_step(name, step_command(name, profile, args, out), out, limit, args.dry_run)
            no_cuda = name == "environment" and not args.dry_run and record["results"].get("cuda_available") is False
        kept = f" (from the check of {record['earlier_run']})" if record.get("earlier_run") else ""
        print(
            f"    {name}: {record['status']}{kept} in {record['seconds']} s"
            + (f": {record['reason']}" if record["reason"] else ""),
            flush=True,
        )
        report["steps"].append(record)
        report["seconds"] = round(time.monotonic() - start, 1)
        write_report(report, out)
    print(f"wrote {out / 'gpu_check.md'} and {out / 'gpu_check.json'}", flush=True)
    return 1 if any(s["status"] == "failed" for s in report["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
