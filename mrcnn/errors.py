"""The error a mistake in the command or its input stops a run with, where the message is all the user needs."""


class CommandError(ValueError):
    """A mistake in the command or its input found once the job has started, by a check that reads more than the
    config (a checkpoint whose run was trained with another config, an input that is not an image, a training set
    smaller than one batch): ``run.py`` prints its message alone, as it prints the checks' before torch loads, since
    a traceback through the check and the libraries that called it says nothing more. Raise it only where the
    message names what to change.

    It is a ``ValueError``: code that calls the project's classes outside ``run.py`` catches it as before."""
