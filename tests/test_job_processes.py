"""A job's DDP processes end with it: stopped after the main process fails, killed when it dies."""

import logging
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from mrcnn.engine import job_processes
from mrcnn.engine.launch import is_stop
from tests.helpers.runs import ROOT

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")


@pytest.fixture
def launcher():
    """A stand-in for Lightning's process launcher, tracked as a Trainer's; its processes are killed afterwards."""
    launcher = SimpleNamespace(procs=[])
    job_processes.forget()
    job_processes.track(SimpleNamespace(strategy=SimpleNamespace(launcher=launcher)))
    started = []
    yield launcher, started
    job_processes.forget()
    for proc in started:
        proc.kill()
        proc.wait()


def _ends_in_half_a_second() -> subprocess.Popen:
    """A process that ends 0.5 s after it has started (Python's start-up, longer on a loaded machine, not counted)."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(0.5)"], stdout=subprocess.PIPE
    )
    assert process.stdout.readline() == b"started\n"
    return process


def test_after_a_failure_processes_that_end_on_their_own_are_left_and_the_rest_killed(launcher, caplog):
    launcher, started = launcher
    waiting = subprocess.Popen(SLEEP)  # waits for the failed process, as in a collective
    ending = _ends_in_half_a_second()  # met the same error
    started += [waiting, ending]
    launcher.procs += [waiting, ending]
    observed = launcher.procs  # the list Lightning's observer thread watches

    begin = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=job_processes.__name__):
        killed = job_processes.stop_after_failure(grace=3.0)

    assert killed == [waiting.pid]
    assert waiting.returncode == -signal.SIGKILL and ending.returncode == 0
    assert 3.0 <= time.monotonic() - begin < 10
    assert f"local rank 1 (pid {waiting.pid})" in caplog.text and f"pid {ending.pid}" not in caplog.text
    # Emptied: Lightning's observer would kill this process on seeing a child's non-zero exit.
    assert observed == []


def test_after_a_failure_nothing_waits_when_every_process_has_ended(launcher, caplog):
    launcher, started = launcher
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started += [done, failed]
    launcher.procs += [done, failed]
    done.wait()
    failed.wait()
    begin = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=job_processes.__name__):
        assert job_processes.stop_after_failure(grace=30.0) == []
    assert time.monotonic() - begin < 1
    # The process that failed first is named: over gloo this one's own error only says a peer closed its connection.
    assert f"local rank 2 (pid {failed.pid}) had failed already (exit code 3)" in caplog.text
    assert f"pid {done.pid}" not in caplog.text


def test_after_a_success_the_processes_finish_a_late_failure_is_named_and_one_still_running_is_killed(launcher, caplog):
    launcher, started = launcher
    finishing = _ends_in_half_a_second()  # its last log lines
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])  # an error as it ends
    hung = subprocess.Popen(SLEEP)  # stuck as it ends (a process group that never tears down)
    started += [finishing, failing, hung]
    launcher.procs += [finishing, failing, hung]
    observed = launcher.procs

    begin = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=job_processes.__name__):
        killed = job_processes.end_after_success(grace=3.0)

    assert killed == [hung.pid] and hung.returncode == -signal.SIGKILL
    assert finishing.returncode == 0  # waited for, not killed
    assert 3.0 <= time.monotonic() - begin < 10
    exited = f"local rank 2 (pid {failing.pid}) exited with code 3 (found at the end of a job that succeeded here)"
    assert exited in caplog.text and "see ddp_rank2.log in the job's folder" in caplog.text
    assert f"local rank 3 (pid {hung.pid}): 3 s after this process finished its job it was still running" in (
        caplog.text
    )
    assert f"pid {finishing.pid}" not in caplog.text
    # Emptied at once: Lightning's observer would SIGKILL this process, in a sweep with the next job in it, on
    # seeing the exit code 3.
    assert observed == []


def test_after_a_success_nothing_waits_when_every_process_has_ended(launcher, caplog):
    launcher, started = launcher
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    started.append(done)
    launcher.procs.append(done)
    done.wait()
    begin = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=job_processes.__name__):
        assert job_processes.end_after_success(grace=30.0) == []
    assert time.monotonic() - begin < 1 and caplog.text == ""


def test_nothing_is_stopped_without_a_process_launcher():
    job_processes.forget()
    job_processes.track(SimpleNamespace(strategy=SimpleNamespace(launcher=None)))  # one process, no launcher
    assert job_processes.tracked_processes() == []
    assert job_processes.stop_after_failure(grace=30.0) == []


# A job's main process: starts a child as Lightning does (MRCNN_DDP_MAIN_PID set), prints its pid once the child
# has asked to end with it, then dies without running any code of its own (SIGKILL, as the out-of-memory killer).
MAIN = """
import os, signal, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1]], env=dict(os.environ, MRCNN_DDP_MAIN_PID=str(os.getpid())),
    stdout=subprocess.PIPE, text=True,
)
assert child.stdout.readline() == "ready\\n"
print(child.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
CHILD = """
import time
from mrcnn.engine.job_processes import exit_with_parent
exit_with_parent()
print("ready", flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not reaped by whoever adopted it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@linux_only
def test_a_child_dies_with_the_main_process_even_when_it_is_killed():
    main = subprocess.run(
        [sys.executable, "-c", MAIN, CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert main.returncode == -signal.SIGKILL, main.stderr
    child = int(main.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its main process")


@linux_only
def test_a_child_whose_main_process_ended_before_it_started_stops():
    # Its parent (this test's process) is not the main process it was started for: that one has ended.
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        env=dict(os.environ, MRCNN_DDP_MAIN_PID=str(os.getpid() + 1_000_000)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 1 and "ready" not in child.stdout
    assert "ended before this DDP process started" in child.stderr


def test_after_a_stop_no_process_is_named_as_its_cause(launcher, caplog):
    # Ctrl-C or SIGTERM: every process stops at the same step, exiting 128 + the signal.
    launcher, started = launcher
    stopped = subprocess.Popen([sys.executable, "-c", "raise SystemExit(130)"])
    waiting = subprocess.Popen(SLEEP)
    started += [stopped, waiting]
    launcher.procs += [stopped, waiting]
    stopped.wait()
    with caplog.at_level(logging.WARNING, logger=job_processes.__name__):
        assert job_processes.stop_after_failure(grace=0.5, stopped=True) == [waiting.pid]
    assert "had failed already" not in caplog.text
    assert f"local rank 2 (pid {waiting.pid}): 0 s after this process was stopped" in caplog.text


def test_processes_released_from_lightnings_observer_are_still_stopped_with_the_job(launcher):
    # A stop on purpose releases the children from Lightning's observer (it would kill this process on their exit
    # with 128 + the signal); the job still waits for them and kills one that does not end.
    launcher, started = launcher
    stopped = subprocess.Popen([sys.executable, "-c", "raise SystemExit(140)"])
    waiting = subprocess.Popen(SLEEP)
    started += [stopped, waiting]
    launcher.procs += [stopped, waiting]
    observed = launcher.procs
    job_processes.release_from_observer()
    assert observed == [] and job_processes.tracked_processes() == [(1, stopped), (2, waiting)]
    job_processes.release_from_observer()  # twice: nothing listed twice
    assert job_processes.tracked_processes() == [(1, stopped), (2, waiting)]
    assert job_processes.stop_after_failure(grace=0.5, stopped=True) == [waiting.pid]
    job_processes.forget()
    assert job_processes.tracked_processes() == []


def test_what_counts_as_a_stop_on_purpose():
    def raised_while_handling(error, context):
        try:
            try:
                raise context
            except BaseException:
                raise error  # noqa: B904  (as sys.exit inside an except block does)
        except BaseException as caught:
            return caught

    assert is_stop(KeyboardInterrupt())
    assert is_stop(SystemExit(130)) and is_stop(SystemExit(143))  # TrainingInterrupted, SIGTERM outside training
    assert is_stop(raised_while_handling(SystemExit(1), KeyboardInterrupt()))  # Lightning, after a second Ctrl-C
    assert not is_stop(SystemExit(1)) and not is_stop(SystemExit("error")) and not is_stop(ValueError())
    assert not is_stop(raised_while_handling(SystemExit(1), ValueError()))
