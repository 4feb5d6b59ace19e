"""A job's DDP processes end with it: none is left waiting for a process that failed or was killed.

Lightning's ``ddp`` strategy starts a job's other processes (its children) from the job's main process. When a
child fails, Lightning's own observer kills the main process and the other children. Nothing does the reverse:

- **The main process fails** (a broken image in its shard, a non-finite loss it found, an error in its final
  evaluation) and raises. Its children are then waiting for it in a collective. Over gloo they fail once its
  sockets close, with "Connection closed by peer"; over NCCL they wait until the process group's timeout (30 min
  under Lightning), holding their GPUs. In a Hydra sweep the main process goes on to the next job meanwhile, whose
  processes then find those GPUs full. :func:`stop_after_failure` (called by ``launch.job_scope``) gives them a
  moment to end on their own (when they met the same error), then kills them.
- **The job succeeds**: its children are ending too. They are taken out of Lightning's observer, which would
  SIGKILL the main process (in a sweep, the next job with it) for a child's non-zero exit after the job's end. In a
  sweep :func:`end_after_success` waits for them: the next job then finds their devices free.
- **The main process is killed** (the kernel's out-of-memory killer, ``kill -9``): no code of it runs.
  :func:`exit_with_parent`, in each child, asks Linux to kill the child when its parent dies.

Processes a cluster starts (SLURM's tasks, torchrun's workers) are not children of the main process; their
launcher ends them (torchrun does; ``srun`` does with ``--kill-on-bad-exit=1``).

This module imports neither torch nor Lightning: ``run.py`` uses it before Hydra composes.
"""

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)

# Set by the job's main process for the children Lightning starts from it: its process id.
MAIN_PID_ENV = "MRCNN_DDP_MAIN_PID"
# Seconds a job's children get to end on their own, after it failed or stopped in the main process (enough for a
# process that met the same error to unwind and exit: a second or two) or succeeded, before they are killed; far
# below any collective's timeout.
STOP_GRACE_S = 10.0

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# The process launchers of the current job's Trainers (Lightning's ``_SubprocessScriptLauncher``, whose ``procs``
# lists the children it started): their ``procs`` is replaced at each launch, so the launcher is what is kept.
_launchers: list = []
# (local rank, process) of children taken out of their launcher's list by release_from_observer, still this job's.
_released: list = []


