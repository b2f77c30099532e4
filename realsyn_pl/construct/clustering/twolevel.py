"""Two-level spherical k-means for millions of centres (the idea of faiss.contrib.clustering.two_level_clustering),
resumable, its units spread as Ray tasks, and the assignment through its two levels.

Steps (under `<stage>/_kmeans/`, each resumable; the driver waits for each before the next):
  1. coarse   one task: `coarse_k` centres (default sqrt(k)) on `coarse_points_per_centre` points each, drawn from
              every shard -> coarse.npy. Small.
  2. sample   a task per input shard: the training sample's rows of that shard (a seeded hash of the global row
              number picks them, so the sample does not depend on the shard split or the worker count), assigned to
              their coarse centre and sorted by it -> sample-p.npy (stored dtype), counts-p.npy (rows per centre).
  3. sub      a task per coarse centre c: k_c centres proportional to its share of the sample (largest remainder,
              sum k), trained on its rows gathered from every sample-p.npy -> sub-c.npy. A killed run resumes at the
              last finished sub-clustering.
  4. final    one task: centroids.npy = the sub-centres in coarse order; parent.npy = their coarse centre.
Memory per task: one shard's sample (step 2), one coarse cluster's rows (~40 k/coarse_k points, step 3), plus the
coarse centres; the centre table (k x d fp32) in step 4 and when the assignment loads it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from realsyn_pl.construct.clustering import kmeans
from realsyn_pl.construct.clustering.topk import topk_rows
from realsyn_pl.construct.engine.arrays import ArrayReader, MappedShards, save_npy, shard_sizes
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, write_json

KDIR = "_kmeans"


@dataclass
class Spec:
    """What every k-means of a stage is asked to do (built from cluster.* or balance.*; `key` prefixes errors)."""
    k: int
    niter: int = 20
    init: str = "auto"
    nredo: int = 1
    train_sample: Optional[int] = None
    seed: int = 0
    method: str = "auto"
    two_level_above: int = 65536
    coarse_k: int = 0
    coarse_points_per_centre: int = 256
    min_points_per_centre: int = 40
    assign_probe: int = 8
    assign: str = "auto"
    key: str = "cluster"

    def two_level(self) -> bool:
        if self.method not in ("auto", "flat", "two_level"):
            raise StageError(f"{self.key}.method must be auto, flat or two_level, got {self.method!r}")
        return self.method == "two_level" or (self.method == "auto" and self.k > self.two_level_above)

    def coarse(self) -> int:
        return self.coarse_k if self.coarse_k > 0 else max(1, int(round(math.sqrt(self.k))))


def check(spec: Spec) -> bool:
    """The refusals that need no data; True for two-level."""
    for name in ("k", "niter", "min_points_per_centre", "assign_probe", "coarse_points_per_centre"):
        if getattr(spec, name) < 1:
            raise StageError(f"{spec.key}.{name} must be >= 1, got {getattr(spec, name)}")
    two = spec.two_level()
    if two:
        kmeans.check_init(spec.init, spec.coarse(), f"{spec.key}.init")
        kmeans.check_init(spec.init, math.ceil(spec.k / spec.coarse()), f"{spec.key}.init")
    else:
        # the configured k, not k clamped to a small corpus: the same config would run at full size next time
        kmeans.check_init(spec.init, spec.k, f"{spec.key}.init")
    return two


def plan(spec: Spec, n_rows: int) -> dict[str, Any]:
    """Check the config against the data before any work (one-line errors naming the key) and say what will run:
    method, per-call k, sample size and points per centre; a sample under `min_points_per_centre` is reported in
    one printed line and in the manifest (`thin_sample`), never silenced."""
    two = check(spec)
    wanted = spec.train_sample if spec.train_sample is not None else spec.min_points_per_centre * spec.k
    if wanted < 1:
        raise StageError(f"{spec.key}.train_sample must be >= 1 or null, got {spec.train_sample}")
    n_sample = min(wanted, n_rows)
    k_eff = max(1, min(spec.k, n_sample))
    info: dict[str, Any] = {"method": "two_level" if two else "flat", "k_requested": spec.k, "n_rows": n_rows,
                            "n_sample_target": n_sample, "points_per_centre": round(n_sample / k_eff, 2)}
    if two:
        info["coarse_k"] = spec.coarse()
    if n_sample < spec.min_points_per_centre * k_eff:
        why = "the corpus has fewer rows" if n_sample == n_rows and wanted > n_rows else f"{spec.key}.train_sample"
        info["thin_sample"] = (f"{n_sample} training points for {k_eff} centres = {n_sample / k_eff:.1f} per centre, "
                               f"below {spec.key}.min_points_per_centre={spec.min_points_per_centre} ({why})")
        print(f"[build] {spec.key}: warning: {info['thin_sample']}", flush=True)
    return info


# ---- deterministic row sample --------------------------------------------------------------------------------
def row_hash(rows: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (global row number, seed): a uniform uint64 per row, the same whatever the shard split."""
    z = rows.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def threshold(n_pick: int, n_total: int) -> np.uint64:
    frac = 1.0 if n_total == 0 else min(1.0, n_pick / n_total)
    return np.uint64(min(2**64 - 1, int(frac * 2**64)))


