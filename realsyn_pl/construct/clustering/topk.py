"""The k best columns of every row of a similarity block, ties to the lower column: what every nearest-centre and
nearest-sentence search here reduces to (two-level assignment, retrieval's intra-cluster search, exact search).
Ties broken by position make the result independent of BLAS order and of how the rows were blocked."""
from __future__ import annotations

import numpy as np

NEG = np.float32(-np.inf)


def topk_rows(sims: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `sims` (m, s): the k best columns (+offset) and their values, best first, -1/-inf padded; among
    equal values the lower column wins (also at the k-th place). argpartition selects in O(s) per row; only the k
    selected are sorted, so a cluster of thousands of sentences costs no full sort per image."""
    m, s = sims.shape
    idx = np.full((m, k), -1, np.int64)
    val = np.full((m, k), NEG, np.float32)
    kk = min(k, s)
    if kk == 0 or m == 0:
        return idx, val
    if kk == 1:  # argmax returns the first (lowest) column among equal maxima: the same rule, one pass
        best = np.argmax(sims, axis=1)
        idx[:, 0], val[:, 0] = best + offset, sims[np.arange(m), best]
        return idx, val
    if kk < s:
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        kth = np.take_along_axis(sims, part, axis=1).min(axis=1, keepdims=True)
        above = sims > kth
        tied = sims == kth  # of the columns equal to the k-th value keep the lowest ones, as a stable sort would
        need = kk - above.sum(axis=1, keepdims=True)
        keep = above | (tied & (np.cumsum(tied, axis=1) <= need))
        cols = np.nonzero(keep)[1].reshape(m, kk)  # ascending column per row
    else:
        cols = np.broadcast_to(np.arange(s), (m, s))
    vals = np.take_along_axis(sims, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx[:, :kk] = np.take_along_axis(cols, order, axis=1) + offset
    val[:, :kk] = np.take_along_axis(vals, order, axis=1)
    return idx, val
