"""Third-party messages that tell a user of this project nothing, silenced where they come from.

Each entry says why it is noise here. Everything else (our own messages, real warnings) still shows.
"""

import contextlib
import logging
import sys
import warnings

# Warnings by message (regular expressions, matched at the start).
NOISE_WARNINGS = (
    # Lightning's own use of a torch.utils._pytree API that torch deprecated; nothing for a user to change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Short runs (smoke tests, tiny sweeps) have fewer batches than the logging interval by design.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # MaskRCNNModule.on_before_batch_transfer drops crowd regions and checks training targets on the host, for any
    # datamodule; ours define no such hook, so nothing is overridden that the message could warn about.
    r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
)
# Log records by message prefix, per logger: Lightning's advertisements for its cloud products.
NOISE_LOGS = {
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:",),
    "lightning_fabric.utilities.rank_zero": ("💡 Tip:",),
}

# What Lightning says when a checkpoint's callback states are restored into a run that only reads its weights
# (mode=evaluate, mode=predict): the training run's checkpoint callbacks are neither there nor needed.
WEIGHTS_ONLY_NOISE = (
    r"The dirpath has changed from",
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
)

_installed = False


@contextlib.contextmanager
def reading_weights_only():
    """Silences :data:`WEIGHTS_ONLY_NOISE` inside: around ``trainer.validate`` / ``trainer.predict`` with a checkpoint."""
    with warnings.catch_warnings():
        for pattern in WEIGHTS_ONLY_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        yield


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def one_copy_of_lightning_logs() -> None:
    """Shows each Lightning log record once when the root logger prints to the console (Hydra's job logging).

    ``import lightning`` gives the ``lightning`` logger a console handler of its own ("INFO: ..."), whatever the root
    logger has, while its subpackages propagate to the root logger when it has handlers. Under Hydra every Lightning
    message ("GPU available: ...", "`Trainer.fit` stopped: ...") was printed twice: once by that handler, once in the
    job's format. Without Lightning's console handler each shows once, in the job's format, and still reaches the
    job's log file. Where the root logger has no console handler (a plain script, one that logs to a file only,
    pytest's capture) Lightning's handler is the only one on the console, so it stays.
    """
    if not any(_is_console(handler) for handler in logging.getLogger().handlers):
        return
    package = logging.getLogger("lightning")
    for handler in list(package.handlers):
        if _is_console(handler):
            package.removeHandler(handler)


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal: standard output or standard error (not a file, not a buffer)."""
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def silence_library_noise() -> None:
    """Installs the filters above, once per process, and shows each Lightning log record once."""
    global _installed
    one_copy_of_lightning_logs()  # each call: Lightning may have been imported since the last one
    if _installed:
        return
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefixes in NOISE_LOGS.items():
        logging.getLogger(name).addFilter(_DropPrefixes(prefixes))
    _installed = True