def track(trainer) -> None:
    """Lets :func:`stop_after_failure` and :func:`end_after_success` find the processes ``trainer`` starts (none
    without a process launcher)."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is not None and hasattr(launcher, "procs") and launcher not in _launchers:
        _launchers.append(launcher)


def forget() -> None:
    """Forgets the tracked launchers and processes (at a job's start and end: a sweep's next job has its own)."""
    _launchers.clear()
    _released.clear()


def tracked_processes() -> list[tuple[int, object]]:
    """``(local rank, subprocess.Popen)`` of each process the tracked Trainers started (local ranks from 1)."""
    return _released + _launched()


def _launched() -> list[tuple[int, object]]:
    # Commands (subprocess.Popen) only: a spawning strategy's multiprocessing processes (refused by the config
    # checks, reachable from Python) have no poll(), and their launcher joins them itself.
    return [
        (local_rank, proc)
        for launcher in _launchers
        for local_rank, proc in enumerate(getattr(launcher, "procs", None) or [], start=1)
        if hasattr(proc, "poll")
    ]


def release_from_observer() -> None:
    """Takes the tracked processes out of the list Lightning's observer watches; they stay tracked here.

    Called when every process of the job stops at the same step on purpose (``mrcnn.engine.callbacks.
    LastCheckpoint`` on a stop signal), each then exiting with 128 + the signal, and when the job has ended (failed:
    :func:`stop_after_failure`; succeeded: ``launch.job_scope``). Lightning's observer thread would take a child's
    non-zero exit for a failure and SIGKILL this process (every 5 s it looks) while it still finishes: its loggers,
    its W&B run, a SLURM requeue, in a sweep the next job. :func:`stop_after_failure` and :func:`end_after_success`
    still wait for them and kill any that does not end. A no-op in a process that started none (a child, one
    process); a second call finds nothing left to move.
    """
    launched = _launched()
    _released.extend(launched)
    for launcher in _launchers:
        if getattr(launcher, "procs", None):
            launcher.procs.clear()


def stop_after_failure(grace: float = STOP_GRACE_S, poll: float = 0.1, stopped: bool = False) -> list[int]:
    """After the job failed in this process: waits up to ``grace`` seconds for its other processes to exit on their
    own, then kills (SIGKILL) those still running, with a warning naming each. A process that had failed already
    is named too: its error may be the cause of this one's.

    ``stopped``: the job was stopped on purpose (Ctrl-C, SIGTERM: every process stops at the same step), not by
    an error; the other processes' own exit codes then say so (130, 143, or SIGKILL from Lightning's second-Ctrl-C
    path), and none is named as a cause.

    Returns:
        The process ids killed (SIGKILL: :func:`_wait_then_kill`).
    """
    processes = tracked_processes()
    for local_rank, proc in processes:
        if proc.poll() and not stopped:
            # Over gloo this process's own error then only says that a peer closed its connection.
            log.warning(
                "the DDP process of local rank %d (pid %d) had failed already (exit code %d): its error, printed "
                "above, is likely what stopped this process",
                local_rank,
                proc.pid,
                proc.returncode,
            )
    # Lightning's observer thread would kill this process (SIGKILL) once a child has exited non-zero, which each of
    # these will, or was killed: this process ends as its error says (finishing its W&B run) instead.
    release_from_observer()
    why = "was stopped" if stopped else "failed"
    return _wait_then_kill(
        processes,
        grace,
        poll,
        f"{why} it was still running, probably waiting for this one (which would last until the process group's "
        "timeout, 30 minutes by default, holding its device)",
    )


def end_after_success(grace: float = STOP_GRACE_S, poll: float = 0.1) -> list[int]:
    """At the end of a job that succeeded in this process: its other processes are ending too. Takes them out of
    Lightning's observer, waits up to ``grace`` seconds for them to exit, then kills (SIGKILL) those still running,
    with a warning. One that exited non-zero is named in a warning.

    Called in a sweep (``launch.job_scope``), so that the next job finds the devices free, and a late non-zero exit of
    this job's process (an abort as it exits) is a warning, not Lightning's observer SIGKILLing this process with the
    next job in it.

    Returns:
        The process ids killed.
    """
    processes = tracked_processes()
    release_from_observer()
    killed = _wait_then_kill(processes, grace, poll, "finished its job it was still running, holding its device")
    for local_rank, proc in processes:
        if proc.pid not in killed and proc.returncode:
            log.warning(
                "the DDP process of local rank %d (pid %d) exited with code %d (found at the end of a job that "
                "succeeded here): see ddp_rank%d.log in the job's folder",
                local_rank,
                proc.pid,
                proc.returncode,
                local_rank,
            )
    return killed


def _wait_then_kill(processes: list[tuple[int, object]], grace: float, poll: float, why: str) -> list[int]:
    """Waits up to ``grace`` seconds for ``processes`` (``(local rank, subprocess.Popen)``) to exit, then kills
    (SIGKILL) those still running, each with a warning: "``grace`` s after this process ``why``".

    SIGKILL, not SIGTERM: a process waiting in a collective is inside C++ code, where a Python signal handler
    never runs.

    Returns:
        The process ids killed.
    """
    deadline = time.monotonic() + grace
    while any(proc.poll() is None for _, proc in processes) and time.monotonic() < deadline:
        time.sleep(poll)
    killed = []
    for local_rank, proc in processes:
        if proc.poll() is None:
            proc.kill()
            killed.append(proc.pid)
            log.warning(
                "stopped the DDP process of local rank %d (pid %d): %.0f s after this process %s",
                local_rank,
                proc.pid,
                grace,
                why,
            )
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:  # in uninterruptible sleep (a hung driver, a stalled file system)
                log.warning(
                    "the DDP process %d is still there %.0f s after SIGKILL; not waiting for it", proc.pid, grace
                )
    return killed


def exit_with_parent() -> None:
    """In a child of the job's main process: Linux kills this process (SIGKILL) when its parent dies.

    If the parent has died already (before this call), exits at once. Does nothing where ``prctl`` is not
    available (not Linux), or outside a child of a main process that set ``MRCNN_DDP_MAIN_PID``.
    """
    main_pid = os.environ.get(MAIN_PID_ENV)
    if main_pid is None or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        log.debug("prctl(PR_SET_PDEATHSIG) is not available; this process does not end with its parent")
        return
    if os.getppid() != int(main_pid):
        # The parent died before the request was made: no signal will come.
        sys.exit(f"the job's main process (pid {main_pid}) ended before this DDP process started; stopping")
