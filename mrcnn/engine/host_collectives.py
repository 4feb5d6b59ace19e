"""Collectives on the host between a job's processes (gloo), for flags every process must agree on."""

from __future__ import annotations

import ctypes

import torch

_HOST_GROUPS: dict = {}  # default process group -> its gloo twin, made once per process

# The works of the last two host_max calls, never freed (see there). ctypes: a reference that Python's own cleanup at
# exit does not drop.
_LAST_WORK: list = []
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_LAST_WORK))


def host_process_group(world_size: int):
    """A process group of every rank whose collectives run on the host (gloo); ``None`` in a single process.

    The default group when it is gloo already (CPU processes); otherwise (NCCL) a gloo group over the same ranks,
    created once per default group by every rank at the same point, as ``torch.distributed.new_group`` requires.
    Across nodes gloo talks over TCP: on a cluster whose hostnames do not resolve to the interface the nodes share,
    set ``GLOO_SOCKET_IFNAME`` (as for ``trainer=ddp_cpu``).

    Args:
        world_size: the job's number of processes (``trainer.world_size``).
    """
    dist = torch.distributed
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_backend() == dist.Backend.GLOO:
        return dist.group.WORLD
    world = dist.group.WORLD
    if world not in _HOST_GROUPS:
        _HOST_GROUPS[world] = dist.new_group(backend=dist.Backend.GLOO)
    return _HOST_GROUPS[world]


def host_max(value: int, group) -> int:
    """The largest ``value`` over the processes of ``group``, a host group (:func:`host_process_group`).

    A host tensor on a host group: the result is read on the host at once, and an NCCL all-reduce read back there
    would wait until the GPU has finished everything queued before it.

    The collective's work stays referenced here for two more calls, and the last ones until the process ends.
    gloo's worker thread drops its own reference a moment after ``wait()`` returns; where that is the last one, that
    thread frees the tensor, and releasing a tensor's Python object takes the GIL. In a process that exits right after
    the collective (every process of a stopped job) Python may be finalizing by then: a thread that asks for the GIL
    is ended there, inside a C++ destructor, and the process aborts (SIGABRT) instead of exiting with its status
    (seen in about 1 of 3 two-process exits right after a plain ``all_reduce``, torch 2.14).
    """
    flag = torch.tensor([value])
    work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group, async_op=True)
    work.wait()
    # The one before the last is freed here, by this thread, at least a collective after gloo let go of it. Two, not
    # one: gloo runs works on 2 threads, and the last could finish on one while the other still holds its own.
    _LAST_WORK[:] = [*_LAST_WORK[-1:], work]
    return int(flag.item())
