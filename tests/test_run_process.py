"""The tests' runner of subprocesses says where a process that hangs was, and leaves none of them behind."""

import sys
import time

import pytest

from tests.helpers.runs import alive, compact_stacks, run_process

# A process whose child (as a DDP process starts its peers) waits forever, each in a function of its own name.
HANGS = """
import subprocess, sys, time
def child_waits_here(depth=40):
    if depth:
        return child_waits_here(depth - 1)
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
    # Each process's stack, innermost frames first, a line each, the dumps one after the other: the child's, then
    # its parent's, the command's own process, last, where the end of a long log has it; no list of extension modules.
    stacks = message.split("innermost frames first):\n", 1)[1]
    assert stacks.count("Fatal Python error: Aborted") == 2
    # Each dump named by its process's command line.
    child_stack, parent = stacks.split("-- pid ")[1:]
    assert parent.split(": Fatal")[0].endswith(f"{sys.executable} {script}")
    assert child_stack.split(": Fatal")[0].endswith(f"{sys.executable} {script} child")
    assert "parent_waits_here" in parent and "child_waits_here" not in parent
    assert child_stack.splitlines()[2:4] == ["    hangs.py:6 child_waits_here", "    hangs.py:5 child_waits_here"]
    assert "Extension modules" not in message
    child = int(message.split("child ", 1)[1].split()[0])
    deadline = time.monotonic() + 10  # the kernel may take a moment to end it
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_a_process_that_ends_is_run_as_subprocess_runs_it(tmp_path):
    result = run_process([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_compact_stacks_keep_each_threads_innermost_frames():
    dump = "\n".join(
        [
            "Fatal Python error: Aborted",
            "",
            "Thread 0x00007f01 (most recent call first):",
            '  File "/venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py", line 1295 in _get_data',
            *[f'  File "/repo/tests/fit.py", line {n} in level{n}' for n in range(20)],
            "",
            "Current thread 0x00007f02 (most recent call first):",
            '  File "/repo/fit.py", line 23 in <module>',
            "",
            "Extension modules: numpy._core._multiarray_umath, torch._C (total: 2)",
        ]
    )
    assert compact_stacks(dump, frames=3).splitlines() == [
        "-- a process: Fatal Python error: Aborted",
        " Thread 0x00007f01:",
        "    torch/utils/data/dataloader.py:1295 _get_data",
        "    fit.py:0 level0",
        "    fit.py:1 level1",
        "    ...",
        " Current thread 0x00007f02:",
        "    fit.py:23 <module>",
    ]
