"""Semantic balance sampling, the array part: the nested per-cluster cap (RealSyn §3.3; the window is window.py).

Cap (MetaCLIP-style): a cluster of n pairs keeps all n if n <= t, else a uniform random sample of t. Every pair gets
a key drawn from a hash of (seed, id); inside its cluster the pairs are ranked by key and cap t keeps ranks < t.
The t smallest of i.i.d. uniform keys are a uniform t-subset, and because one ranking serves every cap, the
subsets are nested (t=20 within 35 within 180) and do not depend on shard layout, rank count or row order.
The stage ranks one range of clusters per reducer (sampler.py); cap t then keeps min(size, t) of every cluster.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np


def draw_keys(ids: Sequence[str], seed: int, domain: str = "") -> np.ndarray:
    """A uint64 per id from blake2b(seed, id): the same id always gets the same key for a seed. Another `domain`
    (e.g. the random-sampling subset's) keys the hash differently, so its keys are independent of these."""
    salt = (f"{domain}:" if domain else "").encode() + str(int(seed)).encode()
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
