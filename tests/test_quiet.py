"""mrcnn.engine.quiet: each Lightning message once on the console, and only where something else prints it."""

import logging
import sys

import lightning  # noqa: F401  (gives the "lightning" logger its console handler)
import pytest

from mrcnn.engine.quiet import one_copy_of_lightning_logs


@pytest.fixture
def loggers():
    """The root and "lightning" loggers' handlers, restored after the test."""
    root, package = logging.getLogger(), logging.getLogger("lightning")
    saved = root.handlers[:], package.handlers[:]
    root.handlers[:] = []
    package.handlers[:] = [logging.StreamHandler(sys.stderr)]  # what `import lightning` adds
    yield root, package
    root.handlers[:], package.handlers[:] = saved


def test_lightnings_console_handler_goes_only_when_the_root_logger_prints_to_the_console(loggers, tmp_path):
    root, package = loggers
    # A plain script, or one that logs to a file only: Lightning's handler is the only one on the console.
    one_copy_of_lightning_logs()
    root.addHandler(logging.FileHandler(tmp_path / "run.log"))
    one_copy_of_lightning_logs()
    assert len(package.handlers) == 1
    # Hydra's job logging: a console handler on the root logger as well; Lightning's own file handler stays.
    own_file = logging.FileHandler(tmp_path / "lightning.log")
    package.addHandler(own_file)
    root.addHandler(logging.StreamHandler(sys.stdout))
    one_copy_of_lightning_logs()
    assert package.handlers == [own_file]
    for handler in (*root.handlers, own_file):
        handler.close()
