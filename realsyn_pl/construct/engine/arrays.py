"""Embedding array shards: `{kind}-{index:05d}.npy` (fp16 by default) aligned row by row with an id shard.

Contract
- For shard i of kind K: `K-i.npy` holds an (n, d) array and `K-i.ids.parquet` one string column `id` of length n;
  row j of the array is the embedding of id j. Rows are in the input shard's order, so a rerun writes the same bytes.
- Written ids first, then the array, each via temp + rename (records.atomic_write); a shard counts as present only
  when the stage has marked it done (stage.py), so a half-written pair is never read.
- Loading never unpickles (np.load(allow_pickle=False)); `ArrayReader` streams shard by shard, `MappedShards` maps
  shards on first use, keeps at most MAX_OPEN_MAPS of them open (least recently used first out) and travels to a
  Ray task as its paths (never as the data).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from realsyn_pl.construct.engine.records import atomic_write, read_column, write_table

DTYPES = {"float16": np.float16, "float32": np.float32}
# Memory maps one MappedShards keeps open. Each np.load(mmap_mode="r") holds a file descriptor for as long as the map
# lives (Python's mmap dups it), so a process that kept every shard of a 1,432-shard pool mapped ran out of them
# under the usual soft limit of 1,024 open files (EMFILE).
MAX_OPEN_MAPS = 64


def array_path(folder: Path, kind: str, index: int) -> Path:
    return Path(folder) / f"{kind}-{index:05d}.npy"


def ids_path(folder: Path, kind: str, index: int) -> Path:
    return Path(folder) / f"{kind}-{index:05d}.ids.parquet"


def save_npy(path: str | Path, arr: np.ndarray) -> None:
    """`arr` as one .npy file, written to a temp name and renamed (a reader never sees half a file)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def write_array_shard(folder: str | Path, kind: str, index: int, ids: Sequence[str], array: np.ndarray,
                      dtype: str = "float16") -> None:
    if len(ids) != len(array):
        raise ValueError(f"{len(ids)} ids for {len(array)} rows")
    if dtype not in DTYPES:
        raise ValueError(f"array dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_table(ids_path(folder, kind, index), pa.table({"id": pa.array(list(ids), pa.string())}))
    save_npy(array_path(folder, kind, index), np.ascontiguousarray(array, dtype=DTYPES[dtype]))


def read_array_shard(folder: str | Path, kind: str, index: int, mmap: bool = False) -> tuple[list[str], np.ndarray]:
    arr = np.load(array_path(Path(folder), kind, index), allow_pickle=False, mmap_mode="r" if mmap else None)
    ids = read_column([ids_path(Path(folder), kind, index)], "id")
    if len(ids) != len(arr):
        raise ValueError(f"{kind}-{index:05d}: {len(ids)} ids but {len(arr)} rows")
    return ids, arr


@dataclass
class ArrayReader:
    """All shards of one kind in a folder, in shard order."""

    folder: Path
    kind: str
    indices: list[int]

    @classmethod
    def open(cls, folder: str | Path, kind: str, indices: Sequence[int] | None = None) -> "ArrayReader":
        folder = Path(folder)
        if indices is None:
            indices = sorted(int(p.name[len(kind) + 1:len(kind) + 6]) for p in folder.glob(f"{kind}-?????.npy"))
        return cls(folder, kind, list(indices))

    def __iter__(self) -> Iterator[tuple[list[str], np.ndarray]]:
        for i in self.indices:
            yield read_array_shard(self.folder, self.kind, i, mmap=True)

    def __len__(self) -> int:
        return sum(np.load(array_path(self.folder, self.kind, i), mmap_mode="r", allow_pickle=False).shape[0]
                   for i in self.indices)

    def load(self, dtype: type = np.float32) -> tuple[list[str], np.ndarray]:
        """Every id and row (concatenated, converted to `dtype`); for global steps such as dedup."""
        ids: list[str] = []
        parts = []
        for shard_ids, arr in self:
            if len(shard_ids):  # an empty shard may not know the width
                ids.extend(shard_ids)
                # a copy: np.asarray of a map already in `dtype` is a view that would keep every shard's map open
                parts.append(np.array(arr, dtype=dtype))
        if not parts:
            return [], np.zeros((0, 0), dtype=dtype)
        return ids, np.concatenate(parts)


class MappedShards:
    """The `{kind}-i.npy` arrays of a folder as read-only memory maps, opened in each process on first use: a task
    that gets this object gets the paths (it pickles as them), and maps only the shards it reads. At most `max_open`
    maps stay open (each holds a file descriptor): the least recently used one is dropped when another is opened, so
    a pass over thousands of shards maps them again as it goes. A caller still holding a view of a dropped map keeps
    that one map open until it lets go."""

    def __init__(self, folder: str | Path, kind: str, indices: Sequence[int], max_open: int = MAX_OPEN_MAPS):
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.paths = [array_path(Path(folder), kind, i) for i in indices]
        self.max_open = max_open
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, slot: int) -> np.ndarray:
        arr = self._maps.get(slot)
        if arr is not None:
            self._maps.move_to_end(slot)
            return arr
        arr = np.load(self.paths[slot], mmap_mode="r", allow_pickle=False)
        self._maps[slot] = arr
        if len(self._maps) > self.max_open:
            self._maps.popitem(last=False)
        return arr

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[s] for s in range(len(self)))

    def open_maps(self) -> int:
        """How many maps this object holds open now."""
        return len(self._maps)

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths, "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.paths, self.max_open, self._maps = state["paths"], state["max_open"], OrderedDict()


def shard_sizes(folder: str | Path, kind: str, indices: Sequence[int]) -> list[int]:
    """Rows of each shard, read from the .npy headers."""
    return [len(np.load(array_path(Path(folder), kind, i), mmap_mode="r", allow_pickle=False)) for i in indices]
