"""benchmarks/gpu_check.py: the dry run on the CPU reports every step, goes on past a failing one, and a step
that fails or hangs is reported with the end of its output (no timing is checked)."""

import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
GPU_TESTS = Path(__file__).resolve().parents[1] / "modeling" / "test_gpu.py"


def load_gpu_check():
    """The script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def test_dry_run_reports_every_step_and_goes_on_past_a_failing_one(tmp_path):
    # train_bf16 gets a 1-second limit: it cannot get past its imports, so it fails, and the steps after it run.
    out = tmp_path / "check"
    command = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--budget", "train_bf16=1"]
    proc = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: a step failed

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEPS)
    statuses = {name: s["status"] for name, s in steps.items()}
    assert statuses == {
        "environment": "passed",
        "gpu_tests": "skipped",
        "train_fp32": "passed",
        "train_bf16": "failed",
        "bench_fp32": "passed",
        "bench_bf16": "passed",
        "bench_compile": "passed",
    }, {n: s["reason"] for n, s in steps.items()}

    env = steps["environment"]["results"]
    assert env["python"] == platform.python_version() and env["cuda_available"] is False
    assert all(env["versions"][name] for name in ("torch", "torchvision", "lightning", "hydra-core", "mrcnn"))
    assert env["torch"] and env["import_errors"] == {}

    # Without CUDA every GPU test skips, and the step says so rather than failing.
    tests = steps["gpu_tests"]["results"]
    assert steps["gpu_tests"]["reason"] == "skipped (no CUDA)"
    assert tests["skipped"] == GPU_TESTS.read_text().count("\ndef test_") and tests["passed"] == tests["failed"] == 0

    train = steps["train_fp32"]["results"]
    assert train["global_step"] == gpu_check.DRY_RUN.train_steps and 0 <= train["segm_AP"] <= 100
    assert train["images_per_s"] > 0

    failed = steps["train_bf16"]
    assert failed["reason"] == "timed out after 1 s (its time limit)" and failed["seconds"] < 10
    assert "run.py" in failed["tail"] and failed["results"] == {}

    for name in ("bench_fp32", "bench_bf16", "bench_compile"):
        bench = steps[name]["results"]
        assert bench["train"]["ours"]["images_per_s"] > 0 and bench["train"]["torchvision"]["images_per_s"] > 0
        assert bench["train"]["ratio"] > 0 and bench["train"]["ours"]["peak_mem_mib"] >= 0
    for name in ("bench_fp32", "bench_bf16"):
        assert steps[name]["results"]["infer"]["model_batch1"]["ours"]["latency_ms"] > 0
    assert "infer" not in steps["bench_compile"]["results"]  # compiled for training only
    assert steps["bench_bf16"]["results"]["args"]["precision"] == "bf16-mixed"
    assert steps["bench_bf16"]["results"]["args"]["channels_last"] is True

    goals = {g["goal"]: g for g in report["goals"]}
    assert len(goals) == 5 and all(g["met"] is None for g in goals.values())  # no verdicts in a dry run
    assert all(g["value"] > 0 for text, g in goals.items() if not text.startswith("mask AP"))
    assert goals["mask AP change, bf16 - fp32 (points)"]["value"] is None  # train_bf16 failed

    summary = (out / "gpu_check.md").read_text()
    for name, status in statuses.items():
        assert f"| {name} | {gpu_check.DESCRIPTIONS[name]} | {status} |" in summary
    assert "skipped (no CUDA)" in summary and f"| python | {platform.python_version()} " in summary
    assert "## Failures" in summary and "### train_bf16: timed out after 1 s" in summary
    assert (out / "logs" / "bench_compile.log").exists()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_crashing_step_is_reported_with_its_error_and_output(tmp_path):
    command = [sys.executable, "-c", "print('loading the model'); raise RuntimeError('CUDA error: out of memory')"]
    record = gpu_check.run_step("bench_fp32", command, tmp_path, timeout_s=60)
    assert record["status"] == "failed"
    assert record["reason"] == "exit code 1: RuntimeError: CUDA error: out of memory"
    assert "loading the model" in record["tail"] and record["results"] == {}


def test_a_hanging_step_is_killed_with_its_children_at_its_time_limit(tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('waiting forever', flush=True)\n"
        "time.sleep(120)\n"
    )
    record = gpu_check.run_step("bench_fp32", [sys.executable, "-c", hang], tmp_path, timeout_s=5)
    assert record["status"] == "failed" and record["reason"] == "timed out after 5 s (its time limit)"
    assert record["seconds"] < 30 and "waiting forever" in record["tail"]
    # The step's whole process group was killed: a worker it started holds no GPU memory afterwards.
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)
