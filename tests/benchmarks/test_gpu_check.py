"""benchmarks/gpu_check.py: the dry run on the CPU reports every step, goes on past a failing one, and a step
that fails or hangs is reported with the end of its output (no timing is checked)."""

import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.helpers.runs import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
GPU_TESTS = Path(__file__).resolve().parents[1] / "modeling" / "test_gpu.py"


gpu_check = load_script(SCRIPT)


# Slow (about 60 s: six steps, each a new process). The default suite checks the runner's parts one at a time below:
# limits, partial numbers, crashes, hangs, skips.
@pytest.mark.slow
def test_dry_run_reports_every_step_and_goes_on_past_a_failing_one(tmp_path):
    # train_bf16 gets a 1-second limit: it cannot get past its imports, so it fails, and the steps after it run.
    out = tmp_path / "check"
    selected = "environment,bench_eager,bench_fast,train_bf16,gpu_tests,train_others"
    copy = tmp_path / "copy"
    command = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--copy-to", str(copy), "--steps", selected]
    proc = subprocess.run(
        [*command, "--budget", "train_bf16=1"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: a step failed

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEPS)
    statuses = {name: s["status"] for name, s in steps.items()}
    assert statuses == {
        "environment": "passed",
        "bench_eager": "passed",
        "bench_fast": "passed",
        "train_bf16": "failed",
        "gpu_tests": "skipped",
        "train_batched": "skipped",
        "train_others": "passed",
        "gpu_determinism": "skipped",
        "bench_compile": "skipped",
    }, {n: s["reason"] for n, s in steps.items()}
    assert steps["bench_compile"]["reason"] == "not selected (--steps)"

    env = steps["environment"]["results"]
    assert env["python"] == platform.python_version() and env["cuda_available"] is False
    assert all(env["versions"][name] for name in ("torch", "torchvision", "lightning", "hydra-core", "mrcnn"))
    assert env["torch"] and env["import_errors"] == {}

    # Without CUDA every GPU test skips, and the step says so rather than failing.
    tests = steps["gpu_tests"]["results"]
    assert steps["gpu_tests"]["reason"] == "skipped (no CUDA)"
    assert tests["skipped"] == GPU_TESTS.read_text().count("\ndef test_") and tests["passed"] == tests["failed"] == 0

    # Two training runs side by side, each to its last step, with AP and throughput.
    for run in ("fp32", "fast"):
        train = steps["train_others"]["results"][run]
        assert train["global_step"] == gpu_check.DRY_RUN.train_steps and 0 <= train["segm_AP"] <= 100
        assert train["images_per_s"] > 0 and train["steps_per_s"] > 0 and "partial" not in train
    assert (out / "logs" / "train_others.fp32.log").exists() and (out / "logs" / "train_others.fast.log").exists()

    failed = steps["train_bf16"]
    assert failed["reason"] == "timed out after 1 s (its time limit)" and failed["seconds"] < 10
    assert "run.py" in failed["tail"] and failed["results"] == {}

    eager, fast = steps["bench_eager"]["results"], steps["bench_fast"]["results"]
    for bench in (eager, fast):
        assert bench["train"]["ours"]["images_per_s"] > 0 and bench["train"]["torchvision"]["images_per_s"] > 0
        assert bench["train"]["ratio"] > 0 and bench["train"]["rounds"] == gpu_check.DRY_RUN.bench_repeats
        assert bench["partial"] is False
    # The variants: ours with the named switches changed, in the same rounds.
    for bench, name in ((eager, "bench_eager"), (fast, "bench_fast")):
        variants = bench["train"]["variants"]
        assert {n: v["overrides"] for n, v in variants.items()} == gpu_check.BENCH_VARIANTS[name]
        assert all(v["images_per_s"] > 0 and v["vs_ours"] > 0 for v in variants.values())
    assert set(eager["infer"]["model_batch1"]["variants"]) == set(gpu_check.BENCH_VARIANTS["bench_eager"])
    assert eager["infer"]["model_batch1"]["ours"]["latency_ms"] > 0 and "infer" not in fast  # fast: training only
    assert list(eager["infer"]) == ["model_batch1"]  # model only: no COCO-json encoding
    assert fast["args"]["channels_last"] is True and eager["args"]["channels_last"] is False
    # The profile: the CPU counts the same sync ops a GPU step would wait on; both systems have some today.
    profiled = ("ours", "batched", "torchvision")
    for system in ("ours", "torchvision"):
        assert eager["profile"][system]["aten_total_per_step"] > 0
        assert eager["head_shapes"][system]["mask_head"]["calls"] > 0
        assert (out / f"bench_eager_profile_{system}.txt").read_text().startswith("== by CPU time")

    goals = {g["goal"]: g for g in report["goals"]}
    assert len(goals) == 11 and all(g["met"] is None for g in goals.values())  # no verdicts in a dry run
    assert goals["training, bf16 eager: ours / torchvision"]["value"] > 0
    # The fast path against torchvision eager measured beside it, in one process (bench_fast's --torchvision-eager).
    fast_goal = goals["training: ours on the fast path / torchvision eager"]
    assert fast_goal["value"] == fast["train"]["ratio"] and fast_goal["source"] == "bench_fast"
    assert fast["args"]["torchvision_eager"] is True and eager["args"]["torchvision_eager"] is False
    assert goals["host synchronisations per training step, ours"]["value"] > 0
    # The batched variant's count is measured too (on the CPU its NMS runs per group, so it is not the GPU's count).
    assert goals["host synchronisations per training step, ours with the batched switches"]["value"] > 0
    assert (out / "bench_eager_profile_batched.txt").read_text().startswith("== by CPU time")
    assert goals["run.py trainer=gpu on the shapes, steps/s"]["value"] is None  # train_bf16 failed
    assert goals["run.py trainer=gpu on the shapes with the batched switches, steps/s"]["value"] is None  # not run
    assert goals["mask AP change, fast path - fp32 (points)"]["value"] is not None

    summary = (out / "gpu_check.md").read_text()
    # --copy-to: the report and the profile tables, as they were after the last step (what a lent machine's $OUT gets),
    # and an archive of the rest: logs, benchmark jsons, training runs without their checkpoints.
    copied = sorted(p.name for p in copy.iterdir())
    profiles = [f"bench_eager_profile_{s}.txt" for s in profiled]
    assert copied == sorted(["gpu_check.md", "gpu_check.json", *profiles, gpu_check.FILES_ARCHIVE])
    with tarfile.open(copy / gpu_check.FILES_ARCHIVE) as archive:
        archived = {Path(name).as_posix() for name in archive.getnames()}
    assert {"logs/train_others.fp32.log", "bench_eager.json", "gpu_check.json"} <= archived
    assert any(name.startswith("train_fp32/") for name in archived) and any((out / "train_fp32").rglob("checkpoints"))
    assert not any("checkpoints" in name for name in archived)
    assert (copy / "gpu_check.md").read_text() == summary and (copy / "gpu_check.json").read_text() == (
        out / "gpu_check.json"
    ).read_text()
    assert eager["nms_triton_failure"] is None and "NMS fallback" not in summary  # no Triton kernel on a CPU
    for name, status in statuses.items():
        assert f"| {name} | {gpu_check.DESCRIPTIONS[name]} | {status} |" in summary
    assert "skipped (no CUDA)" in summary and f"| python | {platform.python_version()} " in summary
    assert "## Failures" in summary and "### train_bf16: timed out after 1 s" in summary
    assert "| bench_fast, variant `frozen_bn_float32` (model.fold_frozen_bn=false) | " in summary
    batched_row = next(line for line in summary.splitlines() if line.startswith("| bench_eager, variant `batched` ("))
    assert "x ours" in batched_row and " - |" not in batched_row  # training and inference numbers
    assert "| sync ops per step" in summary and "| mask_head input shapes in training |" in summary


def test_the_default_steps_fit_seven_minutes_with_their_margins():
    limits = [gpu_check.GPU.budgets[name] for name in gpu_check.DEFAULT_STEPS]
    assert sum(limits) <= gpu_check.GPU.total_budget <= 7 * 60


def hang_after(code: str) -> list[str]:
    """A command that runs ``code`` and then waits forever (until its step's limit kills it)."""
    return [sys.executable, "-c", code + "\nimport time; print('working', flush=True); time.sleep(120)"]


def test_a_benchmark_stopped_at_its_limit_reports_the_rounds_it_finished(tmp_path):
    # What benchmark.py writes after its first measured round of three.
    partial = {
        "complete": False,
        "args": {"steps": 5},
        "hardware": {},
        "train": {
            "complete": False,
            "rounds": 1,
            "ratio": 0.9,
            "ours": {"images_per_s": 45.0, "images_per_s_range": [45.0, 45.0], "peak_mem_mib": 9000, "median_s": 1},
            "torchvision": {"images_per_s": 50.0, "peak_mem_mib": 9000, "median_s": 0.9},
        },
    }
    path = tmp_path / "bench_eager.json"
    record = gpu_check.run_step(
        "bench_eager", hang_after(f"open({str(path)!r}, 'w').write({json.dumps(partial)!r})"), tmp_path, timeout_s=5
    )
    assert record["status"] == "failed"
    assert record["reason"] == "timed out after 5 s (its time limit); partial results kept"
    assert record["results"]["partial"] is True and record["results"]["train"]["rounds"] == 1
    assert record["results"]["train"]["ours"]["images_per_s"] == 45.0


def test_a_training_run_stopped_at_its_limit_reports_the_steps_it_logged(tmp_path):
    run_dir = gpu_check.step_output("bf16", tmp_path)
    write_log = (
        "import pathlib\n"
        f"log = pathlib.Path({str(run_dir / 'csv')!r})\n"
        "log.mkdir(parents=True)\n"
        "(log / 'metrics.csv').write_text('step,train/images_per_sec\\n49,80.0\\n99,96.0\\n')"
    )
    record = gpu_check.run_step("train_bf16", {"bf16": hang_after(write_log)}, tmp_path, timeout_s=5)
    assert record["status"] == "failed" and record["reason"].endswith("partial results kept")
    bf16 = record["results"]["bf16"]
    assert bf16 == {"images_per_s": 96.0, "steps_per_s": 12.0, "global_step": 99, "partial": True}


def test_gpu_tests_stopped_at_their_limit_report_the_finished_tests(tmp_path):
    # With -s a test's own output comes between its name and its outcome (test_c prints a json).
    printed = (
        "print('tests/modeling/test_gpu.py::test_a PASSED [ 16%]'); print('tests/modeling/test_gpu.py::test_b FAILED');"
        "print('tests/modeling/test_gpu_determinism.py::test_c {'); print('  \"same\": true'); print('}');"
        "print('PASSED [ 50%]'); print('tests/modeling/test_gpu_determinism.py::test_d ')"
    )
    record = gpu_check.run_step("gpu_tests", hang_after(printed), tmp_path, timeout_s=5)
    assert record["status"] == "failed" and record["reason"].endswith("partial results kept")
    assert record["results"]["tests"] == {"test_a": "passed", "test_b": "failed", "test_c": "passed"}
    assert record["results"]["partial"] and record["results"]["passed"] == 2


def test_an_earlier_checks_profile_tables_are_not_taken_for_this_ones(tmp_path):
    # A rerun into the same folder: bench_eager stopped before its profile must not report the last run's tables.
    for name in ("bench_eager.json", "bench_eager_profile_ours.txt", "bench_eager_profile_torchvision.txt"):
        (tmp_path / name).write_text("{}" if name.endswith(".json") else "an earlier check's table")
    (tmp_path / "bench_fast_profile_ours.txt").write_text("another step's table")
    gpu_check.run_step("bench_eager", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path, timeout_s=30)
    assert sorted(p.name for p in tmp_path.glob("*_profile_*.txt")) == ["bench_fast_profile_ours.txt"]


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_crashing_step_is_reported_with_its_error_and_output(tmp_path):
    command = [sys.executable, "-c", "print('loading the model'); raise RuntimeError('CUDA error: out of memory')"]
    record = gpu_check.run_step("bench_eager", command, tmp_path, timeout_s=60)
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
    record = gpu_check.run_step("bench_eager", [sys.executable, "-c", hang], tmp_path, timeout_s=5)
    assert record["status"] == "failed" and record["reason"] == "timed out after 5 s (its time limit)"
    assert record["seconds"] < 30 and "waiting forever" in record["tail"]
    # The step's whole process group was killed: a worker it started holds no GPU memory afterwards.
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_what_only_a_gpu_runs_passes_the_config_checks(tmp_path):
    # The check's training runs and benchmark configurations, and the run.py commands of the GPU tests, composed and
    # checked here: a value the config checks refuse (model.head_norm=syncbn was one) must not cost a GPU session.
    # The check's overrides are read off the command lines it would run on the GPU.
    from mrcnn.engine.config_checks import config_problems
    from tests.helpers.config import compose_config
    from tests.modeling.test_gpu import SYNCBN_RUN
    from tests.modeling.test_gpu_determinism import DETERMINISTIC_RUN

    args = gpu_check.parse_args(["--out", str(tmp_path)])
    runs = {}
    for step in (*gpu_check.TRAIN_STEPS, "bench_eager", "bench_fast", "bench_compile"):
        for name, command in gpu_check.step_commands(step, gpu_check.GPU, args, tmp_path).items():
            if step in gpu_check.TRAIN_STEPS:  # python run.py <overrides> hydra.run.dir=...
                runs[f"{step} {name}"] = [a for a in command[2:] if not a.startswith("hydra.")]
                continue
            # python benchmark.py ... --variant NAME=OVERRIDES ... --overrides <ours' overrides>
            ours = command[command.index("--overrides") + 1 :]
            runs[step] = ours
            for flag, value in zip(command, command[1:]):
                if flag == "--variant":
                    variant, _, overrides = value.partition("=")
                    runs[f"{step} variant {variant}"] = [*ours, *overrides.split()]
    runs["test_ddp_with_syncbn_trains_on_one_gpu"] = SYNCBN_RUN
    runs["test_a_deterministic_gpu_run_of_run_py_repeats_its_losses_and_ap"] = DETERMINISTIC_RUN
    assert len(runs) == 4 + 3 + 2 + 2
    assert runs["train_bf16 bf16"][0] == "trainer=gpu" and "module.compile=true" in runs["bench_compile"]
    for name, overrides in runs.items():
        assert config_problems(compose_config(overrides)) == [], (name, overrides)


def test_a_process_that_outlives_sigkill_is_recorded_and_left(tmp_path, monkeypatch):
    # A CUDA process stuck in the driver may never end after SIGKILL: the step waits a bounded time, says so, goes on.
    # Pretended here by a kill that does nothing.
    pid_file = tmp_path / "step.pid"
    monkeypatch.setattr(gpu_check, "kill_group", lambda pgid: None)
    monkeypatch.setattr(gpu_check, "REAP_TIMEOUT_S", 1)
    command = hang_after(f"import os; open({str(pid_file)!r}, 'w').write(str(os.getpid()))")
    try:
        start = time.monotonic()
        record = gpu_check.run_step("bench_eager", command, tmp_path, timeout_s=5)
        assert time.monotonic() - start < 20
        assert record["status"] == "failed" and record["unreaped"] == ["bench_eager"]
        assert record["reason"] == (
            "timed out after 5 s (its time limit); bench_eager: still not ended 1 s after SIGKILL (stuck in the "
            "driver?), left"
        )
        assert "had not ended 1 s after SIGKILL" in (tmp_path / "logs" / "bench_eager.log").read_text()
    finally:
        if pid_file.exists():
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_the_steps_run_without_the_internet_and_pytest_without_log_capture(tmp_path):
    # albumentations asks PyPI for its latest version on import unless told not to; a lent GPU machine has no network.
    command = [
        sys.executable,
        "-c",
        "import os; print('update check off:', os.environ.get('NO_ALBUMENTATIONS_UPDATE'))",
    ]
    gpu_check.run_step("bench_eager", command, tmp_path, timeout_s=60)
    assert "update check off: 1" in (tmp_path / "logs" / "bench_eager.log").read_text()
    # A failing GPU test's report must end with its assertion, not with torch's DEBUG log records.
    args = gpu_check.parse_args(["--out", str(tmp_path)])
    for step in gpu_check.TEST_STEPS:
        command = gpu_check.step_command(step, gpu_check.GPU, args, tmp_path)
        assert "no:logging" in [b for a, b in zip(command, command[1:]) if a == "-p"]


def test_a_check_stopped_from_outside_reports_the_step_it_was_running_in_its_copy(tmp_path):
    # A lent machine's time limit (or the `timeout` around the check) ends it with SIGTERM: the report, rewritten and
    # copied into --copy-to, says which step was stopped, and the exit status is 128 + SIGTERM.
    out, copy = tmp_path / "check", tmp_path / "copy"
    command = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--copy-to", str(copy)]
    proc = subprocess.Popen(
        [*command, "--steps", "environment"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        while not any(line.startswith("[1/") for line in lines):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)
        # Into the environment step: its command has started once its log holds the command line (a fixed sleep
        # could end before the step started, or after it ended on a fast machine).
        step_log, deadline = out / "logs" / "environment.log", time.monotonic() + 60
        while not (step_log.is_file() and step_log.read_text().startswith("$ ")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    report = json.loads((copy / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["environment"]["status"] == "failed" and steps["environment"]["stopped"] == 128 + signal.SIGTERM
    assert steps["environment"]["reason"].startswith("stopped from outside after ")
    assert steps["train_bf16"]["reason"] == "not selected (--steps)"
    assert (copy / "gpu_check.md").read_text() == (out / "gpu_check.md").read_text()
    assert (copy / gpu_check.FILES_ARCHIVE).is_file() and not list(copy.glob("*.tmp"))


def test_a_failed_triton_nms_is_shown_beside_the_results_it_affects(tmp_path):
    from mrcnn.modeling import nms

    assert gpu_check.NMS_FALLBACK_WARNING == nms.FALLBACK_WARNING
    # A benchmark whose Triton kernel failed: its rows with batched proposals are marked, the others not.
    bench = {
        "complete": True,
        "args": {"steps": 5},
        "hardware": {},
        "nms_triton_failure": "RuntimeError: PassManager::run failed",
        "train": {
            "rounds": 1,
            "ratio": 0.9,
            "ours": {"images_per_s": 45.0, "peak_mem_mib": 9000, "median_s": 1},
            "torchvision": {"images_per_s": 50.0, "peak_mem_mib": 9000, "median_s": 0.9},
        },
    }
    path = gpu_check.step_output("bench_fast", tmp_path)
    write = [sys.executable, "-c", f"open({str(path)!r}, 'w').write({json.dumps(bench)!r})"]
    record = gpu_check.run_step("bench_fast", write, tmp_path, timeout_s=60)
    assert record["status"] == "passed" and record["results"]["nms_triton_failure"] == bench["nms_triton_failure"]
    lines = gpu_check.bench_lines({"bench_fast": record})
    assert any(line.startswith("| bench_fast **(NMS fallback)** | 45 ") for line in lines)
    # The variant keeps the fast path's batched proposals, so it ran the fallback too.
    assert any(line.startswith("| bench_fast, variant `frozen_bn_float32` (") and "fallback" in line for line in lines)
    assert any(
        line.startswith("**bench_fast: the Triton NMS kernel failed (RuntimeError: PassManager::run failed).**")
        for line in lines
    )
    # A training run: the warning grouped_nms gives, in its log (a GPU whose kernel fails, pretended on the CPU).
    run_dir = gpu_check.step_output("batched", tmp_path)
    warned = (
        "import pathlib, torch\n"
        "from mrcnn.modeling import nms\n"
        f"log = pathlib.Path({str(run_dir / 'csv')!r})\n"
        "log.mkdir(parents=True)\n"
        "(log / 'metrics.csv').write_text('step,train/images_per_sec\\n99,96.0\\n')\n"
        "nms._on_gpu = lambda boxes: True\n"
        "def fail(*args, **kwargs): raise RuntimeError('x')\n"
        "nms.grouped_nms_triton = fail\n"
        "nms.grouped_nms(torch.tensor([[[0.0, 0, 1, 1]]]), torch.ones(1, 1, dtype=torch.bool), [(0, 1)], 0.5)\n"
    )
    record = gpu_check.run_step("train_batched", {"batched": [sys.executable, "-c", warned]}, tmp_path, timeout_s=60)
    fallback = record["results"]["batched"]["nms_fallback"]
    assert fallback == f"{nms.FALLBACK_WARNING} (RuntimeError: x); using torchvision's nms per group"
    report = {
        "dry_run": False,
        "started": "now",
        "seconds": 1.0,
        "total_budget_s": 420,
        "command": "gpu_check.py",
        "args": vars(gpu_check.parse_args(["--out", str(tmp_path)])),
        "steps": [record],
        "goals": [],
    }
    summary = gpu_check.markdown(report)
    assert (
        "| batched (partial) **(NMS fallback)** | train_batched |" in summary
        and f"**batched (train_batched): {fallback}.**" in summary
    )


def test_the_host_sync_goal_counts_the_waits_a_gpu_reports_and_the_sync_ops_without_one():
    # On a GPU torch's sync debug mode sees the real waits (none is a count too); the profiler's aten count adds reads
    # of host tensors. The CPU dry run has only the aten count.
    gpu = {"aten_total_per_step": 3.0, "sync_debug": {"per_step": 2.0, "where": {}}}
    assert gpu_check.host_syncs_per_step(gpu) == 2.0
    assert gpu_check.host_syncs_per_step({**gpu, "sync_debug": {"per_step": 0.0, "where": {}}}) == 0.0
    assert gpu_check.host_syncs_per_step({"aten_total_per_step": 3.0, "sync_debug": {}}) == 3.0
    assert gpu_check.host_syncs_per_step({}) is None


def test_the_copy_folder_must_be_outside_the_check_folder(tmp_path, capsys):
    # It gets an archive of --out after every step, which would otherwise take in its own copies.
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(tmp_path), "--copy-to", str(tmp_path / "copy")])
    assert "--copy-to must be outside --out" in capsys.readouterr().err
    assert gpu_check.parse_args(["--out", str(tmp_path / "check"), "--copy-to", str(tmp_path / "copy")]).copy_to


def test_an_archive_that_fails_keeps_the_last_one_and_the_check_goes_on(tmp_path, monkeypatch, capsys):
    # A step's process that outlived its kill can change a file while it is archived: the copy must not end the check.
    out, copy = tmp_path / "check", tmp_path / "copy"
    (out / "logs").mkdir(parents=True)
    (out / "gpu_check.md").write_text("report\n")
    (out / "logs" / "step.log").write_text("first\n")
    gpu_check.copy_results(out, copy)
    first = (copy / gpu_check.FILES_ARCHIVE).read_bytes()

    def failing_open(*args, **kwargs):
        raise OSError("file changed as we read it")

    monkeypatch.setattr(gpu_check.tarfile, "open", failing_open)
    (out / "gpu_check.md").write_text("report, later\n")
    gpu_check.copy_results(out, copy)
    assert (copy / "gpu_check.md").read_text() == "report, later\n"  # the report is still copied
    assert (copy / gpu_check.FILES_ARCHIVE).read_bytes() == first and not list(copy.glob("*.tmp"))
    assert "could not archive" in capsys.readouterr().out
