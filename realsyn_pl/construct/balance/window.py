"""The balance window over per-shard similarity files: exact global quantiles without gathering the pool, and the
per-row reason codes.

Quantile bounds equal `np.quantile(all finite sims, [q_low, q_high])` (numpy's default linear interpolation)
bit for bit, but no process holds every similarity: np.quantile needs the two order statistics around the virtual
index (n - 1) * q, and each is found exactly by two streamed passes over the float32 files (`order_statistics`).
A float32 maps to a uint32 whose order is the float order (`sortable`); pass 1 counts the top 16 bits of every
value (65,536 bins), which names the bin holding each wanted order statistic and its rank inside the bin; pass 2
counts the low 16 bits of the values in those few bins only (engine/ranks.py). Memory: one shard's sims plus a few
65,536-bin counts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from realsyn_pl.construct import calibration
from realsyn_pl.construct.engine.config import WindowConfig
from realsyn_pl.construct.engine.ranks import ranked_keys

# reason codes per retrieve row (int8), and the Counts drop reason each stands for
IN_WINDOW, NO_SYN_TEXT, NO_SIMILARITY, BELOW, ABOVE = 0, 1, 2, 3, 4
REASONS = {NO_SYN_TEXT: "no_syn_text", NO_SIMILARITY: "no_similarity", BELOW: "below_window", ABOVE: "above_window"}


def sortable(x: np.ndarray) -> np.ndarray:
    """uint32 keys ordered as the float32 values (finite ones; -0.0 is first folded into +0.0, as sorting does)."""
    bits = (np.asarray(x, np.float32) + np.float32(0.0)).view(np.uint32)
    return np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def unsortable(key: int) -> np.float32:
    k = np.uint32(key)
    bits = k & np.uint32(0x7FFFFFFF) if k >> np.uint32(31) else ~k
    return np.array([bits], np.uint32).view(np.float32)[0]


def _finite_keys(path: Path) -> np.ndarray:
    x = np.load(path, allow_pickle=False)
    return sortable(x[np.isfinite(x)])


def finite_count(paths: Sequence[Path]) -> int:
    return int(sum(int(np.isfinite(np.load(p, mmap_mode="r", allow_pickle=False)).sum()) for p in paths))


def order_statistics(paths: Sequence[Path], ranks: Sequence[int]) -> list[np.float32]:
    """The values of 0-based order statistics `ranks` of the finite float32 values in the .npy files `paths`."""
    found = ranked_keys(paths, _finite_keys, ranks, 32)
    return [unsortable(found[int(r)][0]) for r in ranks]


def linear_quantiles(paths: Sequence[Path], qs: Sequence[float]) -> list[float]:
    """np.quantile(finite values, qs) (method linear) over float32 files, streamed. Raises ValueError on none."""
    n = finite_count(paths)
    if n == 0:
        raise ValueError("no similarities to take window quantiles of")
    virtual = (n - 1) * np.asarray(qs, np.float64)  # numpy's virtual index for method linear, in float64
    prev = np.floor(virtual)
    top = virtual >= n - 1
    prev_i = np.where(top, n - 1, prev).astype(np.int64)
    next_i = np.where(top, n - 1, prev + 1).astype(np.int64)
    values = dict(zip(sorted({*prev_i.tolist(), *next_i.tolist()}),
                      order_statistics(paths, sorted({*prev_i.tolist(), *next_i.tolist()}))))
    out = []
    for v, a, b, is_top in zip(virtual, prev_i, next_i, top):
        if is_top:
            out.append(float(values[int(a)]))  # numpy: both neighbours are the maximum
            continue
        # numpy's own interpolation on the two neighbours: index 0 -> 1 at weight v - floor(v) is exactly its lerp
        pair = np.array([values[int(a)], values[int(b)]], np.float32)
        out.append(float(np.quantile(pair, [float(v - np.floor(v))])[0]))
    return out


def bounds(w: WindowConfig, sim_paths: Sequence[Path]) -> tuple[float, float]:
    """(low, high): the configured cosines, or the q_low / q_high quantiles of every finite similarity."""
    if w.mode == "absolute":
        lo, hi = float(w.low), float(w.high)
    elif w.mode == "quantile":
        if not 0.0 <= w.q_low < w.q_high <= 1.0:
            raise ValueError(f"window quantiles need 0 <= q_low < q_high <= 1, got {w.q_low}, {w.q_high}")
        lo, hi = linear_quantiles(sim_paths, [w.q_low, w.q_high])
    else:
        raise ValueError(f"window.mode must be absolute or quantile, got {w.mode!r}")
    if lo > hi:
        raise ValueError(f"window low {lo} > high {hi}")
    return lo, hi


# the quantiles the stop line lists: the paper's 15 % is e.g. [q0.10, q0.95] (quantile mode's defaults)
LISTED = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)


def side_counts(sim_paths: Sequence[Path], lo: float, hi: float) -> tuple[int, int, int]:
    """(finite similarities below lo, above hi, all finite ones), one shard at a time, compared as `codes` does."""
    below, above, n = 0, 0, 0
    for p in sim_paths:
        s = np.load(p, allow_pickle=False).astype(np.float64)
        s = s[np.isfinite(s)]
        below, above, n = below + int((s < lo).sum()), above + int((s > hi).sum()), n + len(s)
    return below, above, n


def removal_stop(w: WindowConfig, sim_paths: Sequence[Path], lo: float, hi: float) -> str | None:
    """The one line that stops an absolute window whose removal (pairs outside it / pairs with a similarity) is
    outside [0.5x, 2x] the paper's 15 %, with quantiles of the similarities; None when it passes or is accepted."""
    if w.mode != "absolute" or w.accept_removal:
        return None
    below, above, n = side_counts(sim_paths, lo, hi)
    out = below + above
    if n == 0 or not calibration.outside_band(out / n, calibration.WINDOW):
        return None
    qs = " ".join(f"q{q:.2f}={v:.4f}" for q, v in zip(LISTED, linear_quantiles(sim_paths, list(LISTED))))
    return (f"the window [{lo:.4f}, {hi:.4f}] removes {out / n:.1%} of the {n} pairs with a similarity "
            f"({calibration.band_text(calibration.WINDOW)}): this model's similarity scale is not the one the window "
            f"was set on; similarity quantiles {qs}; set balance.window.mode=quantile (q_low / q_high: the paper's 15 %"
            f" is q_low + 1 - q_high) or balance.window.accept_removal=true to keep this window")


def codes(sim: np.ndarray, base: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reason code per row: `base` (IN_WINDOW where a similarity exists, else NO_SYN_TEXT) refined by the window
    lo <= sim <= hi, both ends inclusive (the paper's 0.51 <= sim <= 0.61); compared in float64 as Python floats."""
    out = np.asarray(base, np.int8).copy()
    s = np.asarray(sim, np.float64)
    cand = out == IN_WINDOW
    with np.errstate(invalid="ignore"):
        out[cand & ~np.isfinite(s)] = NO_SIMILARITY
        out[cand & np.isfinite(s) & (s < lo)] = BELOW
        out[cand & np.isfinite(s) & (s > hi)] = ABOVE
    return out
