"""The error a mistake in the command or its input stops a run with, where the message is all the user needs."""

import functools
from collections.abc import Callable


class CommandError(ValueError):
    """A mistake in the command or its input found once the job has started, by a check that reads more than the
    config (a checkpoint whose run was trained with another config, an input that is not an image, a training set
    smaller than one batch): ``run.py`` prints its message alone, as it prints the checks' before torch loads, since
    a traceback through the check and the libraries that called it says nothing more. Raise it only where the
    message names what to change.

    It is a ``ValueError``: code that calls the project's classes outside ``run.py`` catches it as before."""


def raises_command_errors(resolver: Callable) -> Callable:
    """Wraps one of the project's OmegaConf resolvers so that its errors on bad input (``ValueError``, ``OSError``:
    a json with a category named twice, a file not there) are :class:`CommandError` s, with the same message.

    OmegaConf wraps whatever a resolver raises in an ``InterpolationResolutionError`` whose traceback runs through
    the code that first resolved the config (writing the job's resolved config, building the data);
    :func:`command_error_of` finds the ``CommandError`` in it, which ``run.py`` prints alone. The original error
    stays the ``CommandError``'s cause (the config checks tell a file not there by it)."""

    @functools.wraps(resolver)
    def resolve(*args, **kwargs):
        try:
            return resolver(*args, **kwargs)
        except (ValueError, OSError) as error:
            if isinstance(error, CommandError):
                raise
            raise CommandError(str(error)) from error

    return resolve


def command_error_of(error: BaseException) -> CommandError | None:
    """``error`` itself when it is a :class:`CommandError`; the one it wraps when ``error`` is OmegaConf's
    ``InterpolationResolutionError`` for an error a resolver raised (its ``__context__``, through the copies OmegaConf
    raises while handling its own), or Hydra's ``InstantiationException`` for an error a ``_target_`` raised (its
    ``__cause__``: the model's builders check their input files); else ``None``."""
    # (Light: run.py has imported Hydra and OmegaConf already.)
    from hydra.errors import InstantiationException
    from omegaconf.errors import InterpolationResolutionError

    for _ in range(8):  # a few wrappers at most
        if isinstance(error, InterpolationResolutionError):
            error = error.__context__
        elif isinstance(error, InstantiationException):
            error = error.__cause__
        else:
            break
    return error if isinstance(error, CommandError) else None
