"""Near-duplicate helpers over in-memory arrays, kept as references: `threshold_for_fraction` (the quantile mode's
threshold from every pair, O(pairs): connected components over the items of the pairs only) is what the stage's
spanning-forest threshold (semdedup.forest_threshold) is tested against. The whole-pool faiss search
(`near_duplicate_pairs`, k nearest neighbours per item) + Union-Find + centroid keeper (`groups_and_keepers`) is the
former stage's algorithm, kept as the reference the stage is tested against and for benchmarks/dedup_scale.py; the
stage itself searches all pairs inside k-means clusters (semdedup.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:  # path compression
            p[a], a = root, p[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index becomes the root: groups do not depend on pair order
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def build_index(x: np.ndarray, kind: str = "flat", nlist: int = 1024, nprobe: int = 16, seed: int = 0):
    import faiss

    d = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(nlist, len(x) // 39))  # faiss wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(len(x), size=min(len(x), nlist * 256), replace=False)] if len(x) > nlist * 256 else x
        index.cp.seed = seed
        index.train(np.ascontiguousarray(sample))
        index.nprobe = nprobe
    else:
        raise ValueError(f"dedup.index must be flat or ivf, got {kind!r}")
    index.add(x)
    return index


def _unique_pairs(pairs: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique pairs, each with its smallest distance (a pair is found from both ends)."""
    if not len(pairs):
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    order = np.lexsort((dist, pairs[:, 1], pairs[:, 0]))
    pairs, dist = pairs[order], dist[order]
    first = np.ones(len(pairs), bool)
    first[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
    return pairs[first], dist[first]


def chunk_pairs(index, x: np.ndarray, start: int, stop: int, k: int, threshold: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """(m, 2) int64 pairs (i < j) among queries start..stop-1 with cosine distance 1 - <xi, xj> < threshold, and
    their (m,) float32 distances."""
    k = min(k + 1, len(x))  # +1: a vector finds itself
    sims, nbrs = index.search(np.ascontiguousarray(x[start:stop]), k)
    q = np.repeat(np.arange(start, stop), k).reshape(-1, k)
    ok = (nbrs >= 0) & (nbrs != q) & (1.0 - sims < threshold)
    a, b = q[ok], nbrs[ok]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.int64)
    return _unique_pairs(pairs, (1.0 - sims[ok]).astype(np.float32))


def near_duplicate_pairs(x: np.ndarray, threshold: float, k: int = 16, index: str = "flat", nlist: int = 1024,
                         nprobe: int = 16, chunk: int = 16384, cache_dir: Optional[Path] = None,
                         seed: int = 0, progress: bool = False, with_distances: bool = False
                         ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """All pairs found (and, with_distances, their cosine distances); each query chunk's pairs are cached in
    cache_dir (atomically, pairs and distances in one (m, 3) float64 array), so a killed run resumes."""
    from tqdm.auto import tqdm

    if len(x) < 2:
        empty = np.zeros((0, 2), np.int64)
        return (empty, np.zeros(0, np.float32)) if with_distances else empty
    idx = None
    parts = []
    starts = list(range(0, len(x), chunk))
    for start in tqdm(starts, desc="neighbour search", unit="chunk", disable=not progress):
        cached = cache_dir / f"pairdist-{start:012d}.npy" if cache_dir else None
        if cached is not None and cached.is_file():
            parts.append(np.load(cached, allow_pickle=False))
            continue
        if idx is None:
            idx = build_index(x, index, nlist, nprobe, seed)
        pairs, dist = chunk_pairs(idx, x, start, min(start + chunk, len(x)), k, threshold)
        # float64 holds row numbers exactly up to 2^53 and the float32 distances exactly
        p = np.column_stack([pairs.astype(np.float64), dist.astype(np.float64)])
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, p, allow_pickle=False)
            tmp.replace(cached)
        parts.append(p)
    allp = np.concatenate(parts)
    pairs, dist = _unique_pairs(allp[:, :2].astype(np.int64), allp[:, 2].astype(np.float32))
    return (pairs, dist) if with_distances else pairs


def removed_by_threshold(n: int, pairs: np.ndarray, dist: np.ndarray, threshold: float) -> int:
    """Items Union-Find would remove with pairs closer than `threshold`: n minus the connected components (n is
    kept for the signature; the graph holds the items of the selected pairs only)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    sel = dist < threshold
    if not sel.any():
        return 0
    # only the items in a selected pair (an isolated item is its own component): O(pairs), not O(n)
    nodes, inv = np.unique(pairs[sel].ravel(), return_inverse=True)
    inv = inv.reshape(-1, 2)
    m = len(nodes)
    graph = coo_matrix((np.ones(len(inv), np.int8), (inv[:, 0], inv[:, 1])), shape=(m, m))
    return m - int(connected_components(graph, directed=False)[0])


def threshold_for_fraction(n: int, pairs: np.ndarray, dist: np.ndarray, fraction: float) -> tuple[float, int]:
    """The smallest distance threshold (just above one found pair's distance) at which Union-Find removes at least
    `fraction` of the n items, and the count it removes; (max distance seen, its count) when even every found pair
    removes less. Bisection over the sorted pair distances: removals only grow with the threshold."""
    target = int(np.ceil(fraction * n))
    cuts = np.unique(dist)
    if target <= 0 or not len(cuts):
        return 0.0, 0
    lo, hi = 0, len(cuts) - 1

    def above(i: int) -> float:  # the threshold that just keeps pairs at distance cuts[i]
        return float(np.nextafter(cuts[i], np.float32(np.inf)))

    def removed(i: int) -> int:
        return removed_by_threshold(n, pairs, dist, above(i))

    best = removed(hi)  # the count at `hi`, kept so no threshold is counted twice
    if best < target:
        return above(hi), best
    while lo < hi:
        mid = (lo + hi) // 2
        r = removed(mid)
        if r >= target:
            hi, best = mid, r
        else:
            lo = mid + 1
    return above(hi), best

def groups_and_keepers(x: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(root of each row, keep mask): in every group of >= 2 the member with the highest cosine to the group's
    mean vector is kept (ties: the lowest row)."""
    uf = UnionFind(len(x))
    for a, b in pairs:
        uf.union(int(a), int(b))
    roots = uf.roots()
    keep = np.ones(len(x), dtype=bool)
    if len(pairs) == 0:
        return roots, keep
    order = np.argsort(roots, kind="stable")
    r_sorted = roots[order]
    bounds = np.flatnonzero(np.diff(r_sorted)) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        v = x[members].astype(np.float64)
        centroid = v.mean(axis=0)
        best = members[int(np.argmax(v @ centroid))]  # argmax returns the first maximum -> lowest row
        keep[members] = False
        keep[best] = True
    return roots, keep
