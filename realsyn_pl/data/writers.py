"""Lightning prediction writer that turns predict outputs into finished, resumable stage shards.

Contract (used by construct/engine/predict.py and every model stage)
- Every predict batch comes from exactly one input shard and carries `shard` (int), `n_rows` (rows in that input
  shard), `rows` (row positions of this batch), `ids`, `skipped` ({row: reason} for rows that could not be loaded)
  and `outputs` ({name: array or list}, one entry per loaded row, in `rows` order minus skipped rows).
- The writer buffers a shard's batches until all of its rows are accounted for (kept + skipped == n_rows), then calls
  `sink(index, ShardResult)`, which writes the shard's files atomically and returns its Counts; the writer then writes
  the stage's `_done` marker. A killed job therefore leaves only whole shards, and a restart skips them.
- Each actor writes only the shards it was handed (construct/engine/actors.py), so any number of actors on any
  number of nodes write the same files, without any collective.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from realsyn_pl.construct.engine.stage import Counts, Stage, StageError


@dataclass
class ShardResult:
    """One input shard's predictions, in input row order."""

    index: int
    n_rows: int
    ids: list[str] = field(default_factory=list)  # ids of rows that produced outputs
    rows: list[int] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)  # name -> np.ndarray (n, ...) or list, aligned with ids
    skipped: dict[int, str] = field(default_factory=dict)  # row -> reason

    def skip_counts(self) -> Counts:
        """Counts with every skipped row dropped by its reason; the sink adds what it keeps."""
        c = Counts()
        for reason in self.skipped.values():
            c.drop(reason)
        return c


Sink = Callable[[ShardResult], Counts]


class _Buffer:
    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.parts: list[dict[str, Any]] = []
        self.seen = 0
        self.started = time.time()


def _concat(values: list[Any]) -> Any:
    if values and isinstance(values[0], np.ndarray):
        return np.concatenate(values)
    return [v for part in values for v in part]


class ShardPredictionWriter(BasePredictionWriter):
    def __init__(self, stage: Stage, sink: Sink):
        super().__init__(write_interval="batch")
        self.stage = stage
        self.sink = sink
        self.buffers: dict[int, _Buffer] = {}
        self.written: list[int] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        index = int(prediction["shard"])
        buf = self.buffers.setdefault(index, _Buffer(int(prediction["n_rows"])))
        buf.parts.append(prediction)
        buf.seen += len(prediction["rows"])
        if buf.seen > buf.n_rows:
            raise StageError(f"shard {index}: {buf.seen} rows predicted but the input has {buf.n_rows}")
        if buf.seen == buf.n_rows:
            self._flush(index)

    def _flush(self, index: int) -> None:
        buf = self.buffers.pop(index)
        result = ShardResult(index, buf.n_rows)
        # batches may arrive out of order (several loader workers): order them by their first row
        parts = sorted(buf.parts, key=lambda p: p["rows"][0] if len(p["rows"]) else -1)
        with_out = [p for p in parts if p["outputs"]]
        names = list(with_out[0]["outputs"]) if with_out else []
        for part in parts:
            result.skipped.update(part["skipped"])
            for r, i in zip(part["rows"], part["ids"]):
                if r not in part["skipped"]:
                    result.rows.append(r)
                    result.ids.append(i)
        result.outputs = {k: _concat([p["outputs"][k] for p in with_out]) for k in names}
        counts = self.sink(result)
        self.stage.mark_shard_done(index, counts, time.time() - buf.started)
        self.written.append(index)

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.buffers:
            left = {i: f"{b.seen}/{b.n_rows}" for i, b in self.buffers.items()}
            raise StageError(f"predict ended with unfinished shards {left}")
