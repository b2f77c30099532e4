"""Semantic dedup inside k-means clusters (the SemDeDup / NeMo Curator layout), the second step of dedup.py.

Items are named by their global position (shard offset + row) in the embedding shards. Steps:
- assign (per shard): each exact survivor goes to its nearest centre as a member and to its second-nearest as a
  guest; records (cluster, role, pos) saved sorted by (cluster, role, pos).
- pairs (per bucket of whole clusters, or per square tile of a cluster above the budget, `buckets`): all pairs member x member and member x guest of every cluster
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


Unit = tuple[int, int, int, int, int]  # (cluster lo, cluster hi, tile row lo, col lo, tile size); tile size 0 = whole


def buckets(sizes: np.ndarray, budget: int, members: np.ndarray | None = None) -> list[Unit]:
    """The resumable units of the pair search, each holding at most `budget` members + guests: runs of consecutive
    whole clusters, and for a cluster above the budget (k-means clusters are uneven) square tiles of it: member
    rows [r, r + t) against member + guest columns [c, c + t), t = budget // 2, the tiles below the diagonal of
    the member part skipped (those pairs are found from the other side). `members`: member count per cluster."""
    members = sizes if members is None else members
    tile = budget // 2
    if tile < 1:
        raise StageError(f"dedup.bucket_items must be >= 2, got {budget}")
    out: list[Unit] = []
    lo, total = 0, 0

    def close(hi: int) -> None:
        if hi > lo:
            out.append((lo, hi, 0, 0, 0))

    for c, n in enumerate(sizes.tolist()):
        if n > budget:
            close(c)
            n_m = int(members[c])
            for r in range(0, n_m, tile):
                for col in range(0, n, tile):
                    if col + tile <= r and col + tile <= n_m:  # entirely below the diagonal, members only
                        continue
                    out.append((c, c + 1, r, col, tile))
            lo, total = c + 1, 0
            continue
        if total + n > budget and c > lo:
            close(c)
            lo, total = c, 0
        total += n
    close(len(sizes))
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
    return tile_pairs(members, xm, 0, cols_pos, cols, 0, len(members), threshold, block)


def tile_pairs(row_pos: np.ndarray, xr: np.ndarray, row_lo: int, col_pos: np.ndarray, xc: np.ndarray, col_lo: int,
               n_members: int, threshold: float, block: int) -> np.ndarray:
    """One tile of a cluster's search: member rows row_lo.. (positions row_pos, vectors xr) against columns
    col_lo.. of the cluster's members-then-guests order. Member x member pairs are kept once (column index above
    the row's), member x guest pairs always."""
    found_a, found_b, found_d = [], [], []
    for lo in range(0, len(row_pos), block):
        sims = xr[lo:lo + block] @ xc.T
        r, c = np.nonzero(1.0 - sims < threshold + SLACK)
        j, i = c + col_lo, r + lo + row_lo
        ok = (j >= n_members) | (j > i)
        r, c = r[ok] + lo, c[ok]
        exact = 1.0 - np.einsum("ij,ij->i", xr[r].astype(np.float64), xc[c].astype(np.float64))
        found_a.append(row_pos[r])
        found_b.append(col_pos[c])
        found_d.append(exact.astype(np.float32))
    if not found_a:
        return np.zeros(0, PAIRS)
    a, b, dist = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_d)
    keep = dist < threshold
    return unique_pairs(a[keep], b[keep], dist[keep])


def bucket_pairs(assign_paths: Sequence[Path], unit: Unit, rows: Rows, threshold: float,
                 block: int) -> np.ndarray:
    """The pairs of one unit of `buckets` (its assignment records read by cluster range), unique over it. A tile
    gathers only its own rows and columns, so its memory is the tile's, not the cluster's."""
    lo, hi, row_lo, col_lo, tile = unit
    rec = read_range(assign_paths, "cluster", lo, hi, ASSIGN)
    rec = rec[np.lexsort((rec["pos"], rec["role"], rec["cluster"]))]
    if not tile:
        return bucket_pairs_from(rec, rows.take(rec["pos"]), threshold, block)
    n_members = int((rec["role"] == 0).sum())
    row_pos = rec["pos"][row_lo:min(row_lo + tile, n_members)]
    col_pos = rec["pos"][col_lo:col_lo + tile]
    return tile_pairs(row_pos, rows.take(row_pos), row_lo, col_pos, rows.take(col_pos), col_lo, n_members,
                      threshold, block)


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
