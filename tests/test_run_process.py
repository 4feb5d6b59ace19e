"""The tests' runner of subprocesses says where a process that hangs was, and leaves none of them behind."""

import sys
import time
from pathlib import Path

import pytest

from tests.helpers.runs import run_process

# A process whose child (as a DDP process starts its peers) waits forever, each in a function of its own name.
HANGS = """
import subprocess, sys, time
def child_waits_here():
    time.sleep(600)
def parent_waits_here(child):
    child.wait()
if len(sys.argv) > 1:
    print("child", __import__("os").getpid(), flush=True)
    child_waits_here()
parent_waits_here(subprocess.Popen([sys.executable, __file__, "child"]))
"""


def test_a_hanging_process_and_its_children_say_where_they_were_and_end(tmp_path):
    script = tmp_path / "hangs.py"
    script.write_text(HANGS)
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed:
        run_process([sys.executable, str(script)], timeout=8)
    assert time.monotonic() - start < 30
    message = str(failed.value)
    assert "did not end within 8 s" in message
    assert "parent_waits_here" in message and "child_waits_here" in message  # each process's Python stack
    child = int(message.split("child ", 1)[1].split()[0])
    deadline = time.monotonic() + 10  # the kernel may take a moment to end it
    while not _ended(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ended(child)


def _ended(pid: int) -> bool:
    """Whether process ``pid`` is gone or a zombie (an orphan's that the container's first process never reaps)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_process_that_ends_is_run_as_subprocess_runs_it(tmp_path):
    result = run_process([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
