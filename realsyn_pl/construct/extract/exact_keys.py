"""Exact dedup by 64-bit keys, split over ranks (the first step of dedup.py).

Map (per embedding shard): one uint64 key per embedded item (images: the first 64 bits of the `sha256` column of
the input records, hash64 of a value that is not hex; sentences: hash64 of the normalised text), saved with its (shard, row) sorted by key.
Reduce (per key range, partitions.key_range): every item whose key occurred earlier in (shard, row) order is a
duplicate of that first occurrence (its representative); the duplicates are saved sorted by (shard, row), so the
final per-shard map reads its own rows with partition.read_range. Only duplicates are written: O(duplicates).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.partition import hash64, hex64, key_range, range_bounds, read_range, save_sorted
from realsyn_pl.construct.engine.stage import StageError
from realsyn_pl.construct.extract.sentence_filters import words

KEYS = np.dtype([("key", "<u8"), ("shard", "<i4"), ("row", "<i8")])
DUPS = np.dtype([("shard", "<i4"), ("row", "<i8"), ("rep_shard", "<i4"), ("rep_row", "<i8")])


def normalised(text: str) -> str:
    """Lower-case words joined by single spaces: two texts with the same words are exact duplicates."""
    return " ".join(w.lower() for w in words(text))


def record_rows(rec_ids: pa.Array, emb_ids: Sequence[str], where: str) -> np.ndarray:
    """Row of the input records holding each embedded id (a missing record is a one-line StageError)."""
    idx = pc.index_in(pa.array(list(emb_ids), pa.string()), value_set=rec_ids)
    if idx.null_count:
        first = emb_ids[int(np.flatnonzero(idx.is_null().to_numpy(zero_copy_only=False))[0])]
        raise StageError(f"{where}: {idx.null_count} embedded item(s) have no input record, first {first}")
    return idx.to_numpy(zero_copy_only=False).astype(np.int64)


def shard_keys(rec_path: Path, kind: str, emb_ids: Sequence[str]) -> np.ndarray:
    """uint64 key of every embedded item of one shard, in embedding row order."""
    col = "sha256" if kind == "images" else "text"
    table = pq.read_table(rec_path, columns=["id", col])
    values = table.column(col).take(pa.array(record_rows(table.column("id").combine_chunks(), emb_ids,
                                                         str(rec_path)))).to_pylist()
    if kind == "images":
        return image_keys(values)
    return hash64(normalised(t or "").encode() for t in values)


def image_keys(digests: Sequence[str | None]) -> np.ndarray:
    """First 64 bits of each hex sha256; a value that is not hex (hand-made records) is hashed whole instead, and a
    missing one is 0 (all missing digests are one key, as before)."""
    out = np.zeros(len(digests), np.uint64)
    hexed = np.array([bool(h) and len(h) >= 16 and all(c in HEX for c in h[:16]) for h in digests], bool)
    if hexed.any():
        out[hexed] = hex64([digests[j] for j in np.flatnonzero(hexed)])
    other = np.flatnonzero(~hexed & np.array([bool(h) for h in digests], bool))
    if len(other):
        out[other] = hash64(digests[j].encode() for j in other)
    return out


HEX = frozenset("0123456789abcdefABCDEF")


def save_keys(path: Path, shard: int, keys: np.ndarray) -> None:
    rec = np.zeros(len(keys), KEYS)
    rec["key"], rec["shard"], rec["row"] = keys, shard, np.arange(len(keys))
    save_sorted(path, rec, "key")


def partition_size(paths: Sequence[Path], p: int, parts: int) -> int:
    """Keys partition p will hold (binary searches on the memory-mapped key files, one map at a time; nothing is
    loaded)."""
    lo, hi = key_range(p, parts)
    n = 0
    for path in paths:
        a, b = range_bounds(np.load(path, mmap_mode="r", allow_pickle=False)["key"], lo, hi)
        n += b - a
    return n


def reduce_partition(paths: Sequence[Path], p: int, parts: int, budget: int, out: Path) -> int:
    """Duplicates among the keys of partition p, each with its representative (the first occurrence in
    (shard, row) order), saved sorted by (shard, row). Returns how many."""
    n = partition_size(paths, p, parts)
    if n > budget:
        raise StageError(f"dedup exact partition {p} of {parts} holds {n} keys, above dedup.reducer_items={budget}; "
                         f"raise dedup.partitions or dedup.reducer_items (one key repeated that often also lands in "
                         f"one partition)")
    lo, hi = key_range(p, parts)
    rec = read_range(paths, "key", lo, hi, KEYS)
    rec = rec[np.lexsort((rec["row"], rec["shard"], rec["key"]))]
    first = np.ones(len(rec), bool)
    first[1:] = rec["key"][1:] != rec["key"][:-1]
    head = np.maximum.accumulate(np.where(first, np.arange(len(rec)), 0)) if len(rec) else np.zeros(0, np.int64)
    dup = ~first
    res = np.zeros(int(dup.sum()), DUPS)
    res["shard"], res["row"] = rec["shard"][dup], rec["row"][dup]
    res["rep_shard"], res["rep_row"] = rec["shard"][head[dup]], rec["row"][head[dup]]
    save_sorted(out, res, ["shard", "row"])
    return len(res)


def shard_duplicates(paths: Sequence[Path], shard: int) -> np.ndarray:
    """The duplicates of one shard (every partition's file), sorted by row."""
    d = read_range(paths, "shard", shard, shard + 1, DUPS)
    return d[np.argsort(d["row"], kind="stable")]
