"""A DDP run's processes meeting each other: a Ctrl-C that ends their wait, and where the nodes of a run meet."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import lightning as L
from lightning.pytorch.callbacks import Callback

from mrcnn.engine.launch import is_ddp_child

log = logging.getLogger(__name__)


class _GroupIsUp(Callback):
    """Gives SIGINT back its handler at the first hook after the process group is up (``setup``)."""

    def __init__(self, handler) -> None:
        self.handler = handler

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.restore()

    def restore(self) -> None:
        if self.handler is not None:
            signal.signal(signal.SIGINT, self.handler)
            self.handler = None


@contextlib.contextmanager
def processes_meet(trainer: L.Trainer):
    """Around ``trainer.fit`` / ``validate`` / ``predict`` of a run of several processes: until they have all
    joined the process group, Ctrl-C ends the process.

    Until then every process waits inside torch's C++ code (``init_process_group``: the TCP store, gloo's or NCCL's
    connections), which does not return to Python while a process is missing: a node that never starts, a process
    that hangs before it joins. Python's SIGINT handler only sets a flag that nothing reads there, so Ctrl-C did
    nothing, up to the process group's timeout (30 minutes). So SIGINT takes its default action (the process ends,
    as a shell's 130) from here to the callbacks' ``setup`` hook, which Lightning calls once the group is up and
    its processes have met at a barrier (after the datamodule's ``setup``); nothing has trained or been written by
    then. Lightning's other processes run the same code (and end with their parent), and a
    Ctrl-C at a terminal reaches them all. One process: nothing changes.

    Logs, on each node's first process of a run of several nodes, where its processes meet the others.
    """
    if trainer.world_size <= 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    met = _GroupIsUp(signal.signal(signal.SIGINT, signal.SIG_DFL))
    trainer.callbacks.append(met)
    environment = getattr(trainer.strategy, "cluster_environment", None)
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
        met.restore()
        trainer.callbacks.remove(met)
