"""Flags agreed between a job's processes on the host: the value, and a clean exit right after."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each of 2 processes offers 10 + its rank and exits at once with the largest: 11 for both.
AGREE_AND_EXIT = """
import sys
import torch.distributed as dist
sys.path.insert(0, {root!r})
from mrcnn.engine.host_collectives import host_max, host_process_group

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
sys.exit(host_max(10 + rank, host_process_group(2)))
"""


# 20 processes (20 s). The default suite agrees and exits once per run in the DDP stop tests (tests/e2e/test_resume.py).
@pytest.mark.slow
def test_processes_agree_on_the_largest_value_and_exit_with_their_status_right_after(tmp_path):
    # The stop of a DDP job: every process exits right after agreeing. A plain all_reduce there let gloo's worker
    # thread free the flag as Python finalized, and a process aborted (SIGABRT, -6) in about 1 exit of 3.
    script = tmp_path / "agree.py"
    script.write_text(AGREE_AND_EXIT.format(root=str(ROOT)))
    for attempt in range(10):
        store = tmp_path / f"store{attempt}"
        processes = [
            subprocess.Popen([sys.executable, str(script), str(rank), str(store)], stderr=subprocess.PIPE, text=True)
            for rank in range(2)
        ]
        results = [(process.wait(timeout=120), process.stderr.read()) for process in processes]
        assert [code for code, _ in results] == [11, 11], (attempt, results)


def test_a_single_process_has_no_host_group():
    from mrcnn.engine.host_collectives import host_process_group

    assert host_process_group(1) is None
