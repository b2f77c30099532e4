"""Known third-party messages that a `fit` log would otherwise be mostly made of, silenced one by one (never a
blanket filter: any other warning still shows)."""
from __future__ import annotations

import logging
import warnings

# Lightning's info lines: an advertisement, and a note about a step count fit computes on purpose.
LIGHTNING_INFO = ("💡 Tip:", "Loading `train_dataloader` to estimate number of stepping batches")
# Python warnings: torch's pytree deprecation that Lightning's own code triggers; Lightning's caution about an
# IterableDataset with __len__ (the shard reader gives every worker its own shards and an exact batch count); its
# claim that a mid-epoch resume is unreliable (the datamodule's state puts the data stream back where it was).
WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"Your `IterableDataset` has `__len__` defined"),
    (UserWarning, r"You're resuming from a checkpoint that ended before the epoch ended"),
)
# open_clip logs this on the root logger whenever it builds a model without its own weights, including when fit
# trains from scratch or loads model.pretrained itself right after.
ROOT_PREFIXES = ("No pretrained weights loaded for model",)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _add_once(logger: logging.Logger, prefixes: tuple[str, ...]) -> None:
    if not any(isinstance(f, _DropPrefixes) and f.prefixes == prefixes for f in logger.filters):
        logger.addFilter(_DropPrefixes(prefixes))


def silence_known_noise() -> None:
    """Install the filters in this process (idempotent)."""
    _add_once(logging.getLogger("lightning.pytorch.utilities.rank_zero"), LIGHTNING_INFO)
    _add_once(logging.getLogger(), ROOT_PREFIXES)
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
