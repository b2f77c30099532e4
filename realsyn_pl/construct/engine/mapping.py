"""Per-row filter/map over one record shard, streamed: the body of every simple per-shard stage."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Union

import pyarrow as pa

from realsyn_pl.construct.engine.records import ShardWriter, read_batches
from realsyn_pl.construct.engine.stage import Counts

# A row function returns the output row (kept) or a string (the drop reason).
RowFn = Callable[[dict[str, Any]], Union[dict[str, Any], str]]


def map_shard(in_path: Path, out_path: Path, schema: pa.Schema, fn: RowFn, batch_size: int = 1024,
              columns: list[str] | None = None) -> Counts:
    return map_rows_batched(in_path, out_path, schema, lambda rows: map(fn, rows), batch_size, columns)


def map_rows_batched(in_path: Path, out_path: Path, schema: pa.Schema,
                     fn: Callable[[list[dict[str, Any]]], Iterable[Union[dict[str, Any], str]]],
                     batch_size: int = 256, columns: list[str] | None = None) -> Counts:
    """Like map_shard, but `fn` sees a batch of rows at once (for work done concurrently, e.g. downloads)."""
    return write_results(out_path, schema, (res for batch in read_batches(in_path, columns, batch_size)
                                            for res in fn(batch.to_pylist())))


def write_results(out_path: Path, schema: pa.Schema, results: Iterable[Union[dict[str, Any], str]]) -> Counts:
    """Write the kept rows of a stream of results (a row, or a drop reason) as one shard; count both."""
    counts = Counts()
    with ShardWriter(out_path, schema) as out:
        for res in results:
            if isinstance(res, str):
                counts.drop(res)
            else:
                counts.keep()
                out.write(res)
    return counts
