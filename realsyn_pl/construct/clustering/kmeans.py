"""Spherical k-means with faiss: train on a seeded sample of on-disk embedding shards, then assign in streamed batches.

Used by `dedup_*` (semantic dedup clusters), `cluster` (sentence embeddings, paper 2M centres) and `balance` (image
embeddings, paper 1M centres), through centroids.py.
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


def faiss_has_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources")


def use_gpu(setting: str, key: str, cluster_gpus: float) -> bool:
    """Whether k-means and assignment tasks run on a GPU: `auto` when this faiss is built with GPU support (faiss-gpu)
    and the Ray cluster has GPUs; each such task then asks Ray for one. key: the config key, for errors."""
    if setting not in ("auto", "true", "false"):
        raise StageError(f"{key} must be auto, true or false, got {setting!r}")
    if setting == "true" and not faiss_has_gpu():
        raise StageError(f"{key}=true but this faiss has no GPU support (install faiss-gpu or set {key}=auto)")
    if setting == "true" and cluster_gpus < 1:
        raise StageError(f"{key}=true but the Ray cluster has no GPU (set {key}=auto)")
    return setting != "false" and faiss_has_gpu() and cluster_gpus >= 1


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
# Seeding cost grows with k^2 on one CPU thread (measured 2.7 s at k=2k, d=256, n=40k; AFK-MC2 ~ 3 min at 16k) and
# runs before any GPU index exists: above this k per training call only random initialisation is accepted.
SEEDED_INIT_MAX_K = 16384
SMALL_TRAIN = 2e8  # n * k * d below which a CPU fit runs on one thread (measured 12x faster on 2 busy cores)
AUTO_SEEDED_MAX_K = 4096  # init=auto seeds with AFK-MC2 up to here (every two-level call at the paper's k), else random


def check_init(init: str, k: int, key: str) -> None:
    """One-line refusal, before any work, of an init that cannot be run at this k (`key`: the config key)."""
    if init not in (*INITS, "auto"):
        raise StageError(f"{key} must be auto, {', '.join(INITS)}, got {init!r}")
    if init in ("afkmc2", "kmeans++") and k > SEEDED_INIT_MAX_K:
        raise StageError(f"{key}={init} seeds centres in O(k^2) on one CPU thread: k={k} per training call is above "
                         f"{SEEDED_INIT_MAX_K}; use {key}=random or auto, or two-level k-means (method=two_level)")


def resolve_init(init: str, k: int) -> str:
    if init == "auto":
        return "afkmc2" if k <= AUTO_SEEDED_MAX_K else "random"
    return init


def flat_index(d: int, gpu: bool, fp16: bool = False):
    """Inner-product index on the CPU or on the task's GPU (Ray shows a task only the GPU it was given: device 0).
    fp16: centres stored in half precision on the GPU (halves memory; cosines move by ~1e-3, enough to rank)."""
    import faiss

    if not gpu:
        return faiss.IndexFlatIP(d)
    res = faiss.StandardGpuResources()
    conf = faiss.GpuIndexFlatConfig()
    conf.device = 0
    conf.useFloat16 = bool(fp16)
    index = faiss.GpuIndexFlatIP(res, d, conf)
    index.keep_resources = res  # the resources must outlive the index
    return index


def train(sample: np.ndarray, k: int, niter: int, seed: int, gpu: bool, init: str = "afkmc2",
          nredo: int = 1, key: str = "init") -> KMeansFit:
    """Flat spherical k-means on `sample`; k is clamped to the sample size (a tiny corpus cannot have more centres
    than points). Random initialisation often seeds two centres in one true cluster and never recovers; k-means++
    style seeding (AFK-MC2 approximates it in O(n) per centre) avoids that, at a cost in k^2 (check_init)."""
    import faiss

    if len(sample) == 0:
        raise ValueError("no embeddings to cluster")
    k_eff = max(1, min(k, len(sample)))
    check_init(init, k_eff, key)
    d = sample.shape[1]
    cp = faiss.ClusteringParameters()
    cp.niter, cp.nredo, cp.seed, cp.spherical, cp.verbose = niter, max(1, nredo), seed, True, False
    # we already sampled; faiss would otherwise subsample to 256 points per centre (and warn below 39: the caller
    # reports a thin sample in the manifest instead)
    cp.max_points_per_centroid = max(256, len(sample) // k_eff + 1)
    cp.min_points_per_centroid = 1
    cp.init_method = getattr(faiss, INITS[resolve_init(init, k_eff)])
    clus = faiss.Clustering(d, k_eff, cp)
    threads = faiss.omp_get_max_threads()
    if not gpu and len(sample) * k_eff * d < SMALL_TRAIN:
        faiss.omp_set_num_threads(1)  # a small fit (a two-level sub-clustering): OpenMP sync would cost ~10x
    try:
        clus.train(np.ascontiguousarray(sample, dtype=np.float32), flat_index(d, gpu))
    finally:
        faiss.omp_set_num_threads(threads)
    cents = faiss.vector_float_to_array(clus.centroids).reshape(k_eff, d).astype(np.float32)
    cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
    stats = clus.iteration_stats
    obj = float(stats.at(stats.size() - 1).obj) if stats.size() else float("nan")
    return KMeansFit(cents, k, len(sample), gpu, obj)


class Assigner:
    """Nearest centre(s) by inner product (exact), batched so memory stays flat whatever the shard size. On a GPU
    the centres live on the task's device only, in fp16 when `fp16` (exact enough to rank centres)."""

    def __init__(self, centroids: np.ndarray, gpu: bool = False, batch: int = 65536, fp16: bool = True):
        self.index = flat_index(centroids.shape[1], gpu, fp16)
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
