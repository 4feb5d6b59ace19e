"""Imported by the fork server that starts a DDP process's loader workers: the server ignores the job's stop signals.

:func:`mrcnn.data.datamodule.worker_context` has the fork server import this module first among its own. SLURM sends
SIGTERM (preemption, requeue) and SIGUSR2 (before a time limit, under the SLURM launcher) to every process of a job,
and a terminal's Ctrl-C reaches its whole process group (the server ignores SIGINT itself). A fork server ended by
one takes its workers with it (each quits once its parent is gone) while the DDP process finishes its step or
validation and saves ``last.ckpt`` (:class:`mrcnn.engine.callbacks.LastCheckpoint`): that process then fails at its
next batch ("DataLoader worker ... exited unexpectedly") instead of stopping cleanly. The workers inherit the setting
(:func:`mrcnn.data.datamodule.init_worker` sets it again). The server still ends with the process that started it.

Imported anywhere else, it does nothing.
"""

import multiprocessing.forkserver
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def _in_fork_server() -> bool:
    """Whether this import runs inside ``multiprocessing.forkserver.main`` (the fork server's preloading)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is multiprocessing.forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


if _in_fork_server():
    for _signum in STOP_SIGNALS:
        signal.signal(_signum, signal.SIG_IGN)
