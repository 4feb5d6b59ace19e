"""A DDP run's processes meeting each other: a Ctrl-C that ends their wait, and where the nodes of a run meet."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import lightning as L

from mrcnn.engine.launch import is_ddp_child

log = logging.getLogger(__name__)


@contextlib.contextmanager
def processes_meet(trainer: L.Trainer):
    """Around ``trainer.fit`` / ``validate`` / ``predict`` of a run of several processes: until they have all
    joined the process group, Ctrl-C ends the process.

    Until then every process waits inside torch's C++ code (``init_process_group``: the TCP store, gloo's or NCCL's
    connections), which does not return to Python while a process is missing: a node that never starts, a process
    that hangs before it joins. Python's SIGINT handler only sets a flag that nothing reads there, so Ctrl-C did
    nothing, up to the process group's timeout (30 minutes). So SIGINT takes its default action (the process ends,
    as a shell's 130) from here until the strategy's ``setup_environment`` (where Lightning's launcher has started
    the node's other processes and the group is made) returns; nothing has trained or been written by then.
    From there Ctrl-C stops the run as it does in one process. Lightning's other processes run the same code (and
    end with their parent), and a Ctrl-C at a terminal reaches them all. One process: nothing changes.

    Logs, on each node's first process of a run of several nodes, where its processes meet the others.
    """
    if trainer.world_size <= 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    strategy = trainer.strategy
    handler = signal.signal(signal.SIGINT, signal.SIG_DFL)
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored:
            signal.signal(signal.SIGINT, handler)
            restored = True

    setup_environment = strategy.setup_environment

    def setup_environment_then_restore(*args, **kwargs):
        setup_environment(*args, **kwargs)
        restore()

    # On this strategy object only (an attribute over its class's method), for this call of fit / validate / predict.
    strategy.setup_environment = setup_environment_then_restore
    environment = getattr(strategy, "cluster_environment", None)
    if trainer.num_nodes > 1 and environment is not None and not is_ddp_child():
        log.info(
            "node %d of %d: its processes meet the others at %s:%s before they start; a node that never starts "
            "keeps them waiting (up to the process group's timeout, 30 minutes): Ctrl-C (or kill %d) ends the wait",
            environment.node_rank(),
            trainer.num_nodes,
            environment.main_address,
            environment.main_port,
            os.getpid(),
        )
    try:
        yield
    finally:
        restore()
        del strategy.setup_environment  # the class's method again
