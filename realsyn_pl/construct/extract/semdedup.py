"""Semantic dedup inside k-means clusters (the SemDeDup / NeMo Curator layout), the second step of dedup.py.

Items are named by their global position (shard offset + row) in the embedding shards. Steps:
- assign (per shard): each exact survivor goes to its nearest centre as a member and to its second-nearest as a
  guest; records (cluster, role, pos) saved sorted by (cluster, role, pos).
- pairs (per bucket of whole clusters, `buckets`): all pairs member x member and member x guest of every cluster
  with cosine distance < threshold, found by blocked matmuls (no k-nearest-neighbour cap: an item with 50 near
  copies finds all 50, where the old faiss search saw its k nearest only). The guests catch pairs straddling a
  border: a pair is missed only when neither item's two nearest centres include the other's nearest one.
  Candidate distances come from float32 blocks; the kept ones are recomputed in float64, so a distance does not
  depend on block shapes (the same bytes on any number of ranks).
- reduce (rank 0, O(pairs)): unique pairs, the quantile threshold, connected components over the items that occur
  in pairs only (relabelled with np.unique) -> (pos, group) sorted by group.
- keepers (per part of the groups): gather just the members' embedding rows from the memory-mapped shards; the
  member with the highest dot product with the group's mean vector is kept (ties: the lowest position), the
  others point at it; saved (pos, keeper) sorted by pos.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from realsyn_pl.construct.engine.partition import read_range
from realsyn_pl.construct.engine.stage import StageError

ASSIGN = np.dtype([("cluster", "<i8"), ("role", "u1"), ("pos", "<i8")])  # role 0 member, 1 guest
PAIRS = np.dtype([("a", "<i8"), ("b", "<i8"), ("dist", "<f4")])
GROUPS = np.dtype([("pos", "<i8"), ("group", "<i8")])
KEEPERS = np.dtype([("pos", "<i8"), ("keeper", "<i8")])
SLACK = 1e-4  # float32 blocks may miss a pair by rounding; candidates within this margin are recomputed exactly


class Rows:
    """Embedding rows by global position, gathered from memory-mapped shards (offsets: first position per shard)."""

    def __init__(self, arrays: Sequence[np.ndarray], offsets: np.ndarray):
        self.arrays, self.offsets = arrays, offsets

    def take(self, pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos, np.int64)
        width = next((a.shape[1] for a in self.arrays if a.ndim == 2 and len(a)), 0)
        out = np.zeros((len(pos), width), np.float32)
        shard = np.searchsorted(self.offsets, pos, "right") - 1
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            rows = pos[sel] - self.offsets[s]
            order = np.argsort(rows, kind="stable")  # increasing rows: sequential reads of the memory map
            out[sel[order]] = np.asarray(self.arrays[s][rows[order]], np.float32)
        return out


def assign_records(pos: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Member records (nearest centre) and guest records (second-nearest, where there is one)."""
    member = np.zeros(len(pos), ASSIGN)
    member["cluster"], member["pos"] = labels[:, 0], pos
    parts = [member]
    if labels.shape[1] > 1:
        ok = (labels[:, 1] >= 0) & (labels[:, 1] != labels[:, 0])
        guest = np.zeros(int(ok.sum()), ASSIGN)
        guest["cluster"], guest["role"], guest["pos"] = labels[ok, 1], 1, pos[ok]
        parts.append(guest)
    return np.concatenate(parts)


def buckets(sizes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive cluster ranges [lo, hi) of at most `budget` members + guests each (one-line StageError for a
    cluster above it, before any pair is searched)."""
    big = np.flatnonzero(sizes > budget)
    if len(big):
        raise StageError(f"dedup: cluster {int(big[0])} has {int(sizes[big[0]])} members + guests, above "
                         f"dedup.bucket_items={budget}; lower dedup.cluster_size or raise dedup.bucket_items")
    out, lo, total = [], 0, 0
    for c, n in enumerate(sizes.tolist()):
        if total + n > budget and c > lo:
            out.append((lo, c))
            lo, total = c, 0
        total += n
    if len(sizes):
        out.append((lo, len(sizes)))
    return out


def unique_pairs(a: np.ndarray, b: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Sorted unique (a < b) pairs, each with its smallest distance."""
    rec = np.zeros(len(a), PAIRS)
    rec["a"], rec["b"], rec["dist"] = np.minimum(a, b), np.maximum(a, b), dist
    rec = rec[np.lexsort((rec["dist"], rec["b"], rec["a"]))]
    first = np.ones(len(rec), bool)
    first[1:] = (rec["a"][1:] != rec["a"][:-1]) | (rec["b"][1:] != rec["b"][:-1])
    return rec[first]


def cluster_pairs(members: np.ndarray, xm: np.ndarray, guests: np.ndarray, xg: np.ndarray, threshold: float,
                  block: int) -> np.ndarray:
    """Pairs with cosine distance < threshold among one cluster's members (positions ascending, rows xm) and
    between its members and its guests (xg)."""
    cols_pos = np.concatenate([members, guests])
    cols = np.concatenate([xm, xg]) if len(xg) else xm
    found_a, found_b, found_d = [], [], []
    for lo in range(0, len(members), block):
        sims = xm[lo:lo + block] @ cols.T
        r, c = np.nonzero(1.0 - sims < threshold + SLACK)
        ok = (c >= len(members)) | (c > r + lo)  # member x member once (upper triangle), every member x guest
        r, c = r[ok] + lo, c[ok]
        exact = 1.0 - np.einsum("ij,ij->i", xm[r].astype(np.float64), cols[c].astype(np.float64))
        found_a.append(members[r])
        found_b.append(cols_pos[c])
        found_d.append(exact.astype(np.float32))
    if not found_a:
        return np.zeros(0, PAIRS)
    a, b, dist = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_d)
    keep = dist < threshold
    return unique_pairs(a[keep], b[keep], dist[keep])


