"""Fixed-bin histograms of cosine similarities: what a pool-sized summary (quantiles in a manifest, a card's plot)
reduces to, so it is built shard by shard and merged as small arrays instead of from every value in one process.
Quantiles are exact to one bin (2 / bins); the minimum and maximum are exact."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

BINS = 20_000  # over [-1, 1]: quantiles to 1e-4


@dataclass
class Histogram:
    lo: float = -1.0
    hi: float = 1.0
    bins: int = BINS
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    min: float = float("inf")
    max: float = float("-inf")

    def __post_init__(self) -> None:
        if not len(self.counts):
            self.counts = np.zeros(self.bins, np.int64)

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def add(self, values: Iterable[float] | np.ndarray) -> "Histogram":
        v = np.asarray(values, np.float64).ravel()
        v = v[np.isfinite(v)]
        if len(v):
            at = np.clip(((v - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64), 0, self.bins - 1)
            self.counts += np.bincount(at, minlength=self.bins)
            self.min, self.max = min(self.min, float(v.min())), max(self.max, float(v.max()))
        return self

    def merge(self, other: "Histogram") -> "Histogram":
        self.counts += other.counts
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        return self

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        """The value at each quantile: the middle of the bin holding it, clipped to the exact minimum and maximum
        (q = 0 and q = 1 are those)."""
        cum = np.cumsum(self.counts)
        width = (self.hi - self.lo) / self.bins
        out = []
        for q in qs:
            if q <= 0:
                out.append(self.min)
            elif q >= 1:
                out.append(self.max)
            else:
                b = int(np.searchsorted(cum, q * (self.n - 1), "right"))
                out.append(float(np.clip(self.lo + (b + 0.5) * width, self.min, self.max)))
        return out

    def coarse(self, bars: int = 50) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) over the occupied range in about `bars` bars: for a plot."""
        used = np.flatnonzero(self.counts)
        if not len(used):
            return np.zeros(0, np.int64), np.array([self.lo, self.hi])
        a, b = used[0], used[-1] + 1
        step = max(1, -(-(b - a) // bars))
        c = np.add.reduceat(self.counts[a:b], np.arange(0, b - a, step))
        width = (self.hi - self.lo) / self.bins
        edges = self.lo + (a + np.r_[np.arange(0, b - a, step), b - a]) * width
        return c, edges
