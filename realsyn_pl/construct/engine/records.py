"""Parquet record shards keyed by stable ids, and streaming readers over them.

Contract
- Every record has a string `id` that never changes between runs: `doc-SSSSS-RRRRRR` for a document (input file
  index SSSSS in the sorted input list, row RRRRRR in that file), `doc-.../img-P` for its P-th image and
  `doc-.../s-K` for its K-th sentence. Later stages (cluster, retrieve, caption, ...) join on these ids.
- A record shard is `{kind}-{index:05d}.parquet` inside a stage directory (see stage.py). It is written whole to a
  temporary name and renamed, so a reader never sees half a shard. A write that fails removes its temporary file; one
  that fails for want of space is one line naming the file (StageError). A killed writer's temporary file is removed
  when its stage next begins or completes (`remove_temps`), never while a writer may be at work.
- Readers stream record batches (never a whole corpus in memory); `iter_rows` gives dicts for small jobs/tests.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
from contextlib import contextmanager
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
    """A temporary sibling unique to this process and call: two writers of one file (a retried unit whose first try
    still runs on a lost node, two threads) never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


# what tmp_name makes, and what it made before it added the random part: `.{name}.{pid}[-{hex}].tmp`
TMP_PATTERN = re.compile(r"^\..+\.\d+(-[0-9a-f]+)?\.tmp$")
# errors that mean the disk (or the user's quota) is full: retrying the unit cannot help
NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def remove_temps(folder: str | Path) -> int:
    """Remove the temporary files (tmp_name) that killed writers left under `folder`; returns how many. Only where no
    writer of `folder` can be at work (a stage before its units are handed out, or once all are done)."""
    gone = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if TMP_PATTERN.match(name):
                Path(root, name).unlink(missing_ok=True)
                gone += 1
    return gone


def no_space(path: Path, err: OSError) -> Optional[Exception]:
    """The one-line StageError for a write of `path` that failed because the disk is full, else None. pyarrow raises
    a plain OSError whose errno may be unset; its message still says "[errno 28]"."""
    from realsyn_pl.construct.engine.stage import StageError  # stage.py imports this module

    code = err.errno
    if code is None and (m := re.search(r"\[errno (\d+)\]", str(err), re.IGNORECASE)):
        code = int(m.group(1))
    if code not in NO_SPACE:
        return None
    return StageError(f"cannot write {path}: {NO_SPACE[code]}")


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write `path` through the temporary name this yields: renamed into place when the block ends, removed when it
    raises (a full disk keeps no half file), a full disk said in one line naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and (full := no_space(path, err)) is not None:
            raise full from err
        raise


def write_table(path: str | Path, table: pa.Table, row_group_size: Optional[int] = None) -> Path:
    """Write `table` to `path` atomically (temp file + rename)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
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
    Used by stages whose shards may not fit in memory. A shard abandoned by an exception is removed; a full disk is
    one line naming the shard."""

    def __init__(self, path: str | Path, schema: pa.Schema, rows_per_group: int = 1024):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.tmp = tmp_name(self.path)
        with self._writing():
            self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.rows_per_group = rows_per_group
        self.count = 0

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write removes the temp file (whether or not the caller used `with`); no space is one line."""
        try:
            yield
        except OSError as err:
            self._abandon()
            if (full := no_space(self.path, err)) is not None:
                raise full from err
            raise

    def _abandon(self) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            try:
                writer.close()
            except OSError:  # the disk that failed the write may fail the footer too; the file goes anyway
                pass
        self.tmp.unlink(missing_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            cols = {f.name: [r.get(f.name) for r in self.rows] for f in self.schema}
            with self._writing():
                self.writer.write_table(pa.Table.from_pydict(cols, schema=self.schema))
            self.rows = []

    def close(self) -> Path:
        self._flush()
        with self._writing():
            self.writer.close()
            os.replace(self.tmp, self.path)
        return self.path

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *rest: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abandon()
