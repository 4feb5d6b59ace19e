"""A sweep job's DDP processes run that job alone, and a job leaves nothing of its launch to the next
(mrcnn/engine/launch.py; the whole path, ``run.py -m`` under DDP, is the slow tests/e2e/test_ddp.py sweep)."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from mrcnn.engine import job_processes, launch
from tests.helpers.config import TINY_MODEL, compose_config


def test_a_ddp_child_of_a_sweep_job_runs_that_jobs_resolved_config_in_its_folder(monkeypatch, tmp_path):
    # Lightning starts a job's other processes with the main process's command line: under -m, the whole sweep.
    job_dir = tmp_path / "multirun" / "base_lr=0.01,seed=1"
    monkeypatch.setattr(job_processes, "exit_with_parent", lambda: None)
    monkeypatch.setattr(sys, "argv", ["run.py", "-m", "base_lr=0.01,0.02", "seed=1"])
    monkeypatch.setenv(launch.DDP_JOB_DIR_ENV, str(job_dir))
    monkeypatch.setenv("LOCAL_RANK", "1")
    launch.pin_ddp_child_to_its_job()
    assert sys.argv == [
        "run.py",
        f"--config-path={job_dir / '.hydra'}",
        f"--config-name={launch.RESOLVED_CONFIG}",
        f'hydra.run.dir="{job_dir}"',  # quoted: the folder's name holds "=" and ","
        "hydra.output_subdir=null",
        "hydra.job.name=ddp_rank1",
        "++hydra.job_logging.handlers.console.level=ERROR",
    ]


@pytest.mark.parametrize("env", [{}, {"LOCAL_RANK": "1"}, {launch.DDP_JOB_DIR_ENV: "/tmp/job"}])
def test_the_main_process_and_processes_started_by_others_keep_their_command_line(monkeypatch, env):
    # Without both variables: a job's main process, or one that srun or torchrun started (no job folder named).
    for key in ("LOCAL_RANK", launch.DDP_JOB_DIR_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["run.py", "-m", "seed=0,1"])
    launch.pin_ddp_child_to_its_job()
    assert sys.argv == ["run.py", "-m", "seed=0,1"]


def test_a_job_restores_the_variables_lightnings_launcher_set_for_the_next_job(monkeypatch):
    # With LOCAL_RANK left over, the next job of a sweep would take its processes for externally started ones and
    # wait for peers that never come.
    for key in launch._LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    cfg = compose_config(TINY_MODEL)
    with launch.job_scope(cfg):
        os.environ.update(LOCAL_RANK="0", WORLD_SIZE="2", NODE_RANK="0", MASTER_PORT="41234")
    assert all(key not in os.environ for key in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"))
    assert os.environ["MASTER_PORT"] == "29500"
    # And after a job that failed.
    with pytest.raises(RuntimeError), launch.job_scope(cfg):
        os.environ["LOCAL_RANK"] = "0"
        raise RuntimeError("the job failed")
    assert "LOCAL_RANK" not in os.environ


@pytest.mark.parametrize("sweep", [True, False], ids=["sweep-job", "single-run"])
def test_a_job_that_succeeded_takes_its_processes_out_of_lightnings_observer_and_a_sweep_waits_for_them(
    monkeypatch, sweep
):
    # Lightning's observer would SIGKILL this process (in a sweep, with the next job in it) for this job's process
    # exiting non-zero after the job's end (here 3, once its input is closed). A sweep's next job would start beside
    # it. A single run does not wait: its processes end with it.
    monkeypatch.setattr(launch, "in_sweep", lambda: sweep)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read(); raise SystemExit(3)"], stdin=subprocess.PIPE
    )
    launcher = SimpleNamespace(procs=[child])
    observed = launcher.procs  # the list Lightning's observer thread watches
    try:
        with launch.job_scope(compose_config(TINY_MODEL)):
            job_processes.track(SimpleNamespace(strategy=SimpleNamespace(launcher=launcher)))  # as build.py does
            child.stdin.close()  # it ends as the job ends, however long the job took
        assert observed == []
        assert child.poll() == (3 if sweep else None)
    finally:
        child.kill()
        child.wait()


def test_the_jobs_main_process_is_no_ddp_child_once_lightning_has_started_the_others(monkeypatch):
    # Lightning's launcher sets LOCAL_RANK in the main process's own environment too: the main process was taken for
    # a child (its stop message pointed at its own log, not at the command that continues the run).
    monkeypatch.setenv(launch.DDP_JOB_DIR_ENV, "/tmp/job")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv(job_processes.MAIN_PID_ENV, str(os.getpid()))
    assert not launch.is_ddp_child()
    monkeypatch.setenv(job_processes.MAIN_PID_ENV, str(os.getpid() + 1))  # started by another process: a child
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch.is_ddp_child()
    monkeypatch.delenv("LOCAL_RANK")  # the main process before Lightning's launch
    assert not launch.is_ddp_child()


def test_a_port_in_use_is_said_with_the_way_out(monkeypatch):
    # torch's own error, as a DDP job's main process raises it when MASTER_PORT is taken (measured in a trial).
    from torch.distributed import DistNetworkError

    error = DistNetworkError(
        "The server socket has failed to listen on any local network address. port: 29517, useIpv6: false, code: -98,"
        " name: EADDRINUSE, message: address already in use"
    )
    monkeypatch.setenv("MASTER_PORT", "29517")
    assert launch.port_in_use_message(error) == (
        "DistNetworkError: port 29517 (MASTER_PORT) is in use on this machine, by another run or program, so the DDP "
        "processes cannot meet there: set MASTER_PORT to a free port, or unset it (Lightning then picks a free one)"
    )
    assert launch.port_in_use_message(DistNetworkError("connection timed out")) is None
    assert launch.port_in_use_message(RuntimeError("EADDRINUSE")) is None


def test_ctrl_c_ends_the_wait_of_a_runs_processes_for_each_other_until_the_group_is_up(caplog):
    # A node that never starts (or a process that hangs before it joins) keeps the others in torch's C++ wait, where
    # Python's SIGINT handler does not run (a helper's trial: 11 minutes and three SIGINTs later, still waiting).
    # tests/e2e/test_multinode.py sends the Ctrl-C.
    import logging
    import signal

    from mrcnn.engine.process_meeting import processes_meet

    class Strategy:
        cluster_environment = SimpleNamespace(node_rank=lambda: 0, main_address="10.0.0.1", main_port=29500)

        def setup_environment(self):  # Lightning's: starts the group (init_process_group), where the wait is
            self.handler_during_setup = signal.getsignal(signal.SIGINT)

    nodes = SimpleNamespace(num_nodes=2, world_size=2, strategy=Strategy())
    devices = SimpleNamespace(num_nodes=1, world_size=2, strategy=Strategy())  # one node, 2 processes
    handler = signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.INFO, logger="mrcnn.engine.process_meeting"):
        for trainer in (nodes, devices):
            with processes_meet(trainer):
                assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
                trainer.strategy.setup_environment()
                assert trainer.strategy.handler_during_setup is signal.SIG_DFL
                assert signal.getsignal(signal.SIGINT) is handler  # the group is up: Ctrl-C stops the run as it did
            assert "setup_environment" not in vars(trainer.strategy) and signal.getsignal(signal.SIGINT) is handler
        with pytest.raises(ValueError, match="no process group"):  # a failed start gives the handler back too
            with processes_meet(nodes):
                assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
                raise ValueError("no process group")
        assert "setup_environment" not in vars(nodes.strategy) and signal.getsignal(signal.SIGINT) is handler
        one = SimpleNamespace(num_nodes=1, world_size=1, strategy=Strategy())
        with processes_meet(one):  # one process: nothing
            assert signal.getsignal(signal.SIGINT) is handler and "setup_environment" not in vars(one.strategy)
    # Where the nodes meet: logged by a run of several nodes only.
    assert caplog.messages == 2 * [
        "node 0 of 2: its processes meet the others at 10.0.0.1:29500 before they start; a node that never starts "
        "keeps them waiting (up to the process group's timeout, 30 minutes): Ctrl-C (or kill "
        f"{os.getpid()}) ends the wait"
    ]
