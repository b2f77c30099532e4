"""The build's predict loop (a BuildPredictModule under the model actors' Trainer, engine/actors.predict_trainer,
without the shard writer) on a target, its outputs gathered in row order."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
from torch.utils.data import DataLoader

from gpu.targets import Target
from realsyn_pl.construct.engine.actors import predict_trainer
from realsyn_pl.construct.engine.predict import BuildPredictModule, PredictTask, ShardBatches
from realsyn_pl.construct.engine.records import write_records

TEXT_ROWS = pa.schema([("id", pa.string()), ("text", pa.string())])


def predict(module: BuildPredictModule, batches: Iterable[dict[str, Any]], target: Target,
            precision: str = "32") -> dict[str, Any]:
    """{output name: array (rows, ...) or list} of every batch, in order."""
    trainer = predict_trainer(target.accelerator, precision, [])
    out = trainer.predict(module, dataloaders=DataLoader(list(batches), batch_size=None), return_predictions=True)
    merged: dict[str, Any] = {}
    for batch in out:
        for k, v in batch["outputs"].items():
            merged.setdefault(k, []).append(v)
    return {k: np.concatenate(v) if isinstance(v[0], np.ndarray) else [x for part in v for x in part]
            for k, v in merged.items()}


def batches(inputs: list[Any]) -> list[dict[str, Any]]:
    """Collated batch inputs in the ShardBatches layout (the bookkeeping keys predict_step passes through)."""
    return [{"shard": 0, "n_rows": 0, "rows": [], "ids": [], "skipped": {}, "inputs": x} for x in inputs]


def task_batches(task: PredictTask, path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` written as one input shard and read back through the task's own load/collate (ShardBatches)."""
    write_records(path, rows, TEXT_ROWS)
    return list(ShardBatches(task, [(0, path)]))
