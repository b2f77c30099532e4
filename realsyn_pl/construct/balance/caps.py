"""Semantic balance sampling, the array part: the similarity window and the nested per-cluster cap (RealSyn §3.3).

Cap (MetaCLIP-style): a cluster of n pairs keeps all n if n <= t, else a uniform random sample of t. Every pair gets
a key drawn from a hash of (seed, id); inside its cluster the pairs are ranked by key and cap t keeps ranks < t.
The t smallest of i.i.d. uniform keys are a uniform t-subset, and because one ranking serves every cap, the
subsets are nested (t=20 within 35 within 180) and do not depend on shard layout, rank count or row order.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np

from realsyn_pl.construct.engine.config import WindowConfig


def window_bounds(sims: np.ndarray, w: WindowConfig) -> tuple[float, float]:
    """(low, high): the configured cosines, or the q_low / q_high quantiles of the observed similarities (for an
    embedding model whose scale differs from EVA02-CLIP's, matching the paper's removed fraction instead)."""
    if w.mode == "absolute":
        lo, hi = float(w.low), float(w.high)
    elif w.mode == "quantile":
        if not 0.0 <= w.q_low < w.q_high <= 1.0:
            raise ValueError(f"window quantiles need 0 <= q_low < q_high <= 1, got {w.q_low}, {w.q_high}")
        finite = sims[np.isfinite(sims)]
        if len(finite) == 0:
            raise ValueError("no similarities to take window quantiles of")
        lo, hi = (float(v) for v in np.quantile(finite, [w.q_low, w.q_high]))
    else:
        raise ValueError(f"window.mode must be absolute or quantile, got {w.mode!r}")
    if lo > hi:
        raise ValueError(f"window low {lo} > high {hi}")
    return lo, hi


def window_reason(sim: float, lo: float, hi: float) -> Optional[str]:
    """Keep lo <= sim <= hi (both ends inclusive, as the paper's 0.51 <= sim <= 0.61)."""
    if not np.isfinite(sim):
        return "no_similarity"
    if sim < lo:
        return "below_window"
    if sim > hi:
        return "above_window"
    return None


def draw_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    """A uint64 per id from blake2b(seed, id): the same id always gets the same key for a seed."""
    salt = str(int(seed)).encode()
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=salt).digest(), "little")
                        for i in ids), dtype=np.uint64, count=len(ids))


def cluster_ranks(clusters: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Rank (0-based) of every item inside its cluster, by key (ties, practically impossible, by position)."""
    n = len(clusters)
    order = np.lexsort((np.arange(n), keys, clusters))
    ranks = np.empty(n, np.int64)
    c_sorted = clusters[order]
    starts = np.r_[0, np.flatnonzero(np.diff(c_sorted)) + 1] if n else np.zeros(0, np.int64)
    first = np.repeat(starts, np.diff(np.r_[starts, n])) if n else starts
    ranks[order] = np.arange(n) - first
    return ranks


def cap_sizes(clusters: np.ndarray, ranks: np.ndarray, caps: Sequence[int]) -> dict[int, int]:
    return {int(t): int((ranks < t).sum()) for t in caps}
