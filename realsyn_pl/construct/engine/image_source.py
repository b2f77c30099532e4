"""Where an image record's bytes are: inline, a row of the download stage's shard, or a local file.

One copy of the image bytes: the `download` stage's `images-i.parquet` holds them; image_filter (and so
dedup_images, which passes its input rows on) stores `src_row`, the record's row number in `download/images-i.parquet`
of the same shard index i, with `bytes` null (image_filter.keep_bytes=true keeps an inline copy instead).
Every reader of image bytes (embed_images, caption, tag, write, the demo) comes here. Order: inline bytes, else the
download row `src_row`, else the local `path`; None when none of them gives bytes (callers count no_image_data).
A record with a src_row never falls back to its path: download vets (and keeps) only the paths of records that came
without bytes, which are the ones image_filter gives no src_row, so the path of a record whose bytes came with it
may name any file of the machine (a hostile corpus) and is not opened.

A download row is read through its row group only (download writes small ones, DOWNLOAD_ROWS_PER_GROUP rows), so a
reader holds one row group of bytes at a time, never a whole shard. The download row's id must equal the record's:
a download shard rebuilt or deleted since (rows moved, gone, out of range) gives None, not another image.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

DOWNLOAD_STAGE = "download"
DOWNLOAD_ROWS_PER_GROUP = 64  # a reader of one image reads at most this many images' bytes
RECORD_COLUMNS = ("id", "bytes", "path", "src_row")

Records = Union[pa.Table, pa.RecordBatch]


def record_columns(path: Path) -> list[str]:
    """The image-source columns an image record shard has (older shards and test fixtures lack src_row)."""
    names = set(pq.read_schema(path).names)
    return [c for c in RECORD_COLUMNS if c in names]


def download_path(work_dir: Path, shard: int) -> Path:
    return Path(work_dir) / DOWNLOAD_STAGE / f"images-{shard:05d}.parquet"


def _group_starts(pf: pq.ParquetFile) -> np.ndarray:
    md = pf.metadata
    sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def iter_take(path: Path, rows: np.ndarray, columns: Optional[Sequence[str]]
              ) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """Rows `rows` (row numbers, any order, repeats allowed) of a parquet file, one needed row group at a time, each
    read once: (positions k into `rows`, the table of rows[k]). Row numbers outside the file are never yielded."""
    pf = pq.ParquetFile(path)
    starts = _group_starts(pf)
    rows = np.asarray(rows, dtype=np.int64)
    ks = np.flatnonzero((rows >= 0) & (rows < starts[-1]))
    groups = np.searchsorted(starts, rows[ks], side="right") - 1
    order = np.argsort(groups, kind="stable")
    ks, groups = ks[order], groups[order]
    cuts = np.flatnonzero(np.diff(groups)) + 1
    for part in np.split(np.arange(len(ks)), cuts):
        if not part.size:
            continue
        g = int(groups[part[0]])
        table = pf.read_row_group(g, columns=None if columns is None else list(columns))
        yield ks[part], table.take(pa.array(rows[ks[part]] - starts[g]))


def take_rows(path: Path, rows: np.ndarray, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Rows `rows` of a parquet file in the given order, reading only their row groups (all must exist)."""
    rows = np.asarray(rows, dtype=np.int64)
    parts = list(iter_take(path, rows, columns))
    got = np.concatenate([k for k, _ in parts]) if parts else np.zeros(0, np.int64)
    if len(got) != len(rows):
        raise IndexError(f"{path}: row numbers out of range")
    if not parts:
        schema = pq.read_schema(path)
        return schema.empty_table() if columns is None else schema.empty_table().select(list(columns))
    table = pa.concat_tables([t for _, t in parts])
    inverse = np.empty(len(rows), np.int64)
    inverse[got] = np.arange(len(got))
    return table.take(pa.array(inverse))


