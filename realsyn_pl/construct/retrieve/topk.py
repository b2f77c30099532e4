"""Top-k text search for images by cosine: exact brute force, and the intra-cluster step of hierarchical retrieval.

Pure array functions (hierarchical.py adds files, buckets and resume). Embeddings are L2-normalised, so the inner
product is the cosine. Ties are broken by the lower sentence position, so results never depend on BLAS order.
Missing slots (a cluster with fewer than k sentences) are index -1 with similarity -inf.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from realsyn_pl.construct.clustering.topk import NEG, topk_rows
from realsyn_pl.construct.engine import products


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
                       sentence_clusters: np.ndarray, k: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """For each image, the top-k sentences of its own cluster. `sentence_clusters` must be sorted ascending
    (cluster.py writes shards that way), so a cluster is one slice; images are grouped by cluster so each
    cluster's sentences are scored in one matrix product, on `device` (products.py: the sentences go to a GPU
    once)."""
    idx = np.full((len(images), k), -1, np.int64)
    val = np.full((len(images), k), NEG, np.float32)
    if len(images) == 0 or len(sentences) == 0:
        return idx, val
    order = np.argsort(image_clusters, kind="stable")
    uniq, starts = np.unique(image_clusters[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    lo_all = np.searchsorted(sentence_clusters, uniq, side="left")
    hi_all = np.searchsorted(sentence_clusters, uniq, side="right")
    sent = sentences if device == "cpu" else products.to_device(sentences, device)
    for c_lo, c_hi, a, b in zip(lo_all, hi_all, starts, ends):
        if c_hi == c_lo:
            continue
        rows = order[a:b]
        idx[rows], val[rows] = products.topk(images[rows], sentences[c_lo:c_hi], k, int(c_lo), device,
                                             None if device == "cpu" else sent[c_lo:c_hi])
    return idx, val
