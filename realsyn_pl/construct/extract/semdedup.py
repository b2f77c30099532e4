"""Semantic dedup inside k-means clusters (the SemDeDup / NeMo Curator layout), the second step of dedup.py.

Items are named by their global position (shard offset + row) in the embedding shards. Steps:
- assign (per shard): each exact survivor goes to its nearest centre as a member and to its second-nearest as a
  guest; records (cluster, role, pos) saved sorted by (cluster, role, pos), and beside them the items' rows in the
  same order (`rows_path`), so a pair unit reads one contiguous slice of each file, not rows at random.
- pairs (per bucket of whole clusters, or per square tile of a cluster above the budget, `buckets`): every pair
  member x member and member x guest of a cluster with cosine distance < threshold, found by blocked matmuls (no
  k-nearest-neighbour cap). The guests catch pairs straddling a border: a pair is missed only when neither item's
  two nearest centres include the other's nearest one. Candidates come from float32 blocks; those the float32
  value cannot decide (within SLACK of the threshold, or every one where the threshold is a quantile and the
  distance itself matters) are recomputed in float64, in chunks of a fixed size. A unit does not write its pairs
  (a group of n near copies has n^2 / 2): it folds them, `pair_chunk` at a time, into a minimum spanning forest
  (`Forest`) and writes its edges, at most one per item. For every threshold t the forest's edges below t connect
  exactly the items all pairs below t connect (Kruskal), so the groups and the quantile threshold are unchanged.
- reduce (one task, O(grouped items)): the units' forests folded into one, the quantile threshold (the
  count removed at a threshold is the number of forest edges below it), connected components -> (pos, group)
  sorted by group, and the bounds of the keeper parts.
- keepers (per part of the groups): the members' rows gathered in chunks of whole groups (a group above the chunk
  in two streaming passes); the member with the highest dot product with the group's mean vector is kept (ties:
  the lowest position), the others point at it; saved (pos, keeper) sorted by pos.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from realsyn_pl.construct.engine import products
from realsyn_pl.construct.engine.arrays import save_npy
from realsyn_pl.construct.engine.partition import range_bounds
from realsyn_pl.construct.engine.stage import StageError

ASSIGN = np.dtype([("cluster", "<i8"), ("role", "u1"), ("pos", "<i8")])  # role 0 member, 1 guest
PAIRS = np.dtype([("a", "<i8"), ("b", "<i8"), ("dist", "<f4")])
GROUPS = np.dtype([("pos", "<i8"), ("group", "<i8")])
KEEPERS = np.dtype([("pos", "<i8"), ("keeper", "<i8")])
SLACK = 1e-4  # float32 blocks may miss a pair by rounding; candidates within this margin are recomputed exactly
GATHER_BYTES = 64 << 20  # float64 rows gathered at once to recompute distances exactly
KEEPER_BYTES = 256 << 20  # float64 rows one keeper step holds
EDGE_BYTES = 160  # peak bytes per candidate pair while a chunk is folded into the forest (buffers, sorts, graph)


def rows_path(assign_path: Path) -> Path:
    """The rows beside an assignment file, in the records' order."""
    return Path(assign_path).with_suffix(".rows.npy")


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


def save_assignment(path: Path, pos: np.ndarray, labels: np.ndarray, x: np.ndarray) -> int:
    """One shard's assignment records (positions `pos` ascending, `labels` from the centres' search) sorted by
    (cluster, role, pos), and beside them (`rows_path`) the items' rows `x` in the same order, so a pair unit reads
    one slice of each file. The rows are written first: the records file is the one a reader checks. Returns how
    many records."""
    rec = assign_records(pos, labels)
    order = np.lexsort((rec["pos"], rec["role"], rec["cluster"]))
    rec = rec[order]
    save_npy(rows_path(path), np.ascontiguousarray(x[np.searchsorted(pos, rec["pos"])]))
    save_npy(path, rec)
    return len(rec)


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


def task_memory_bound(bucket_items: int, block: int, pair_chunk: int, width: int) -> int:
    """Bytes of working memory one pair unit holds at most, whatever its clusters' or groups' sizes: its rows as
    float32 and their records, one block of similarities with its masks, the candidates of one chunk as they are
    folded into the forest (which holds at most one edge per item), and the float64 gather."""
    rows = bucket_items * (3 * 4 * width + ASSIGN.itemsize + 12)  # the unit's rows, one cluster's two copies
    block_bytes = block * bucket_items * (4 + 3)  # float32 distances, candidate and diagonal masks
    chunk = 2 * max(pair_chunk, bucket_items) * EDGE_BYTES
    return rows + block_bytes + chunk + 3 * bucket_items * PAIRS.itemsize + GATHER_BYTES


