"""Lightning prediction writer that turns predict outputs into finished, resumable stage shards.

Contract (used by construct/engine/predict.py and every model stage)
- Every predict batch comes from exactly one input shard and carries `shard` (int), `n_rows` (rows in that input
  shard), `rows` (row positions of this batch), `ids`, `skipped` ({row: reason} for rows that could not be loaded)
  and `outputs` ({name: array or list}, one entry per loaded row, in `rows` order minus skipped rows).
- The writer collects a shard's batches until all of its rows are accounted for (kept + skipped == n_rows), then calls
  `sink(index, ShardResult)`, which writes the shard's files atomically and returns its Counts; the writer then writes
  the stage's `_done` marker. A killed job therefore leaves only whole shards, and a restart skips them.
- Array outputs (embeddings) are written batch by batch into a memory-mapped spill file per shard (`_spill/` in the
  stage folder, in the dtype the sink will store when the task says it: `dtypes`), so a worker's memory holds a batch,
  not a shard (an OBELICS file's 800k sentence embeddings are 1.6 GB in fp16); the sink gets the file's rows.
- Each actor writes only the shards it was handed (construct/engine/actors.py), so any number of actors on any
  number of nodes write the same files, without any collective.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from realsyn_pl.construct.engine.stage import SPILL, Counts, Stage, StageError


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


COMPACT_ROWS = 65_536  # rows moved at once when skipped rows are squeezed out of a spill file


class _Buffer:
    """One shard's predictions so far: list outputs in memory, array outputs in spill files at their rows."""

    def __init__(self, n_rows: int, spill: Path, index: int, dtypes: dict[str, Any]):
        self.n_rows, self.spill, self.index, self.dtypes = n_rows, spill, index, dtypes
        self.parts: list[dict[str, Any]] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.seen = 0
        self.started = time.time()

    def path(self, name: str) -> Path:
        return self.spill / f"{self.index:05d}-{name}.npy"

    def add(self, prediction: dict[str, Any]) -> None:
        skipped = prediction["skipped"]
        kept = np.array([r for r in prediction["rows"] if r not in skipped], np.int64)
        rest = {}
        for name, value in prediction["outputs"].items():
            if not isinstance(value, np.ndarray):
                rest[name] = value
                continue
            if name not in self.arrays:
                self.spill.mkdir(parents=True, exist_ok=True)
                dtype = self.dtypes.get(name, value.dtype)
                self.arrays[name] = np.lib.format.open_memmap(self.path(name), "w+", dtype,
                                                              (self.n_rows, *value.shape[1:]))
            self.arrays[name][kept] = value
        self.parts.append({**prediction, "outputs": rest})

    def rows_of(self, name: str, kept: np.ndarray) -> np.ndarray:
        """The spill file's kept rows, in order, as a view of the file: skipped rows squeezed out in place (kept
        ascending, so each row moves to a place at or before its own, and a chunk reads before it writes)."""
        mm = self.arrays[name]
        if len(kept) < self.n_rows:
            for lo in range(0, len(kept), COMPACT_ROWS):
                take = kept[lo:lo + COMPACT_ROWS]
                mm[lo:lo + len(take)] = mm[take]
        return mm[:len(kept)]

    def close(self) -> None:
        for name in list(self.arrays):
            del self.arrays[name]
            self.path(name).unlink(missing_ok=True)


def _concat(values: list[Any]) -> Any:
    if values and isinstance(values[0], np.ndarray):
        return np.concatenate(values)
    return [v for part in values for v in part]


class ShardPredictionWriter(BasePredictionWriter):
    def __init__(self, stage: Stage, sink: Sink, dtypes: Optional[dict[str, Any]] = None):
        super().__init__(write_interval="batch")
        self.stage = stage
        self.sink = sink
        self.dtypes = dict(dtypes or {})  # array output -> the dtype the sink stores it in
        self.buffers: dict[int, _Buffer] = {}
        self.written: list[int] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        index = int(prediction["shard"])
        if index not in self.buffers:
            self.buffers[index] = _Buffer(int(prediction["n_rows"]), Path(self.stage.dir) / SPILL, index,
                                          self.dtypes)
        buf = self.buffers[index]
        buf.add(prediction)
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
        kept = np.array(result.rows, np.int64)
        result.outputs.update({k: buf.rows_of(k, kept) for k in buf.arrays})
        try:
            counts = self.sink(result)
        finally:
            result.outputs.clear()
            buf.close()
        self.stage.mark_shard_done(index, counts, time.time() - buf.started)
        self.written.append(index)

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.buffers:
            left = {i: f"{b.seen}/{b.n_rows}" for i, b in self.buffers.items()}
            raise StageError(f"predict ended with unfinished shards {left}")
