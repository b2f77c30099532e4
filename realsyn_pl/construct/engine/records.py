"""Parquet record shards keyed by stable ids, and streaming readers over them.

Contract
- Every record has a string `id` that never changes between runs: `doc-SSSSS-RRRRRR` for a document (input file
  index SSSSS in the sorted input list, row RRRRRR in that file), `doc-.../img-P` for its P-th image and
  `doc-.../s-K` for its K-th sentence. Later stages (cluster, retrieve, caption, ...) join on these ids.
- A record shard is `{kind}-{index:05d}.parquet` inside a stage directory (see stage.py). It is written whole to a
  temporary name and renamed, so a reader never sees half a shard.
- Readers stream record batches (never a whole corpus in memory); `iter_rows` gives dicts for small jobs/tests.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


def doc_id(file_index: int, row: int) -> str:
    return f"doc-{file_index:05d}-{row:06d}"


def image_id(doc: str, position: int) -> str:
    return f"{doc}/img-{position}"


def sentence_id(doc: str, k: int) -> str:
    return f"{doc}/s-{k}"


def doc_of(item_id: str) -> str:
    return item_id.split("/", 1)[0]


def tmp_name(path: Path) -> Path:
    """A temporary sibling unique to this process (two ranks never share one)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_table(path: str | Path, table: pa.Table, row_group_size: Optional[int] = None) -> Path:
    """Write `table` to `path` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
    os.replace(tmp, path)
    return path


def write_records(path: str | Path, rows: Sequence[dict[str, Any]], schema: pa.Schema) -> Path:
    """Rows (dicts) as one parquet shard with an explicit schema, so empty shards still have their columns."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return write_table(path, pa.Table.from_pydict(cols, schema=schema))


def num_rows(path: str | Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def read_batches(path: str | Path, columns: Optional[list[str]] = None,
                 batch_size: int = 4096) -> Iterator[pa.RecordBatch]:
    pf = pq.ParquetFile(path)
    yield from pf.iter_batches(batch_size=batch_size, columns=columns)


def iter_rows(paths: str | Path | Iterable[str | Path], columns: Optional[list[str]] = None,
              batch_size: int = 4096) -> Iterator[dict[str, Any]]:
    """Rows of one or several shards, in order, as dicts."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for p in paths:
        for batch in read_batches(p, columns, batch_size):
            yield from batch.to_pylist()


def read_column(paths: Iterable[str | Path], column: str) -> list[Any]:
    out: list[Any] = []
    for p in paths:
        out.extend(pq.read_table(p, columns=[column]).column(column).to_pylist())
    return out


class ShardWriter:
    """Streams rows into one parquet shard: row groups go to a temp file, `close()` renames it into place.
    Used by stages whose shards may not fit in memory. A shard abandoned by an exception is removed."""

    def __init__(self, path: str | Path, schema: pa.Schema, rows_per_group: int = 1024):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.tmp = tmp_name(self.path)
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.rows_per_group = rows_per_group
        self.count = 0

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            cols = {f.name: [r.get(f.name) for r in self.rows] for f in self.schema}
            self.writer.write_table(pa.Table.from_pydict(cols, schema=self.schema))
            self.rows = []

    def close(self) -> Path:
        self._flush()
        self.writer.close()
        os.replace(self.tmp, self.path)
        return self.path

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.writer.close()
            self.tmp.unlink(missing_ok=True)
