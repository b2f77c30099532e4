"""`balance.sampling=random`: the random-sampling ablation of RealSyn Table 5, at the size of every balanced cap.

For cap t the balanced set keeps N_t = sum over clusters of min(size, t) in-window pairs. The random set of cap t is
N_t pairs drawn uniformly from the same in-window pool: every pair gets a seeded 64-bit key (caps.draw_keys under its
own domain, so it is independent of the keys that rank pairs inside clusters), and the set is the N_t smallest keys,
ties (practically impossible) by global position (shard, row). One order serves every cap, so the sets nest like the
caps (N_20 <= N_35 <= N_180), and they depend neither on shard layout nor on worker count.

No process holds the pool's keys: the cut (the N_t-th smallest key) is found exactly by streamed counting over the
per-shard key files (engine/ranks.py, as for the window's quantiles: four passes of 16 bits each, 65,536 bins per
wanted cut), then one pass that counts each shard's pairs equal to the cut, to decide which of those ties fall
inside. Memory: one shard's keys plus a few 65,536-bin counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from realsyn_pl.construct.balance.caps import draw_keys
from realsyn_pl.construct.engine.ranks import ranked_keys

SAMPLINGS = ("balanced", "random")
DOMAIN = "random"  # keys of the random subset; the cluster ranks' keys use no domain


def random_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    return draw_keys(ids, seed, DOMAIN)


@dataclass(frozen=True)
class Cut:
    """The random subset of `size` pairs: every pair with key < `key`, and of the pairs with key == `key` the first
    `ties[s]` (by row) of shard position s (the order of the key files)."""
    size: int
    key: int
    ties: tuple[int, ...]

    def inside(self, keys: np.ndarray, s: int) -> np.ndarray:
        """Which of shard position s's pairs (keys in row order) are in the subset."""
        if self.size == 0:
            return np.zeros(len(keys), bool)
        cut = np.uint64(self.key)
        equal = keys == cut
        return (keys < cut) | (equal & (np.cumsum(equal) <= self.ties[s]))


def _load(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False).astype(np.uint64, copy=False)


def cuts(paths: Sequence[Path], sizes: Sequence[int]) -> list[Cut]:
    """The cut of the `sizes[i]` smallest keys over the uint64 .npy files `paths` (shard order), for every i."""
    total = sum(len(np.load(p, mmap_mode="r", allow_pickle=False)) for p in paths)
    for n in sizes:
        if not 0 <= n <= total:
            raise ValueError(f"a random subset of {n} pairs asked of a pool of {total}")
    state = ranked_keys(paths, _load, [n - 1 for n in sizes if n > 0], 64)
    # state[r] = (the key of rank r, r's rank among the keys equal to it): the subset takes rank + 1 of those
    left = {r: rank + 1 for r, (_, rank) in state.items()}
    ties: dict[int, list[int]] = {r: [] for r in state}
    for p in paths:
        keys = _load(p)
        for r, (key, _) in state.items():
            take = min(int((keys == np.uint64(key)).sum()), left[r])
            ties[r].append(take)
            left[r] -= take
    return [Cut(n, state[n - 1][0], tuple(ties[n - 1])) if n > 0 else Cut(0, 0, tuple(0 for _ in paths))
            for n in sizes]


def smallest_cap(keys: np.ndarray, s: int, caps: Sequence[int], by_cap: dict[int, Cut]) -> np.ndarray:
    """Per pair of shard position s: the smallest cap whose random subset holds it, -1 for none (the sets nest)."""
    out = np.full(len(keys), -1, np.int64)
    for t in sorted(caps, reverse=True):  # smaller caps overwrite: their sets lie inside the larger ones'
        out[by_cap[t].inside(keys, s)] = t
    return out
