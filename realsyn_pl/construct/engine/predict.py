"""Model stages (embed, perplexity, caption, tag, rewrite): the predict-loop contract and the stage runner.

Contract for a model stage: subclass `PredictTask` and `BuildPredictModule`.
- `PredictTask.load(row)` turns one input record (dict with `task.columns`) into a model input; it runs in DataLoader
  workers and raises `SkipRow(reason)` for bad rows (counted as dropped, never a crash).
- `PredictTask.collate(items)` makes a batch input; `BuildPredictModule.infer(inputs)` returns
  {name: tensor/array (n, ...) or list} with one entry per input; `PredictTask.write(stage, input_path, result)`
  writes output shard `result.index` (records and/or arrays, atomically) and returns its Counts.
- Batches never cross input shards, so the computation for a row does not depend on how shards were spread over
  actors: one actor or many give the same numbers. Each actor (engine/actors.py) holds the stage's task and module,
  built once, and runs `Trainer(devices=1).predict` over the whole shards the driver hands it as it becomes free;
  `ShardPredictionWriter` marks each shard done after its files are written, so a rerun skips finished shards.
- `PredictTask.precision` (optional) overrides trainer.precision for that stage (perplexity: fp32 by default).
- The driver never loads a model: a stage describes itself as a `PredictJob` (name, inputs, config, and a function
  that makes the task), and each actor makes its own task from it (actors.py runs it: run_predict_task).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import lightning as L
import torch
from torch.utils.data import IterableDataset, get_worker_info

from realsyn_pl.construct.engine.records import num_rows, read_batches
from realsyn_pl.construct.engine.stage import Counts, Stage
from realsyn_pl.data.writers import ShardResult


class SkipRow(Exception):
    """Raised by PredictTask.load for a row that cannot be used; the message is the drop reason."""


class PredictTask(ABC):
    name: str = ""           # this stage's name (its output directory)
    input_stage: str = ""    # the stage whose record shards are read
    input_kind: str = ""     # record kind read from it: {kind}-{i:05d}.parquet
    columns: list[str] = ["id"]
    batch_size: int = 32
    workers: int = 0
    # None: the build's trainer.precision; a Lightning precision string fixes this stage's (perplexity: "32")
    precision: Optional[str] = None

    @abstractmethod
    def stage_config(self) -> dict[str, Any]:
        """What the output depends on (model, thresholds, ...): changing it refuses to reuse old shards."""

    def stage_inputs(self) -> list[str]:
        """Every stage directory the output is made from (their fingerprints are part of the stage's hash): the
        input stage, plus any stage a task joins by id (rewrite: caption, tag) or otherwise reads."""
        return [self.input_stage]

    @abstractmethod
    def load(self, row: dict[str, Any]) -> Any:
        ...

    @abstractmethod
    def collate(self, items: list[Any]) -> Any:
        ...

    @abstractmethod
    def build_module(self) -> "BuildPredictModule":
        ...

    @abstractmethod
    def write(self, stage: Stage, input_path: Path, result: ShardResult) -> Counts:
        ...

    def begin_shard(self, index: int, path: Path) -> None:  # noqa: B027 (an optional hook: most tasks need none)
        """Called (in the loader worker) before the rows of input shard `index` are loaded: tasks that join other
        stages' records by id (rewrite: captions, tags) load that shard's side data here."""


def _to_host(v: Any) -> Any:
    """A batch's output on the host in the dtype the model gave it: fp16 embeddings stay fp16 until the writer (a
    shard's buffer of fp32 copies would be twice the size); bfloat16, which numpy lacks, becomes float32."""
    if isinstance(v, torch.Tensor):
        v = v.detach()
        return (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy()
    return v


class BuildPredictModule(L.LightningModule):
    """predict_step = infer on the loaded rows + the bookkeeping the writer needs."""

    @abstractmethod
    def infer(self, inputs: Any) -> dict[str, Any]:
        ...

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        outputs = {} if batch["inputs"] is None else {k: _to_host(v) for k, v in self.infer(batch["inputs"]).items()}
        return {"shard": batch["shard"], "n_rows": batch["n_rows"], "rows": batch["rows"], "ids": batch["ids"],
                "skipped": batch["skipped"], "outputs": outputs}


class ShardBatches(IterableDataset):
    """The batches of whole input shards. Batch c of a shard is made of its rows c*B .. (c+1)*B-1 (B = the task's
    batch_size) that load (skipped rows leave it smaller), so what a row is batched with does not depend on how many
    DataLoader workers share the shard: worker w of W loads (decodes) batches w, w + W, ...; the writer puts the
    shard back together in row order."""

    def __init__(self, task: PredictTask, shards: list[tuple[int, Path]]):
        self.task = task
        self.shards = shards

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index, path in self.shards:
            yield from self._shard(index, path, worker, workers)

    def _shard(self, index: int, path: Path, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        n, size = num_rows(path), max(1, self.task.batch_size)
        if n == 0:
            if worker == 0:  # an empty shard still gets its (empty) output files and marker
                self.task.begin_shard(index, path)
                yield self._batch(index, 0, [], [], [], {})
            return
        mine = set(range(worker, -(-n // size), workers))
        if not mine:
            return
        self.task.begin_shard(index, path)
        rows: list[int] = []
        ids: list[str] = []
        items: list[Any] = []
        skipped: dict[int, str] = {}
        start = 0
        for rb in read_batches(path, self.task.columns, batch_size=max(size, 256)):
            end = start + rb.num_rows
            c = start // size
            while c * size < end:
                lo, hi = max(c * size, start), min((c + 1) * size, end)
                if c in mine:
                    for k, rec in enumerate(rb.slice(lo - start, hi - lo).to_pylist()):
                        try:
                            items.append(self.task.load(rec))
                        except SkipRow as why:
                            skipped[lo + k] = str(why)
                        rows.append(lo + k)
                        ids.append(rec["id"])
                    if hi == min((c + 1) * size, n):
                        yield self._batch(index, n, rows, ids, items, skipped)
                        rows, ids, items, skipped = [], [], [], {}
                c += 1
            start = end

    def _batch(self, index, n, rows, ids, items, skipped) -> dict[str, Any]:
        return {"shard": index, "n_rows": n, "rows": rows, "ids": ids, "skipped": skipped,
                "inputs": self.task.collate(items) if items else None}


@dataclass
class PredictJob:
    """A model stage as the driver sees it, no model loaded: what it reads, what its output depends on, and `make`,
    which builds the PredictTask (and its model) inside each actor."""

    name: str
    input_stage: str
    input_kind: str
    config: dict[str, Any]
    inputs: list[str]
    make: Callable[[], PredictTask]

    @classmethod
    def of(cls, task: PredictTask) -> "PredictJob":
        """A job whose actors run `task` itself (it is shipped to them, model included): for a task built around a
        model in memory rather than one named by the config."""
        return cls(task.name, task.input_stage, task.input_kind, task.stage_config(), task.stage_inputs(),
                   lambda: task)

    def input_path(self, work_dir: Path, index: int) -> Path:
        return Path(work_dir) / self.input_stage / f"{self.input_kind}-{index:05d}.parquet"