def _nonempty(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Rows whose binary value is present and not empty (b"" counts as no bytes, as it always has)."""
    lengths = pc.fill_null(pc.binary_length(col), 0)
    return np.asarray(lengths.to_numpy(zero_copy_only=False)) > 0


def _int_column(records: Records, name: str) -> np.ndarray:
    if name not in records.schema.names:
        return np.full(records.num_rows, -1, np.int64)
    return np.asarray(pc.fill_null(records.column(name), -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _path_bytes(path: Optional[str]) -> Optional[bytes]:
    if path and Path(path).is_file():
        return Path(path).read_bytes()
    return None


class ImageSource:
    """The bytes of the image records of one record shard (index `shard`, so download shard `shard`)."""

    def __init__(self, work_dir: Path, shard: int, cached_groups: int = 2):
        self.path = download_path(work_dir, shard)
        self.cached_groups = cached_groups
        self._pf: Optional[pq.ParquetFile] = None
        self._starts = np.zeros(1, np.int64)
        self._cache: OrderedDict[int, tuple[pa.Array, pa.Array]] = OrderedDict()

    def iter_bytes(self, records: Records) -> Iterator[tuple[int, Optional[bytes]]]:
        """(k, bytes of row k of `records` or None), every row once: inline bytes first, then the download rows one
        needed row group at a time, then local paths and rows with no bytes anywhere."""
        n = records.num_rows
        done = np.zeros(n, bool)
        if "bytes" in records.schema.names:
            col = records.column("bytes")
            for k in np.flatnonzero(_nonempty(col)):
                done[k] = True
                yield int(k), col[int(k)].as_py()
        src = _int_column(records, "src_row")
        want = np.flatnonzero(~done & (src >= 0))
        if want.size and self.path.is_file():
            ids = records.column("id")
            for ks, table in iter_take(self.path, src[want], ["id", "bytes"]):
                rows = want[ks]
                same = pc.fill_null(pc.equal(table.column("id"), ids.take(pa.array(rows))), False)
                ok = np.asarray(same.to_numpy(zero_copy_only=False)) & _nonempty(table.column("bytes"))
                col = table.column("bytes")
                for i in np.flatnonzero(ok):
                    done[rows[i]] = True
                    yield int(rows[i]), col[int(i)].as_py()
        paths = records.column("path") if "path" in records.schema.names else None
        for k in np.flatnonzero(~done):
            yield int(k), _path_bytes(paths[int(k)].as_py() if paths is not None and src[k] < 0 else None)

    def bytes_of(self, records: Records) -> list[Optional[bytes]]:
        """The bytes of every row of `records`, in row order (a batch's worth at a time)."""
        out: list[Optional[bytes]] = [None] * records.num_rows
        for k, data in self.iter_bytes(records):
            out[k] = data
        return out

    def row(self, rec: dict[str, Any]) -> Optional[bytes]:
        """The bytes of one record (a dict with some of RECORD_COLUMNS), for per-row loaders: the last few row
        groups read stay cached, so rows in src_row order read each row group once."""
        if rec.get("bytes"):
            return rec["bytes"]
        src = rec.get("src_row")
        if src is not None and src >= 0:
            return self._download_row(int(src), rec.get("id")) or None  # never the unvetted path (module doc)
        return _path_bytes(rec.get("path"))

    def _download_row(self, src: int, rid: Optional[str]) -> Optional[bytes]:
        if self._pf is None:
            if not self.path.is_file():
                return None
            self._pf = pq.ParquetFile(self.path)
            self._starts = _group_starts(self._pf)
        if src >= self._starts[-1]:
            return None
        g = int(np.searchsorted(self._starts, src, side="right") - 1)
        if g not in self._cache:
            t = self._pf.read_row_group(g, columns=["id", "bytes"])
            self._cache[g] = (t.column("id").combine_chunks(), t.column("bytes").combine_chunks())
            while len(self._cache) > self.cached_groups:
                self._cache.popitem(last=False)
        self._cache.move_to_end(g)
        ids, data = self._cache[g]
        i = src - int(self._starts[g])
        return data[i].as_py() if ids[i].as_py() == rid else None


def record_bytes(record_path: Path, positions: np.ndarray, work_dir: Path, shard: int
                 ) -> Iterator[tuple[int, Optional[bytes]]]:
    """(k, bytes of row positions[k] of image record shard `record_path`, index `shard`) for every k: inline bytes
    read one record row group at a time, then the rest through ImageSource (one pass over its row groups)."""
    positions = np.asarray(positions, dtype=np.int64)
    cols = record_columns(record_path)
    done = np.zeros(len(positions), bool)
    if "bytes" in cols:
        for ks, table in iter_take(record_path, positions, ["bytes"]):
            col = table.column("bytes")
            for i in np.flatnonzero(_nonempty(col)):
                done[ks[i]] = True
                yield int(ks[i]), col[int(i)].as_py()
    rest = np.flatnonzero(~done)
    if rest.size:
        meta = take_rows(record_path, positions[rest], [c for c in cols if c != "bytes"])
        for k, data in ImageSource(work_dir, shard).iter_bytes(meta):
            yield int(rest[k]), data
