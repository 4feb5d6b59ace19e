"""Third-party messages that tell a user of this project nothing, silenced where they come from.

Each entry says why it is noise here. Everything else (our own messages, real warnings) still shows.
"""

import logging
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

_installed = False


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_library_noise() -> None:
    """Installs the filters above, once per process."""
    global _installed
    if _installed:
        return
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefixes in NOISE_LOGS.items():
        logging.getLogger(name).addFilter(_DropPrefixes(prefixes))
    _installed = True
