"""Whether this Triton's interpreter can run the NMS kernel (``mrcnn.modeling.nms``) on the CPU, where the tests run it."""

import functools

import pytest
import torch

try:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:
    tl = InterpretedFunction = None


def _loop_over_loaded_bounds(bounds, out):
    # As the kernel walks a group: a loop whose bounds are loaded from memory.
    total = 0
    for i in range(tl.load(bounds), tl.load(bounds + 1)):
        total += i
    tl.store(out, total)


@functools.cache
def interpreter_problem() -> str | None:
    """``None`` where Triton's interpreter runs a loop over bounds loaded from memory; otherwise why it cannot.

    Triton 3.6's interpreter (torch 2.11's) turns such a bound into an int with ``int()`` of a one-element numpy array,
    which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.7 squeezes the
    array first. Only the interpreter is affected: the compiled kernel has no numpy in it.
    """
    if InterpretedFunction is None:
        return "no Triton"
    bounds, out = torch.tensor([2, 5]), torch.zeros(1, dtype=torch.int64)
    try:
        InterpretedFunction(_loop_over_loaded_bounds)[(1,)](bounds, out)
    except Exception as error:
        return f"this Triton's interpreter cannot loop over loaded bounds ({type(error).__name__}: {error})"
    if int(out) != 2 + 3 + 4:
        return f"this Triton's interpreter looped over loaded bounds wrongly (sum {int(out)}, not 9)"
    return None


def require_interpreter() -> None:
    """Skips the calling test where the interpreter cannot run the kernel (:func:`interpreter_problem`)."""
    problem = interpreter_problem()
    if problem is not None:
        pytest.skip(problem)
