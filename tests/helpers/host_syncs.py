"""Count, on the CPU, the calls that would make a CUDA training step wait for the host.

On a GPU these calls block the Python thread until the GPU has caught up (a device-to-host read or a
blocking host-to-device copy), so the host cannot queue the next kernels while the GPU works. On the CPU
they cost nothing, so a test counts them here and fails when a change adds one (issue 22: at most 8 per
training step).

Two interception layers, so that each call is counted exactly once:

* A ``TorchDispatchMode`` sees every aten / torchvision operator that reaches the dispatcher, including the
  ones Python never names (``bool(t)`` and ``if t.any()`` run ``aten._local_scalar_dense``; ``torch.where(m)``
  runs ``aten.nonzero``). An operator handled by the mode runs with the mode switched off, so composite ops
  (``allclose``) are counted once and not again for what they call inside.
* A ``TorchFunctionMode`` sees the Python-level reads that dispatch nothing on a CPU tensor: ``tolist``,
  ``numpy``, ``__array__``, ``cpu()``, ``to("cpu")``; and tensors built from Python data with an explicit
  ``device=`` (a blocking host-to-device copy on a GPU). Item-like reads (``item``, ``bool``, ``int``,
  ``float``) are left to the dispatch mode, which sees their ``_local_scalar_dense``.

What it cannot see on the CPU: a ``.to(device)`` of a CPU tensor onto the model's device (on a CPU run source and
target are the same device), and any sync inside a C++ kernel that does not re-dispatch. It over-counts a read
of a tensor that would live on the CPU in a GPU run too (e.g. ``torch.tensor(list).tolist()``): that is
an upper bound, and such code is better written without the tensor anyway.
"""

import collections
import os
import sys
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators whose output size or value the host must read before it can go on.
SYNCING_OPS = {
    aten._local_scalar_dense,  # item(), bool(t), int(t), float(t), `if t.any()`, a tensor as a slice bound
    aten.is_nonzero,
    aten.item,
    aten.nonzero,  # torch.where(cond), t.nonzero(), remove_small_boxes, Matcher, the samplers
    aten.argwhere,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
    aten.unique_dim_consecutive,
    aten.equal,
    aten.allclose,
    aten.bincount,
}

# Indexing operators that sync when an index is a boolean mask (they run nonzero inside the kernel, which a
# dispatch mode never sees), in the forward (x[mask], x[mask] = v) and in the backward of x[mask].
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_, aten._unsafe_index_put}

# Python-level host reads that dispatch nothing for a CPU tensor.
HOST_READS = {
    torch.Tensor.tolist: "Tensor.tolist",
    torch.Tensor.numpy: "Tensor.numpy",
    torch.Tensor.__array__: "Tensor.__array__",
    torch.Tensor.cpu: "Tensor.cpu",
}

# Tensors built from host data; with an explicit device they are a blocking host-to-device copy on a GPU.
FROM_HOST_DATA = {torch.tensor: "torch.tensor", torch.as_tensor: "torch.as_tensor", torch.asarray: "torch.asarray"}


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _caller() -> str:
    """``file:line function`` of the innermost frame outside torch and this file: where the sync was asked for."""
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_TORCH_DIR) or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    for marker in ("site-packages/", "/mrcnn/", "/tests/", "/benchmarks/"):
        if marker in path:
            path = (
                marker.strip("/") + "/" + path.split(marker, 1)[1]
                if marker != "site-packages/"
                else path.split(marker, 1)[1]
            )
            break
    return f"{path}:{frame.f_lineno} {frame.f_code.co_name}"


def _on_stack(frames: tuple[tuple[str | None, str | None], ...]) -> bool:
    """Whether a frame of the calling stack matches one of ``(path fragment or None, function name or None)``."""
    frame = sys._getframe(2)
    while frame is not None:
        path, function = frame.f_code.co_filename, frame.f_code.co_name
        for fragment, name in frames:
            if (fragment is None or fragment in path) and (name is None or name == function):
                return True
        frame = frame.f_back
    return False


