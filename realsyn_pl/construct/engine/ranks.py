"""Exact order statistics of unsigned integer keys spread over many files, without holding them in one process.

Each pass counts the next 16 bits of the keys under the prefix found so far for every wanted rank (65,536 bins per
rank), so a 32-bit key takes two passes and a 64-bit key four; memory is one file's keys plus those counts. Used for
the balance window's quantiles (float32 similarities mapped to order-preserving uint32) and the random subset's cuts
(64-bit keys).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

BITS = 16
BINS = 1 << BITS


def ranked_keys(paths: Sequence[Path], load: Callable[[Path], np.ndarray], ranks: Sequence[int], width: int
                ) -> dict[int, tuple[int, int]]:
    """Per 0-based rank r over the keys `load(p)` of every file p (`width` bits each, a multiple of 16): (the key of
    rank r, r's rank among the keys equal to it)."""
    state = {int(r): (0, int(r)) for r in ranks}
    for level in range(width // BITS):
        shift = np.uint64(width - BITS * (level + 1))
        counts = {prefix: np.zeros(BINS, np.int64) for prefix, _ in state.values()}
        for p in paths:
            keys = load(p).astype(np.uint64, copy=False)
            for prefix, c in counts.items():
                under = keys if level == 0 else keys[(keys >> (shift + np.uint64(BITS))) == np.uint64(prefix)]
                c += np.bincount(((under >> shift) & np.uint64(BINS - 1)).astype(np.int64), minlength=BINS)
        for r, (prefix, rank) in list(state.items()):
            cum = np.cumsum(counts[prefix])
            b = int(np.searchsorted(cum, rank, side="right"))
            state[r] = ((prefix << BITS) | b, rank - (int(cum[b - 1]) if b else 0))
    return state