def picked(offset: int, size: int, mask: Optional[np.ndarray], seed: int, thr: np.uint64) -> np.ndarray:
    """Local rows of a shard (global rows offset..offset+size-1) in the sample, ascending."""
    rows = np.arange(size, dtype=np.int64)
    keep = row_hash(rows + offset, seed) < thr if thr < np.uint64(2**64 - 1) else np.ones(size, bool)
    if mask is not None:
        keep &= mask
    return np.flatnonzero(keep)


# ---- the fit --------------------------------------------------------------------------------------------------
Mask = Optional[Callable[[int], np.ndarray]]  # shard position -> the rows k-means may use (None: every row)


class TwoLevelFit:
    """The four steps of one stage's two-level fit. It travels to every task (small: paths, sizes, the spec); the
    embeddings are mapped there, shard by shard. `mask(p)` gives shard p's usable rows and `n_rows` their total."""

    def __init__(self, stage: Stage, reader: ArrayReader, spec: Spec, gpu: bool, info: dict[str, Any],
                 mask: Mask = None, n_rows: Optional[int] = None):
        self.stage, self.reader, self.spec, self.gpu, self.info, self.mask = stage, reader, spec, gpu, info, mask
        self.dir = stage.dir / KDIR
        self.arrays = MappedShards(reader.folder, reader.kind, reader.indices)  # the id shards are never needed here
        self.sizes = shard_sizes(reader.folder, reader.kind, reader.indices)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n_rows = int(sum(self.sizes)) if n_rows is None else int(n_rows)
        self.conf = {"spec": {k: v for k, v in spec.__dict__.items()}, "n_rows": self.n_rows, "sizes": self.sizes}
        self.seeded_max = kmeans.SEEDED_INIT_MAX_K  # read once here, so every task of the fit uses the same bound

    def rows_mask(self, p: int) -> Optional[np.ndarray]:
        return self.mask(p) if self.mask is not None else None

    def _units(self, ex: Any, name: str, units: Sequence[int], work: Callable[[int], Counts], res: Any) -> Stage:
        """A resumable per-unit step: a task per unit not done yet, each marked done."""
        st = self.stage.sub(name, self.conf, folder=KDIR)
        st.begin(False)
        ex.map(st, list(units), work, res)
        return st

    # step 1 (one task)
    def fit_coarse(self) -> None:
        kc = self.spec.coarse()
        thr = threshold(kc * self.spec.coarse_points_per_centre, self.n_rows)
        parts = []
        for p in range(len(self.sizes)):
            rows = picked(int(self.offsets[p]), self.sizes[p], self.rows_mask(p), self.spec.seed + 1, thr)
            if len(rows):
                parts.append(np.asarray(self.arrays[p][rows], np.float32))
        sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        if len(sample) == 0:
            raise StageError(f"{self.stage.name}: no embeddings to cluster")
        fit = kmeans.train(sample, kc, self.spec.niter, self.spec.seed, self.gpu, self.spec.init,
                           self.spec.nredo, f"{self.spec.key}.init")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "coarse.json", {"k": len(fit.centroids), "n_train": fit.n_train,
                                              "objective": fit.objective})
        _save(self.dir / "coarse.npy", fit.centroids)

    # step 2 (a task per input shard)
    def sample_unit(self, p: int) -> Counts:
        coarse = np.load(self.dir / "coarse.npy", allow_pickle=False)
        thr = threshold(self.info["n_sample_target"], self.n_rows)
        arr = self.arrays[p]
        rows = picked(int(self.offsets[p]), self.sizes[p], self.rows_mask(p), self.spec.seed, thr)
        x = np.asarray(arr[rows]) if len(rows) else np.zeros((0, coarse.shape[1]), arr.dtype)
        lab = kmeans.Assigner(coarse, self.gpu).search(x, 1)[0][:, 0] if len(x) else np.zeros(0, np.int64)
        order = np.argsort(lab, kind="stable")
        st_dir = self.dir / "_sample"
        _save(st_dir / f"sample-{p:05d}.npy", np.ascontiguousarray(x[order]))
        _save(st_dir / f"counts-{p:05d}.npy", np.bincount(lab, minlength=len(coarse)).astype(np.int64))
        c = Counts()
        c.keep(len(rows))
        return c

    def counts(self, n_coarse: int) -> np.ndarray:
        return np.stack([np.load(self.dir / "_sample" / f"counts-{p:05d}.npy") for p in range(len(self.sizes))]
                        ) if self.sizes else np.zeros((0, n_coarse), np.int64)

    # step 3 (a task per coarse centre)
    def sub_unit(self, c: int, starts: np.ndarray, k_c: np.ndarray, n_c: np.ndarray) -> Counts:
        parts = []
        for p in range(len(self.sizes)):
            a, z = int(starts[p, c]), int(starts[p, c + 1])
            if z > a:
                arr = np.load(self.dir / "_sample" / f"sample-{p:05d}.npy", mmap_mode="r", allow_pickle=False)
                parts.append(sample_copy(arr[a:z]))
        if k_c[c] == 0:
            d = np.load(self.dir / "coarse.npy", mmap_mode="r", allow_pickle=False).shape[1]
            cents = np.zeros((0, d), np.float32)
        else:
            x = np.concatenate(parts)
            init = self.spec.init if k_c[c] <= self.seeded_max else "random"
            cents = kmeans.train(x, int(k_c[c]), self.spec.niter, self.spec.seed + 1 + c, self.gpu, init,
                                 self.spec.nredo, f"{self.spec.key}.init").centroids
        _save(self.dir / "_sub" / f"sub-{c:05d}.npy", cents)
        cnt = Counts()
        cnt.keep(int(n_c[c]))
        return cnt

    def init_fallback(self, k_c: np.ndarray) -> Optional[dict[str, int]]:
        """The sub-clusterings whose explicit seeded init (afkmc2/kmeans++) is too slow at their k and runs random:
        check() bounds the mean cell, but a large coarse cell can get more centres."""
        big = k_c[k_c > self.seeded_max]
        if self.spec.init not in ("afkmc2", "kmeans++") or len(big) == 0:
            return None
        return {"random_sub_clusterings": int(len(big)), "largest_k": int(big.max())}

    # step 4 (one task)
    def finish(self, k_c: np.ndarray) -> None:
        coarse = np.load(self.dir / "coarse.npy", allow_pickle=False)
        cents = np.concatenate([np.load(self.dir / "_sub" / f"sub-{c:05d}.npy") for c in range(len(coarse))])
        parent = np.repeat(np.arange(len(coarse), dtype=np.int64), k_c)
        n_c = self.counts(len(coarse)).sum(axis=0)
        agree = self.agreement(coarse, cents, parent)
        info = {**self.info, "assign_agreement_top1": agree, "assign_probe": self.spec.assign_probe,
                "k": len(cents), "n_train": int(n_c.sum()),
                "points_per_centre": round(int(n_c.sum()) / max(1, len(cents)), 2),
                "coarse": json.loads((self.dir / "coarse.json").read_text()),
                "sub_k": {"min": int(k_c[k_c > 0].min()) if (k_c > 0).any() else 0, "max": int(k_c.max())},
                "niter": self.spec.niter, "init": self.spec.init, "nredo": self.spec.nredo}
        fallback = self.init_fallback(k_c)
        if fallback:  # only when it happened: fits without one keep their recorded bytes
            info["init_fallback"] = fallback
        write_json(self.stage.dir / "_kmeans.json", info)
        _save(self.stage.dir / "parent.npy", parent)
        _save(self.stage.dir / "coarse.npy", coarse)
        _save(self.stage.dir / kmeans_file(), cents)  # last: its presence means the fit is complete

    def run(self, ex: Any, res: Any) -> dict[str, Any]:
        """Every step not done yet, as tasks the driver waits on; the fit's summary."""
        if not (self.stage.dir / kmeans_file()).is_file():
            if not (self.dir / "coarse.npy").is_file():
                ex.call(self.stage, "coarse k-means", TwoLevelFit.fit_coarse, self, resources=res)
            n_coarse = len(np.load(self.dir / "coarse.npy", mmap_mode="r", allow_pickle=False))
            self._units(ex, "_sample", range(len(self.sizes)), self.sample_unit, res)
            per_shard = ex.call(self.stage, "sample counts", TwoLevelFit.counts, self, n_coarse)
            n_c = per_shard.sum(axis=0)
            k_c = allocate(self.spec.k, n_c)
            starts = np.concatenate([np.zeros((len(per_shard), 1), np.int64), np.cumsum(per_shard, axis=1)], axis=1)
            fallback = self.init_fallback(k_c)
            if fallback:
                print(f"[build] {self.spec.key}: warning: {fallback['random_sub_clusterings']} sub-clustering(s) "
                      f"above {self.seeded_max} centres (largest {fallback['largest_k']}) seeded at random, "
                      f"not {self.spec.key}.init={self.spec.init} (_kmeans.json init_fallback)", flush=True)
            self._units(ex, "_sub", range(n_coarse), partial(self.sub_unit, starts=starts, k_c=k_c, n_c=n_c), res)
            ex.call(self.stage, "centres", TwoLevelFit.finish, self, k_c, resources=res)
        return json.loads((self.stage.dir / "_kmeans.json").read_text())

    def agreement(self, coarse: np.ndarray, cents: np.ndarray, parent: np.ndarray, n: int = 2000) -> float:
        """Top-1 agreement of the two-level assignment with exact search on <= n evenly spread sample rows."""
        total = int(self.counts(len(coarse)).sum())
        if total == 0:
            return 1.0
        step, parts = max(1, total // n), []
        for p in range(len(self.sizes)):
            arr = np.load(self.dir / "_sample" / f"sample-{p:05d}.npy", mmap_mode="r", allow_pickle=False)
            if len(arr):
                parts.append(sample_copy(arr[::step]))
        x = np.concatenate(parts)[:n]
        exact = kmeans.Assigner(cents, self.gpu).search(x, 1)[0][:, 0]
        two = TwoLevelAssigner(coarse, cents, parent, self.spec.assign_probe).search(x, 1)[0][:, 0]
        return round(float((exact == two).mean()), 6)


def sample_copy(rows: np.ndarray) -> np.ndarray:
    """Rows of a memory-mapped sample file as float32, always copied: np.asarray of float32 rows (embed.dtype=float32)
    would be a view keeping the file's map, and a file descriptor, open for every shard."""
    return np.array(rows, np.float32)


def kmeans_file() -> str:
    return "centroids.npy"


def allocate(k: int, n_c: np.ndarray) -> np.ndarray:
    """Centres per coarse cluster, proportional to its points (largest remainder; ties to the lower id), at most
    its points, at least one where it has any."""
    n_c = np.asarray(n_c, np.int64)
    total = int(n_c.sum())
    if total == 0:
        return np.zeros(len(n_c), np.int64)
    k = min(k, total)
    quota = n_c * (k / total)
    base = np.minimum(np.floor(quota).astype(np.int64), n_c)
    base[(n_c > 0) & (base == 0)] = 1
    left = k - int(base.sum())
    if left > 0:
        room = n_c - base
        rem = np.where(room > 0, quota - np.floor(quota), -1.0)
        for c in np.lexsort((np.arange(len(n_c)), -rem)):
            if left == 0:
                break
            add = min(int(room[c]), left) if rem[c] >= 0 else 0
            add = min(add, 1)
            base[c] += add
            left -= add
    return base


def _save(path: Path, arr: np.ndarray) -> None:
    """Atomic write; first removes what a killed writer of this same file left (one task writes it at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    save_npy(path, arr)


# ---- assignment through the two levels -------------------------------------------------------------------------
class TwoLevelAssigner:
    """Nearest centre(s): the `probe` best coarse centres, then every child of those (exact fp32 products, one per
    coarse centre and batch). Agreement with exact search grows with `probe`; cluster.py measures it."""

    def __init__(self, coarse: np.ndarray, centroids: np.ndarray, parent: np.ndarray, probe: int = 8,
                 batch: int = 65536):
        self.coarse = np.ascontiguousarray(coarse, np.float32)
        self.cents = np.ascontiguousarray(centroids, np.float32)
        self.starts = np.searchsorted(parent, np.arange(len(coarse) + 1), side="left")
        self.probe = max(1, min(probe, len(coarse)))
        self.batch = batch

    def search(self, x: np.ndarray, nprobe: int = 1) -> tuple[np.ndarray, np.ndarray]:
        n = len(x)
        ids = np.full((n, nprobe), -1, np.int64)
        sims = np.full((n, nprobe), -np.inf, np.float32)
        for lo in range(0, n, self.batch):
            i, s = self._search(np.asarray(x[lo:lo + self.batch], np.float32), nprobe)
            ids[lo:lo + len(i)], sims[lo:lo + len(i)] = i, s
        return ids, sims

    def _search(self, q: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.probe
        top_c, _ = topk_rows(q @ self.coarse.T, p)
        cand_i = np.full((len(q), p * nprobe), -1, np.int64)
        cand_s = np.full((len(q), p * nprobe), -np.inf, np.float32)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):  # small products: BLAS threads would only contend
            self._children(q, top_c, nprobe, cand_i, cand_s)
        # best over the probes; equal cosines go to the lower centre id, as in exact search
        order = np.lexsort((np.where(cand_i < 0, np.iinfo(np.int64).max, cand_i), -cand_s), axis=-1)[:, :nprobe]
        return np.take_along_axis(cand_i, order, 1), np.take_along_axis(cand_s, order, 1)

    def _children(self, q: np.ndarray, top_c: np.ndarray, nprobe: int, cand_i: np.ndarray,
                  cand_s: np.ndarray) -> None:
        for j in range(top_c.shape[1]):
            col = top_c[:, j]
            order = np.argsort(col, kind="stable")
            uniq, first = np.unique(col[order], return_index=True)
            ends = np.append(first[1:], len(order))
            for c, a, b in zip(uniq, first, ends):
                lo, hi = int(self.starts[c]), int(self.starts[c + 1])
                if hi == lo:
                    continue
                rows = order[a:b]
                bi, bs = topk_rows(q[rows] @ self.cents[lo:hi].T, nprobe, lo)
                cand_i[rows, j * nprobe:(j + 1) * nprobe], cand_s[rows, j * nprobe:(j + 1) * nprobe] = bi, bs
