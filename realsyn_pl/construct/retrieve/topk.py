"""Top-k text search for images by cosine: exact brute force, and the intra-cluster step of hierarchical retrieval.

Pure array functions (hierarchical.py adds files, buckets and resume). Embeddings are L2-normalised, so the inner
product is the cosine. Ties are broken by the lower sentence position, so results never depend on BLAS order.
Missing slots (a cluster with fewer than k sentences) are index -1 with similarity -inf.
"""
from __future__ import annotations

from typing import Iterable

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


def merge_topk(a_idx: np.ndarray, a_val: np.ndarray, b_idx: np.ndarray, b_val: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge two best-first candidate lists per row, where every real index in `a` is lower than every one in `b`
    (chunks in order): a stable sort on -value then keeps the tie rule (higher value, then lower index)."""
    idx = np.concatenate([a_idx, b_idx], axis=1)
    val = np.concatenate([a_val, b_val], axis=1)
    order = np.argsort(-val, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(val, order, axis=1)


def exact_topk(images: np.ndarray, sentence_chunks: Iterable[tuple[int, np.ndarray]], k: int,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: every image against every sentence, chunk by chunk; chunks are (global offset, (s, d))."""
    q = np.asarray(images, np.float32)
    idx = np.full((len(q), k), -1, np.int64)
    val = np.full((len(q), k), NEG, np.float32)
    for offset, chunk in sentence_chunks:
        if len(chunk) == 0:
            continue
        ci, cv = topk_rows(q @ np.asarray(chunk, np.float32).T, k, offset)
        idx, val = merge_topk(idx, val, ci, cv, k)
    return idx, val


def intra_cluster_topk(images: np.ndarray, image_clusters: np.ndarray, sentences: np.ndarray,
                       sentence_clusters: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each image, the top-k sentences of its own cluster. `sentence_clusters` must be sorted ascending
    (cluster.py writes shards that way), so a cluster is one slice; images are grouped by cluster so each
    cluster's sentences are scored in one matrix product."""
    idx = np.full((len(images), k), -1, np.int64)
    val = np.full((len(images), k), NEG, np.float32)
    if len(images) == 0 or len(sentences) == 0:
        return idx, val
    order = np.argsort(image_clusters, kind="stable")
    uniq, starts = np.unique(image_clusters[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    lo_all = np.searchsorted(sentence_clusters, uniq, side="left")
    hi_all = np.searchsorted(sentence_clusters, uniq, side="right")
    for c_lo, c_hi, a, b in zip(lo_all, hi_all, starts, ends):
        if c_hi == c_lo:
            continue
        rows = order[a:b]
        s = np.asarray(images[rows], np.float32) @ np.asarray(sentences[c_lo:c_hi], np.float32).T
        idx[rows], val[rows] = topk_rows(s, k, int(c_lo))
    return idx, val
