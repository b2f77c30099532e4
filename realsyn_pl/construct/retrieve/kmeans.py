"""Spherical k-means with faiss: train on a seeded sample of on-disk embedding shards, then assign in streamed batches.

Used by `cluster` (sentence embeddings, paper 2M centres) and `balance` (image embeddings, paper 1M centres).
Embeddings are L2-normalised, so the centres are kept on the unit sphere (faiss `spherical=True`) and the nearest
centre is the one with the largest inner product = cosine. Memory: the training sample plus one shard at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from realsyn_pl.construct.engine.arrays import ArrayReader
from realsyn_pl.construct.engine.stage import StageError


@dataclass
class KMeansFit:
    centroids: np.ndarray   # (k, d) float32, unit norm
    k_requested: int
    n_train: int
    gpu: bool
    objective: float        # faiss's final objective (sum of inner products for spherical k-means)


def use_gpu(setting: str, key: str) -> bool:
    """`auto`: faiss GPUs when the installed faiss has any (faiss-cpu never does). key: the config key, for errors."""
    import faiss

    if setting not in ("auto", "true", "false"):
        raise StageError(f"{key} must be auto, true or false, got {setting!r}")
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if setting == "true" and n == 0:
        raise StageError(f"{key}=true but this faiss has no GPUs (install faiss-gpu or set {key}=auto)")
    return setting != "false" and n > 0


def sample_rows(reader: ArrayReader, n_sample: int, seed: int,
                masks: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
    """A seeded uniform sample (without replacement) of the rows of every shard (only rows where `masks[shard]` is
    True, if given), as float32, read shard by shard from memory maps. Rows are picked by global position, so the
    sample does not depend on how rows are split into shards."""
    sizes = [len(arr) for _, arr in reader]
    if masks is None:
        masks = [np.ones(n, bool) for n in sizes]
    rows = [np.flatnonzero(m) for m in masks]
    total = int(sum(len(r) for r in rows))
    if total == 0:
        return np.zeros((0, 0), np.float32)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(n_sample, total), replace=False))
    parts, start = [], 0
    for (_, arr), r in zip(reader, rows):
        lo, hi = np.searchsorted(picks, [start, start + len(r)])
        if hi > lo:
            parts.append(np.asarray(arr[r[picks[lo:hi] - start]], dtype=np.float32))
        start += len(r)
    return np.ascontiguousarray(np.concatenate(parts))


INITS = {"random": "ClusteringInitMethod_RANDOM", "kmeans++": "ClusteringInitMethod_KMEANS_PLUS_PLUS",
         "afkmc2": "ClusteringInitMethod_AFK_MC2"}


def train(sample: np.ndarray, k: int, niter: int, seed: int, gpu: bool, init: str = "afkmc2",
          nredo: int = 1) -> KMeansFit:
    """k-means on `sample`; k is clamped to the sample size (a tiny corpus cannot have more centres than points).
    Random initialisation often seeds two centres in one true cluster and never recovers; k-means++-style seeding
    (AFK-MC2 approximates it in O(n) per centre) avoids that."""
    import faiss

    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if len(sample) == 0:
        raise ValueError("no embeddings to cluster")
    k_eff = max(1, min(k, len(sample)))
    km = faiss.Kmeans(sample.shape[1], k_eff, niter=niter, nredo=max(1, nredo), seed=seed, spherical=True,
                      gpu=gpu, verbose=False,
                      # we already sampled; faiss would otherwise silently subsample to 256 points per centre
                      max_points_per_centroid=max(256, len(sample) // k_eff + 1), min_points_per_centroid=1,
                      init_method=getattr(faiss, INITS[init]))
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    cents = km.centroids.astype(np.float32)
    cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
    obj = float(km.obj[-1]) if len(km.obj) else float("nan")
    return KMeansFit(cents, k, len(sample), gpu, obj)


class Assigner:
    """Nearest centre(s) by inner product, batched so memory stays flat whatever the shard size."""

    def __init__(self, centroids: np.ndarray, gpu: bool = False, batch: int = 65536):
        import faiss

        self.index = faiss.IndexFlatIP(centroids.shape[1])
        if gpu:
            self.index = faiss.index_cpu_to_all_gpus(self.index)
        self.index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        self.batch = batch

    def search(self, x: np.ndarray, nprobe: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids (n, nprobe) int64, cosine to each (n, nprobe) float32), best first."""
        n = len(x)
        ids = np.zeros((n, nprobe), np.int64)
        sims = np.zeros((n, nprobe), np.float32)
        for lo in range(0, n, self.batch):
            chunk = np.ascontiguousarray(x[lo:lo + self.batch], dtype=np.float32)
            s, i = self.index.search(chunk, nprobe)
            ids[lo:lo + len(chunk)], sims[lo:lo + len(chunk)] = i, s
        return ids, sims


def cluster_sizes(labels: Sequence[np.ndarray], k: int) -> np.ndarray:
    sizes = np.zeros(k, np.int64)
    for lab in labels:
        sizes += np.bincount(np.asarray(lab, np.int64), minlength=k)[:k]
    return sizes