class SyncCounter(collections.Counter):
    """A ``Counter`` of sync names, with ``where``: a ``Counter`` of ``(name, "file:line function")``.

    Args:
        host_side: frames of work that runs on host data in a GPU run too (e.g. loading and collating a batch in the
            main process): ``(path fragment or None, function name or None)`` pairs; a sync with a matching frame
            anywhere on its stack is recorded in ``skipped`` (same keys as ``where``) instead of being counted.
    """

    def __init__(self, host_side: tuple[tuple[str | None, str | None], ...] = ()):
        super().__init__()
        self.where = collections.Counter()
        self.skipped = collections.Counter()
        self.host_side = host_side

    def add(self, name: str) -> None:
        if self.host_side and _on_stack(self.host_side):
            self.skipped[name, _caller()] += 1
            return
        self[name] += 1
        self.where[name, _caller()] += 1

    def report(self) -> str:
        """One line per (name, place), most frequent first: for a failing test's message."""
        return "\n".join(f"{n:4d}  {name}  at {place}" for (name, place), n in self.where.most_common())


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices if i is not None)


class _CountOps(TorchDispatchMode):
    def __init__(self, counts: SyncCounter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        name = f"{packet._qualified_op_name.replace('::', '.')}"
        if packet in SYNCING_OPS:
            self.counts.add(name)
        elif packet in INDEX_OPS and len(args) > 1 and _has_bool_index(args[1]):
            self.counts.add(f"{name}(bool mask)")
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None and len(args) < 4:
            if isinstance(args[0], torch.Tensor) and (len(args) == 1 or isinstance(args[1], torch.Tensor)):
                self.counts.add(name)  # the output length is a sum of repeats the host must read
        elif name in ("torchvision.nms",):
            self.counts.add(name)  # variable-length output: the host reads the number kept
        return func(*args, **kwargs)


def _is_cpu_target(args, kwargs) -> bool:
    device = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(device, str) and device.split(":")[0] == "cpu"


class _CountHostReads(TorchFunctionMode):
    def __init__(self, counts: SyncCounter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            self.counts.add(HOST_READS[func])
        elif func is torch.Tensor.to and _is_cpu_target(args, kwargs):
            self.counts.add('Tensor.to("cpu")')
        elif func in FROM_HOST_DATA and "device" in kwargs and kwargs["device"] != "cpu":
            if args and not isinstance(args[0], torch.Tensor):
                self.counts.add(f"{FROM_HOST_DATA[func]}(host data, device=...)")
        elif func is torch.Tensor.new_tensor and len(args) > 1 and not isinstance(args[1], torch.Tensor):
            self.counts.add("Tensor.new_tensor(host data)")
        return func(*args, **kwargs)


def count_host_syncs(fn: Callable, *args, **kwargs) -> tuple[object, SyncCounter]:
    """Run ``fn(*args, **kwargs)`` and count the calls in it that would wait for a GPU (see the module docstring).

    Counts autograd's backward too when ``fn`` calls ``backward()``.

    Returns:
        ``(fn's result, SyncCounter {call name: count})``; ``sum(counter.values())`` is the total, and
        ``counter.report()`` says where each was called from.
    """
    counts = SyncCounter()
    with counting_host_syncs(counts):
        result = fn(*args, **kwargs)
    return result, counts


class counting_host_syncs:  # noqa: N801 (used like a function, as contextlib's context managers are)
    """Context manager form of :func:`count_host_syncs`: counts into ``counts`` between enter and exit.

    It can also be entered and left from two different hooks (e.g. a Lightning callback's
    ``on_train_batch_start`` and ``on_train_batch_end``).
    """

    def __init__(self, counts: SyncCounter):
        self.counts = counts
        self._modes = [_CountHostReads(counts), _CountOps(counts)]

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self.counts

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
