"""The generic predict-loop runner for model stages (embed, perplexity; caption, tag, rewrite in issue 6).

Contract for a model stage: subclass `PredictTask` and `BuildPredictModule`.
- `PredictTask.load(row)` turns one input record (dict with `task.columns`) into a model input; it runs in DataLoader
  workers and raises `SkipRow(reason)` for bad rows (counted as dropped, never a crash).
- `PredictTask.collate(items)` makes a batch input; `BuildPredictModule.infer(inputs)` returns
  {name: tensor/array (n, ...) or list} with one entry per input; `PredictTask.write(stage, input_path, result)`
  writes output shard `result.index` (records and/or arrays, atomically) and returns its Counts.
- Batches never cross input shards, so the computation for a row does not depend on how shards were spread over
  ranks: 1 process and N-process DDP give the same numbers. Rank r reads the pending shards i % world == r;
  `ShardPredictionWriter` marks each shard done after its files are written, so a rerun skips finished shards.
- `PredictTask.precision` (optional) overrides trainer.precision for that stage (perplexity: fp32 by default).
"""
from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from realsyn_pl.construct.engine.config import PredictTrainerConfig
from realsyn_pl.construct.engine.records import num_rows, read_batches
from realsyn_pl.construct.engine.stage import Counts, Stage, input_indices
from realsyn_pl.data.writers import ShardPredictionWriter, ShardResult


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
    if isinstance(v, torch.Tensor):
        return v.detach().float().cpu().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
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
    """Batches of one input shard at a time; DataLoader workers split the shards between them."""

    def __init__(self, task: PredictTask, shards: list[tuple[int, Path]]):
        self.task = task
        self.shards = shards

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for index, path in mine:
            yield from self._shard(index, path)

    def _shard(self, index: int, path: Path) -> Iterator[dict[str, Any]]:
        n = num_rows(path)
        self.task.begin_shard(index, path)
        if n == 0:
            yield self._batch(index, 0, [], [], [], {})
            return
        rows, ids, items, skipped, pos = [], [], [], {}, 0
        for rb in read_batches(path, self.task.columns, batch_size=max(self.task.batch_size, 256)):
            for rec in rb.to_pylist():
                try:
                    items.append(self.task.load(rec))
                except SkipRow as why:
                    skipped[pos] = str(why)
                rows.append(pos)
                ids.append(rec["id"])
                pos += 1
                if len(rows) - len(skipped) >= self.task.batch_size:
                    yield self._batch(index, n, rows, ids, items, skipped)
                    rows, ids, items, skipped = [], [], [], {}
        if rows:
            yield self._batch(index, n, rows, ids, items, skipped)

    def _batch(self, index, n, rows, ids, items, skipped) -> dict[str, Any]:
        return {"shard": index, "n_rows": n, "rows": rows, "ids": ids, "skipped": skipped,
                "inputs": self.task.collate(items) if items else None}


class ShardDataModule(L.LightningDataModule):
    """Gives each rank its pending shards once the Trainer knows the rank (works with any launcher)."""

    def __init__(self, task: PredictTask, stage: Stage, in_dir: Path, indices: list[int]):
        super().__init__()
        self.task, self.stage, self.in_dir, self.indices = task, stage, in_dir, indices

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        todo = self.stage.pending(self.indices, rank, world)
        shards = [(i, self.in_dir / f"{self.task.input_kind}-{i:05d}.parquet") for i in todo]
        workers = min(self.task.workers, len(shards))
        return DataLoader(ShardBatches(self.task, shards), batch_size=None, num_workers=workers,
                          persistent_workers=False)


def build_trainer(cfg: PredictTrainerConfig, writer: ShardPredictionWriter, progress: bool) -> L.Trainer:
    from realsyn_pl.training.environment import resolve_topology

    devices, num_nodes = resolve_topology(cfg.devices, cfg.num_nodes)
    return L.Trainer(accelerator=cfg.accelerator, devices=devices, num_nodes=num_nodes, strategy=cfg.strategy,
                     precision=cfg.precision, logger=False, callbacks=[writer], enable_checkpointing=False,
                     enable_progress_bar=progress, enable_model_summary=False, use_distributed_sampler=False,
                     inference_mode=True)


def run_predict_task(task: PredictTask, work_dir: str | Path, trainer_cfg: PredictTrainerConfig,
                     progress: bool = True, force: bool = False) -> bool:
    """Run one model stage to completion (or this rank's share of it). True when the stage is complete."""
    started = time.time()
    work_dir = Path(work_dir)
    in_dir = work_dir / task.input_stage
    indices = input_indices(in_dir, task.input_kind)
    stage = Stage(work_dir, task.name, task.stage_config(), task.stage_inputs())
    if stage.skip_complete(force):
        return True
    stage.begin(force)
    writer = ShardPredictionWriter(stage, lambda result: task.write(stage, in_dir / f"{task.input_kind}-"
                                                                    f"{result.index:05d}.parquet", result))
    if task.precision is not None:
        trainer_cfg = replace(trainer_cfg, precision=task.precision)
    trainer = build_trainer(trainer_cfg, writer, progress)
    # our writer does not use batch indices (rows carry their own positions)
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    module = task.build_module()
    trainer.predict(module, datamodule=ShardDataModule(task, stage, in_dir, indices), return_predictions=False)
    trainer.strategy.barrier()
    return stage.finalize(indices, started)

