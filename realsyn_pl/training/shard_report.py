"""Shards that delivered fewer samples than sizes.json promised (a tar cut short, a wrong sizes.json): a warning
line per shard at the end of the epoch that found it, and the list in summary.json. The epoch itself is filled by
reading other shards again, so without this the loss is visible only as one corrupt_tar skip."""
from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


def gather_short_shards(trainer: L.Trainer, module: Any) -> dict[str, tuple[int, int]]:
    """Every rank's short shards (a collective under DDP: call on every rank)."""
    import torch.distributed as dist

    local = dict(module.short_shards)
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return local
    everyone: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(everyone, local)
    merged: dict[str, tuple[int, int]] = {}
    for part in everyone:
        merged.update(part or {})
    return merged


def short_shard_line(shard: str, delivered: int, promised: int) -> str:
    return (f"warning: shard {shard} delivered {delivered} of the {promised} samples sizes.json promised "
            "(the epoch was filled by reading other shards again)")


class ShortShardWarnings(Callback):
    def __init__(self) -> None:
        self.reported: set[str] = set()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        short = gather_short_shards(trainer, module)
        new = sorted(set(short) - self.reported)
        self.reported.update(new)
        if trainer.is_global_zero:
            for shard in new:
                print(short_shard_line(shard, *short[shard]), file=sys.stderr, flush=True)