def unique_pairs(a: np.ndarray, b: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Sorted unique (a < b) pairs, each with its smallest distance."""
    rec = np.zeros(len(a), PAIRS)
    rec["a"], rec["b"], rec["dist"] = np.minimum(a, b), np.maximum(a, b), dist
    rec = rec[np.lexsort((rec["dist"], rec["b"], rec["a"]))]
    first = np.ones(len(rec), bool)
    first[1:] = (rec["a"][1:] != rec["a"][:-1]) | (rec["b"][1:] != rec["b"][:-1])
    return rec[first]


def spanning_forest(edges: np.ndarray, by_distance: bool = True) -> np.ndarray:
    """The minimum spanning forest of `edges` (PAIRS; a pair given twice counts at its smallest distance), sorted by
    (a, b). Edges are ranked by (dist, a, b) (by_distance=False: by (a, b), where only which items connect matters),
    a total order, so the forest is unique and the same from any order or split of the input: the forest of forests
    is the forest of the union."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    e = unique_pairs(edges["a"], edges["b"], edges["dist"])
    if len(e) < 2:
        return e
    n = len(e)
    order = np.lexsort((e["b"], e["a"], e["dist"])) if by_distance else np.arange(n)
    rank = np.empty(n, np.float64)
    rank[order] = np.arange(1, n + 1)  # weights > 0: a sparse graph drops zero-weight edges
    nodes, inv = np.unique(np.concatenate([e["a"], e["b"]]), return_inverse=True)
    del nodes
    graph = csr_matrix((rank, (inv[:n], inv[n:])), shape=(int(inv.max()) + 1,) * 2)
    del rank, inv
    kept = minimum_spanning_tree(graph).data.astype(np.int64) - 1
    return e[np.sort(order[kept])]


class Forest:
    """A minimum spanning forest built from pairs added in any number of chunks; at most max(`chunk`, the forest's
    size) pairs wait before they are folded in, so memory is O(items + chunk) however many pairs arrive, and the
    folds cost O(pairs log pairs) in all."""

    def __init__(self, chunk: int, by_distance: bool = True):
        self.chunk, self.edges, self.waiting, self.n_waiting = chunk, np.zeros(0, PAIRS), [], 0
        self.seen, self.by_distance = 0, by_distance

    def add(self, pairs: np.ndarray) -> None:
        self.waiting.append(pairs)
        self.n_waiting += len(pairs)
        self.seen += len(pairs)
        # at least as many waiting as the forest holds: each fold sorts O(forest + waiting), so folding a forest of
        # F items every `chunk` pairs would cost O(F) per chunk, quadratic over a reduce of F-sized forests
        if self.n_waiting >= max(self.chunk, len(self.edges)):
            self.fold()

    def fold(self) -> None:
        if self.waiting:
            both = np.concatenate([self.edges, *self.waiting])
            self.waiting, self.n_waiting = [], 0
            self.edges = spanning_forest(both, self.by_distance)

    def result(self) -> np.ndarray:
        self.fold()
        return self.edges


def exact_distances(xr: np.ndarray, r: np.ndarray, xc: np.ndarray, c: np.ndarray) -> np.ndarray:
    """1 - <xr[r], xc[c]> in float64, in chunks of GATHER_BYTES, rounded to float32: a distance that does not
    depend on block shapes."""
    out = np.empty(len(r), np.float32)
    step = max(1, GATHER_BYTES // (16 * max(1, xr.shape[1])))
    for lo in range(0, len(r), step):
        a, b = r[lo:lo + step], c[lo:lo + step]
        out[lo:lo + step] = 1.0 - np.einsum("ij,ij->i", xr[a].astype(np.float64), xc[b].astype(np.float64))
    return out


class Links:
    """A component label per item of one unit, for an absolute threshold, where only which items connect matters:
    a pair of items already connected adds nothing to the groups, so after the first block of a dense group its
    later blocks yield only the pairs that join two components. The pairs handled per unit are then O(block x
    columns + items) instead of the m^2 / 2 of an m-item group."""

    def __init__(self, n: int):
        self.label = np.arange(n, dtype=np.int64)

    def join(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the components of items a[i] and b[i] (O(items + pairs) per call)."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        if not len(a):
            return
        n = len(self.label)
        graph = coo_matrix((np.ones(len(a), np.int8), (self.label[a], self.label[b])), shape=(n, n))
        self.label = connected_components(graph, directed=False)[1][self.label].astype(np.int64)

    def apart(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.label[a] != self.label[b]


def one_per_component_pair(lk: Links, a: np.ndarray, b: np.ndarray, sure: np.ndarray) -> np.ndarray:
    """Keep mask: every pair but the `sure` ones (certainly closer than the join limit) that join the same two
    components as an earlier sure pair of the chunk: once joined, those would be inside one component. So a row of a
    dense group's later blocks that meets the group's component yields one pair, not one per column (the tiles off
    the diagonal, whose rows are not yet columns)."""
    keep = np.ones(len(a), bool)
    idx = np.flatnonzero(sure)
    if len(idx) < 2:
        return keep
    la, lb = lk.label[a[idx]], lk.label[b[idx]]
    pair = np.minimum(la, lb) * len(lk.label) + np.maximum(la, lb)
    first = np.unique(pair, return_index=True)[1]
    keep[idx] = False
    keep[idx[first]] = True
    return keep


def tile_pairs(row_pos: np.ndarray, xr: np.ndarray, row_lo: int, col_pos: np.ndarray, xc: np.ndarray, col_lo: int,
               n_members: int, threshold: float, block: int, exact_all: bool = True, chunk: int = 1 << 20,
               device: str = "cpu", links: Optional[tuple[Links, np.ndarray, np.ndarray]] = None,
               join_below: Optional[float] = None) -> Iterator[np.ndarray]:
    """Chunks of at most max(chunk, columns) pairs (PAIRS, a < b not yet ordered) with cosine distance < threshold
    of one tile of a cluster's search: member rows row_lo.. (positions row_pos, vectors xr) against columns col_lo..
    of the cluster's members-then-guests order. Member x member pairs come once (column index above the row's),
    member x guest pairs always. The float32 blocks run on `device` (products.py); exact_all: every distance
    recomputed in float64 (the quantile mode ranks them), else only those float32 cannot decide. links: (Links,
    the unit's item index of each row, of each column): pairs already connected are left out, those closer than
    `join_below` (default: the threshold) joined; a pair left out is redundant at any threshold above join_below,
    its items being connected by pairs closer than it (the cycle property of a minimum spanning forest)."""
    labels = None
    if links is not None:
        lk, row_item, col_item = links

        def labels(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
            return lk.label[row_item[lo:hi]], lk.label[col_item]
    for r, c, d in products.candidates(xr, xc, threshold + SLACK, row_lo, col_lo, n_members, block, chunk, device,
                                       labels):
        if links is not None:  # the chunks of one block: the block's earlier chunks may have joined these
            keep = lk.apart(row_item[r], col_item[c])
            r, c, d = r[keep], c[keep], d[keep]
            keep = one_per_component_pair(lk, row_item[r], col_item[c],
                                          d < (threshold if join_below is None else join_below) - SLACK)
            r, c, d = r[keep], c[keep], d[keep]
        redo = np.ones(len(d), bool) if exact_all else d >= threshold - SLACK
        if redo.any():
            d[redo] = exact_distances(xr, r[redo], xc, c[redo])
        ok = d < threshold
        out = np.zeros(int(ok.sum()), PAIRS)
        out["a"], out["b"], out["dist"] = row_pos[r[ok]], col_pos[c[ok]], d[ok]
        if links is not None:
            joined = ok if join_below is None else d < join_below
            lk.join(row_item[r[joined]], col_item[c[joined]])
        if len(out):
            yield out


def cluster_pairs(members: np.ndarray, xm: np.ndarray, guests: np.ndarray, xg: np.ndarray, threshold: float,
                  block: int) -> np.ndarray:
    """Every pair with cosine distance < threshold among one cluster's members (positions ascending, rows xm) and
    between its members and its guests (xg), unique, with float64 distances."""
    cols_pos = np.concatenate([members, guests])
    cols = np.concatenate([xm, xg]) if len(xg) else xm
    found = list(tile_pairs(members, xm, 0, cols_pos, cols, 0, len(members), threshold, block))
    if not found:
        return np.zeros(0, PAIRS)
    p = np.concatenate(found)
    return unique_pairs(p["a"], p["b"], p["dist"])


def unit_records(assign_paths: Sequence[Path], lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The records of clusters [lo, hi) from every assignment file (one contiguous slice each, one file open at a
    time), sorted by (cluster, role, pos), with the file and row each came from."""
    recs, files, at = [], [], []
    for f, p in enumerate(assign_paths):
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        a, b = range_bounds(arr["cluster"], lo, hi)
        if b > a:
            recs.append(np.array(arr[a:b]))
            files.append(np.full(b - a, f, np.int32))
            at.append(np.arange(a, b, dtype=np.int64))
        del arr
    if not recs:
        return np.zeros(0, ASSIGN), np.zeros(0, np.int32), np.zeros(0, np.int64)
    rec, file_of, row_of = np.concatenate(recs), np.concatenate(files), np.concatenate(at)
    order = np.lexsort((rec["pos"], rec["role"], rec["cluster"]))
    return rec[order], file_of[order], row_of[order]


def unit_rows(assign_paths: Sequence[Path], file_of: np.ndarray, row_of: np.ndarray) -> np.ndarray:
    """float32 rows of the given records, read from the row files beside the assignment files (within a file the
    records keep their order, so each read is a forward pass over one slice)."""
    width, out = None, None
    for f in np.unique(file_of).tolist():
        src = np.load(rows_path(assign_paths[f]), mmap_mode="r", allow_pickle=False)
        if out is None:
            width = src.shape[1]
            out = np.zeros((len(file_of), width), np.float32)
        sel = np.flatnonzero(file_of == f)
        out[sel] = src[row_of[sel]]
        del src
    return out if out is not None else np.zeros((0, 0), np.float32)


def bucket_forest(assign_paths: Sequence[Path], unit: Unit, threshold: float, block: int, exact_all: bool,
                  chunk: int, device: str = "cpu", floor: float = 0.0) -> tuple[np.ndarray, int]:
    """(spanning forest, pairs kept) of one unit of `buckets`. A tile gathers only its own rows and columns, so its
    memory is the tile's, not the cluster's; the pairs are folded into the forest `chunk` at a time. With an absolute
    threshold (not exact_all) pairs whose items are already connected in this unit are not kept (Links): the same
    groups, from a forest of fewer candidates. With a ranked threshold (exact_all) and floor > 0, the same for the
    pairs closer than `floor`: the forest keeps every distance at or above it exact, and only the connectivity
    below it (dedup.quantile_floor)."""
    lo, hi, row_lo, col_lo, tile = unit
    rec, file_of, row_of = unit_records(assign_paths, lo, hi)
    # one index per item: an item is a member of one cluster and a guest of another, maybe both in this unit
    item = np.unique(rec["pos"], return_inverse=True)[1].reshape(-1)
    lk = None if exact_all and floor <= 0 else Links(int(item.max()) + 1 if len(item) else 0)
    join_below = floor if exact_all else None
    # with a fixed threshold only which items connect matters: the forest is ranked by positions, and the float32
    # distances that decided most edges (whose last bits depend on BLAS threads) never choose an edge
    forest = Forest(chunk, by_distance=exact_all)
    if not tile:
        x = unit_rows(assign_paths, file_of, row_of)
        cuts = np.flatnonzero(np.diff(rec["cluster"])) + 1
        for sel in np.split(np.arange(len(rec)), cuts):
            m, g = sel[rec["role"][sel] == 0], sel[rec["role"][sel] == 1]
            if not len(m):
                continue
            cols = np.concatenate([m, g])
            for p in tile_pairs(rec["pos"][m], x[m], 0, rec["pos"][cols], x[cols], 0, len(m), threshold, block,
                                exact_all, chunk, device, None if lk is None else (lk, item[m], item[cols]),
                                join_below):
                forest.add(p)
        return _exact(forest.result(), rec["pos"], x, exact_all), forest.seen
    n_members = int((rec["role"] == 0).sum())
    rows = np.arange(row_lo, min(row_lo + tile, n_members))
    cols = np.arange(col_lo, min(col_lo + tile, len(rec)))
    xr = unit_rows(assign_paths, file_of[rows], row_of[rows])
    xc = unit_rows(assign_paths, file_of[cols], row_of[cols])
    for p in tile_pairs(rec["pos"][rows], xr, row_lo, rec["pos"][cols], xc, col_lo, n_members, threshold, block,
                        exact_all, chunk, device, None if lk is None else (lk, item[rows], item[cols]), join_below):
        forest.add(p)
    both = np.concatenate([rows, cols])
    return _exact(forest.result(), rec["pos"][both], np.concatenate([xr, xc]), exact_all), forest.seen


def _exact(edges: np.ndarray, pos: np.ndarray, x: np.ndarray, done: bool) -> np.ndarray:
    """The forest's distances in float64 (`x`: the rows of positions `pos`) unless they are already (`done`)."""
    if done or not len(edges):
        return edges
    uniq, first = np.unique(pos, return_index=True)
    a, b = first[np.searchsorted(uniq, edges["a"])], first[np.searchsorted(uniq, edges["b"])]
    edges["dist"] = exact_distances(x, a, x, b)
    return edges


def forest_threshold(n: int, dist: np.ndarray, fraction: float) -> tuple[float, int]:
    """The smallest threshold (just above one edge's distance) at which the groups remove at least `fraction` of
    the n items, and the count they remove; (just above the largest edge, every edge) when even that is less. On a
    minimum spanning forest each edge below the threshold merges two groups, so the count is the edges below it."""
    target = int(np.ceil(fraction * n))
    if target <= 0 or not len(dist):
        return 0.0, 0
    s = np.sort(np.asarray(dist, np.float32))
    cut = s[min(target, len(s)) - 1]
    return float(np.nextafter(cut, np.float32(np.inf))), int(np.searchsorted(s, cut, "right"))


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


def _keeper_of(pos: np.ndarray, x: np.ndarray) -> int:
    return int(pos[int(np.argmax(x @ x.mean(axis=0)))])  # first maximum: the lowest position


def _keeper_streamed(pos: np.ndarray, rows: Rows, step: int) -> int:
    """The keeper of one group too large to hold: its mean in one pass over chunks, the best score in another."""
    total = np.zeros(rows.take(pos[:1]).shape[1], np.float64)
    for lo in range(0, len(pos), step):
        total += rows.take(pos[lo:lo + step]).astype(np.float64).sum(axis=0)
    mean = total / len(pos)
    best, best_at = -np.inf, 0
    for lo in range(0, len(pos), step):
        score = rows.take(pos[lo:lo + step]).astype(np.float64) @ mean
        j = int(np.argmax(score))
        if score[j] > best:
            best, best_at = float(score[j]), lo + j
    return int(pos[best_at])


def keepers(groups: np.ndarray, rows: Rows, max_rows: int | None = None) -> np.ndarray:
    """(pos, keeper) for the members of the given whole groups (sorted by group, pos), sorted by pos. Rows are held
    `max_rows` at a time (whole groups; default KEEPER_BYTES of float64)."""
    out = np.zeros(len(groups), KEEPERS)
    out["pos"] = groups["pos"]
    if not len(groups):
        return out
    width = rows.take(groups["pos"][:1]).shape[1]
    step = max_rows or max(1, KEEPER_BYTES // (8 * max(1, width)))
    starts = np.flatnonzero(np.r_[True, groups["group"][1:] != groups["group"][:-1]])
    ends = np.r_[starts[1:], len(groups)]
    g = 0
    while g < len(starts):
        s0 = starts[g]
        if ends[g] - s0 > step:
            out["keeper"][s0:ends[g]] = _keeper_streamed(groups["pos"][s0:ends[g]], rows, step)
            g += 1
            continue
        last = max(g + 1, int(np.searchsorted(ends, s0 + step, "right")))
        x = rows.take(groups["pos"][s0:ends[last - 1]]).astype(np.float64)
        for h in range(g, last):
            a, b = starts[h] - s0, ends[h] - s0
            out["keeper"][starts[h]:ends[h]] = _keeper_of(groups["pos"][starts[h]:ends[h]], x[a:b])
        g = last
    return out[np.argsort(out["pos"], kind="stable")]


def group_bounds(groups: np.ndarray, parts: int) -> np.ndarray:
    """parts + 1 cut points of `groups` at group boundaries, parts of about equal size."""
    if not len(groups):
        return np.zeros(parts + 1, np.int64)
    starts = np.flatnonzero(np.r_[True, groups["group"][1:] != groups["group"][:-1]])
    want = np.arange(1, parts) * len(groups) // parts
    cut = np.r_[starts, len(groups)][np.searchsorted(starts, want)]  # the first group start at or after each cut
    return np.r_[0, cut, len(groups)].astype(np.int64)


def lookup(paths: Sequence[Path], pos: np.ndarray) -> np.ndarray:
    """The keeper of each position (itself where it is in no group), from the keeper files sorted by pos; of each
    file only the slice between the smallest and the largest position asked is read."""
    query = np.asarray(pos, np.int64)
    out = query.copy()
    if not len(out):
        return out
    lo, hi = int(query.min()), int(query.max()) + 1
    for p in paths:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        a, b = range_bounds(arr["pos"], lo, hi)
        if b > a:
            part = np.array(arr[a:b])
            i = np.minimum(np.searchsorted(part["pos"], query), len(part) - 1)
            hit = part["pos"][i] == query
            out[hit] = part["keeper"][i[hit]]
        del arr
    return out
