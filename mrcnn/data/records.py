"""Per-image records that DataLoader workers read without copying them.

A dataset that keeps its annotations as Python lists and dicts has them copied into
every DataLoader worker as the workers read them: a forked worker shares its
parent's memory pages until it writes to one, and reading a Python object writes to
it (its reference count; a full garbage collection writes to every container). At
COCO train's size that is gigabytes per worker, one copy for every worker of every
DDP process (PyTorch issue 13246; Detectron2 serialises its dataset dicts for the
same reason).

:class:`PackedRecords` pickles each record into one byte tensor and keeps where
each one starts in an int64 tensor: two objects whose data pages nobody writes
after the build, so forked workers share them for good. Reading a record unpickles
a fresh copy, which the reader may change freely. Torch tensors rather than numpy
arrays so that workers started by ``spawn`` or ``forkserver`` (Python 3.14's
default on Linux) receive them through shared memory (PyTorch's pickling of tensors
for multiprocessing) instead of one copy each.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import pickle
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["PackedRecords", "gc_paused", "release_freed_memory"]


class PackedRecords:
    """An immutable sequence of picklable records stored as one byte buffer.

    Args:
        records: the records, in order (consumed once; each is pickled as it comes).

    Attributes:
        nbytes: size of the pickled records (the buffer), in bytes.
    """

    def __init__(self, records: Iterable[Any]):
        # Each pickle goes straight into one growing buffer: no list of pieces, no second copy.
        buffer, ends = bytearray(), []
        for record in records:
            buffer += pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
            ends.append(len(buffer))
        offsets = np.zeros(len(ends) + 1, dtype=np.int64)
        offsets[1:] = ends
        # uint8 [nbytes]: the records' pickles one after another (a view of the bytearray, which it keeps alive).
        self._buffer = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.zeros(0, dtype=torch.uint8)
        # int64 [len + 1]: record i is buffer[offsets[i]:offsets[i + 1]].
        self._offsets = torch.from_numpy(offsets)

    @property
    def nbytes(self) -> int:
        return self._buffer.numel()

    def __len__(self) -> int:
        return self._offsets.numel() - 1

    def __getitem__(self, index: int) -> Any:
        """Record ``index`` (negative counts from the end), unpickled anew on every call."""
        index = range(len(self))[index]  # IndexError out of range, like a list
        offsets = self._offsets.numpy()
        return pickle.loads(self._buffer.numpy()[offsets[index] : offsets[index + 1]])

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} records, {self.nbytes / 2**20:.1f} MiB)"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector inside the block (restores its previous state after).

    Building millions of containers (parsing a large json) triggers collections over
    an ever larger heap: for a COCO-train-sized json they took 8 of json.load's 13 s.
    Parsed json holds no reference cycles, so pausing frees nothing later than usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def release_freed_memory() -> None:
    """Hands the C heap's free pages back to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    Python gives freed memory back to the allocator, which keeps most of it mapped:
    after a COCO-train-sized json was parsed, packed and freed, the process stayed
    765 MiB larger for a 516 MiB buffer; with the trim, 540 MiB.
    """
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # no C library found, or not glibc
        pass
