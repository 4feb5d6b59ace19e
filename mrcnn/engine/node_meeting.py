"""Where the processes of a run of several nodes meet, and a Ctrl-C that ends their wait for each other."""

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


class _NodesMet(Callback):
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
def nodes_meet(trainer: L.Trainer):
    """Around ``trainer.fit`` / ``validate`` / ``predict`` of a run of several nodes: until every node has joined,
    Ctrl-C ends the process.

    Until then every process waits inside torch's C++ code (``init_process_group``: the TCP store, gloo's or NCCL's
    connections), which never returns to Python while a node is missing; Python's SIGINT handler only sets a flag
    that nothing reads there, so Ctrl-C did nothing, up to the process group's timeout (30 minutes). So SIGINT takes
    its default action (the process ends, as a shell's 130) from here to Lightning's ``setup`` hook, which runs
    once the group is up; nothing has trained or been written by then. Lightning's children of this node run the
    same code, and a Ctrl-C at a terminal reaches them all. One node: nothing changes.

    Logs, on the node's first process, where its processes meet the others.
    """
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.num_nodes <= 1 or environment is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    met = _NodesMet(signal.signal(signal.SIGINT, signal.SIG_DFL))
    trainer.callbacks.append(met)
    if not is_ddp_child():
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