def bucket_pairs(assign_paths: Sequence[Path], lo: int, hi: int, rows: Rows, threshold: float,
                 block: int) -> np.ndarray:
    """The pairs of clusters [lo, hi) (their assignment records read by range), unique over the bucket."""
    rec = read_range(assign_paths, "cluster", lo, hi, ASSIGN)
    rec = rec[np.lexsort((rec["pos"], rec["role"], rec["cluster"]))]
    return bucket_pairs_from(rec, rows.take(rec["pos"]), threshold, block)


def bucket_pairs_from(rec: np.ndarray, x: np.ndarray, threshold: float, block: int) -> np.ndarray:
    """Pairs of the assignment records `rec` (sorted by cluster, role, pos; `x` their rows), unique."""
    cuts = np.flatnonzero(np.diff(rec["cluster"])) + 1
    parts = []
    for sel in np.split(np.arange(len(rec)), cuts):
        m = sel[rec["role"][sel] == 0]
        g = sel[rec["role"][sel] == 1]
        if len(m):
            parts.append(cluster_pairs(rec["pos"][m], x[m], rec["pos"][g], x[g], threshold, block))
    if not parts:
        return np.zeros(0, PAIRS)
    p = np.concatenate(parts)
    return unique_pairs(p["a"], p["b"], p["dist"])


def components(pairs: np.ndarray) -> np.ndarray:
    """(pos, group) of every item in a pair, sorted by (group, pos); group = the smallest position in it."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, inv = np.unique(np.concatenate([pairs["a"], pairs["b"]]), return_inverse=True)
    m = len(nodes)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (inv[:len(pairs)], inv[len(pairs):])), shape=(m, m))
    _, label = connected_components(graph, directed=False)
    smallest = np.full(label.max() + 1 if m else 0, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(smallest, label, nodes)  # nodes ascending, so group ids do not depend on scipy's labelling
    out = np.zeros(m, GROUPS)
    out["pos"], out["group"] = nodes, smallest[label]
    return out[np.lexsort((out["pos"], out["group"]))]


def keepers(groups: np.ndarray, rows: Rows) -> np.ndarray:
    """(pos, keeper) for the members of the given whole groups (sorted by group, pos), sorted by pos."""
    out = np.zeros(len(groups), KEEPERS)
    out["pos"] = groups["pos"]
    x = rows.take(groups["pos"]).astype(np.float64)
    cuts = np.flatnonzero(np.diff(groups["group"])) + 1
    for sel in np.split(np.arange(len(groups)), cuts):
        if not len(sel):
            continue
        v = x[sel]
        best = groups["pos"][sel[int(np.argmax(v @ v.mean(axis=0)))]]  # first maximum: the lowest position
        out["keeper"][sel] = best
    return out[np.argsort(out["pos"], kind="stable")]


def group_parts(groups: np.ndarray, parts: int) -> list[np.ndarray]:
    """`groups` cut into `parts` slices at group boundaries, of about equal size."""
    if not len(groups):
        return [groups[:0] for _ in range(parts)]
    starts = np.flatnonzero(np.r_[True, groups["group"][1:] != groups["group"][:-1]])
    want = np.arange(1, parts) * len(groups) // parts
    cut = np.r_[starts, len(groups)][np.searchsorted(starts, want)]  # the first group start at or after each cut
    bounds = np.r_[0, cut, len(groups)]
    return [groups[bounds[p]:bounds[p + 1]] for p in range(parts)]


def lookup(paths: Sequence[Path], pos: np.ndarray) -> np.ndarray:
    """The keeper of each position (itself where it is in no group), from the keeper files sorted by pos."""
    out = np.asarray(pos, np.int64).copy()
    for p in paths:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        if not len(arr) or not len(out):
            continue
        col = arr["pos"]
        i = np.minimum(np.searchsorted(col, pos), len(arr) - 1)
        hit = np.asarray(col[i]) == pos
        out[hit] = np.asarray(arr["keeper"][i[hit]])
    return out
