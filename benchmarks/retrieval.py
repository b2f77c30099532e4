"""Hierarchical retrieval vs exact search: the real `cluster` and `retrieve` stages on synthetic clustered embeddings.

python benchmarks/retrieval.py [--sentences 1000000] [--images 100000] [--dim 512] [--exact-subset 1000]
Data, in the stages' own on-disk layout (done `dedup_sentences` and `dedup_images` directories, fp16 arrays):
topics with Zipf-distributed sizes; sentences = topic centre + noise; images = topic centre + their own noise + one
shared offset vector (the modality gap: image-text cosines sit well below text-text ones, as with CLIP).
Clustering: k = sentences / 420 (the paper's 0.84B / 2M), two-level k-means; retrieval at nprobe 1, 2, 4, 8.
Exact baseline: faiss IndexFlatIP over every sentence (fp32) for `--exact-subset` images, scaled linearly to all
images (search cost is linear in the number of queries). Recall@3: share of the exact top-3 in the retrieved 3;
top-1 in 3: share of images whose exact best sentence is among the retrieved 3. Peak RSS: sampled every 50 ms per
step (this process). Prints one table and appends it to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# noise norm per vector (relative to the unit topic centre) and the image side's shared offset
SENT_NOISE, IMG_NOISE, GAP = 1.0, 1.0, 0.8
# the targets at nprobe=1: speed-up over exact search of cluster + retrieve, and of retrieve alone
TARGET_ALL, TARGET_RETRIEVE = 20.0, 100.0


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled)."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(work: Path, n_sent: int, n_img: int, d: int, topics: int, seed: int = 0) -> None:
    from realsyn_pl.construct.engine.arrays import write_array_shard
    from realsyn_pl.construct.engine.config import RayConfig
    from realsyn_pl.construct.engine.executor import Executor, run_sharded
    from realsyn_pl.construct.engine.records import write_records
    from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES, PPL_SENTENCES
    from realsyn_pl.construct.engine.stage import Counts, Stage

    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(topics, d))).astype(np.float32)
    w = 1.0 / np.arange(1, topics + 1) ** 1.1  # Zipf topic sizes
    w /= w.sum()
    gap = unit(rng.normal(size=(1, d)))[0].astype(np.float32)

    def write(name, kind, schema, n, shards, make_rows, noise, shift):
        stage = Stage(work, name, {"synthetic": True, "n": n})
        bounds = np.linspace(0, n, shards + 1).astype(int)

        def shard(i):
            r = np.random.default_rng([seed, i, n])
            m = int(bounds[i + 1] - bounds[i])
            topic = r.choice(topics, size=m, p=w)
            x = centres[topic] + r.normal(scale=noise / np.sqrt(d), size=(m, d)).astype(np.float32) + shift
            ids = [f"doc-{i:03d}{j:07d}-000000/{kind}-0" for j in range(m)]
            write_records(stage.path(kind, i), make_rows(ids), schema)
            write_array_shard(stage.dir, "emb", i, ids, unit(x), "float16")
            c = Counts()
            c.keep(m)
            return c
        assert run_sharded(Executor(RayConfig(in_process=True), progress=False), stage, range(shards), shard)

    write("dedup_sentences", "sentences", PPL_SENTENCES, n_sent, 8,
          lambda ids: [{"id": s, "doc_id": s.split("/")[0], "text": f"sentence {s}", "entropy": 1.0, "ppl": 50.0}
                       for s in ids], SENT_NOISE, 0.0)
    write("dedup_images", "images", FILTERED_IMAGES, n_img, 4,
          lambda ids: [{"id": s, "doc_id": s.split("/")[0], "url": f"http://example.invalid/{s}.jpg", "path": None,
                        "bytes": None, "width": 224, "height": 224, "sha256": s} for s in ids], IMG_NOISE, GAP * gap)


def verdict(x: float, target: float) -> str:
    return f"{x:.0f}x (target >= {target:.0f}x: {'met' if x >= target else 'NOT met'})"


def target_notes(rows: list[tuple], t_cluster: float, t_exact: float, d: int, wall_s: float, argv: list[str]) -> str:
    """The issue's targets against this run's rows (nprobe, retrieve s, peak RSS, recall@3, top-1 in 3), why recall
    is where it is, the run's wall time and command line."""
    first = min(rows, key=lambda r: r[0])
    last = max(rows, key=lambda r: r[0])
    both, alone = t_exact / (t_cluster + first[1]), t_exact / first[1]
    return (f"Targets at nprobe={first[0]}: cluster + retrieve {verdict(both, TARGET_ALL)}, retrieve alone "
            f"{verdict(alone, TARGET_RETRIEVE)}. Recall is set by the data's noise, not by the search: each vector "
            f"carries noise of norm {SENT_NOISE:g} (sentences) / {IMG_NOISE:g} (images) against a unit topic centre, "
            f"so within a topic the exact ranking is decided mostly by the noise-noise product (std about "
            f"{SENT_NOISE * IMG_NOISE / math.sqrt(d):.3f} at d={d}), which k-means cannot see; a large Zipf topic is "
            f"split over several clusters and its exact top-3 fall in the unprobed ones about as often as their share "
            f"of the topic, so recall@3 rises with nprobe ({first[3]:.3f} at {first[0]}, {last[3]:.3f} at "
            f"{last[0]}); on data with tight topics the probed cluster holds them (tests/construct/test_retrieve.py). "
            f"Run: {wall_s / 60:.1f} min wall in all, `{' '.join(['python benchmarks/retrieval.py', *argv])}`.")


def main() -> None:
    started = time.time()
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--topics", type=int, default=5000)
    ap.add_argument("--exact-subset", type=int, default=1000)
    ap.add_argument("--nprobes", default="1,2,4,8")
    a = ap.parse_args()
    import faiss
    import pyarrow.parquet as pq
    from _common import append_result, scratch_dir

    from realsyn_pl.construct.engine.arrays import ArrayReader
    from realsyn_pl.construct.engine.config import BuildConfig
    from realsyn_pl.construct.engine.pipeline import run_build

    load_before = os.getloadavg()[0]
    work = scratch_dir("bench-retrieval-")
    t0 = time.time()
    make_data(work, a.sentences, a.images, a.dim, a.topics)
    t_data = time.time() - t0
    k = max(1, a.sentences // 420)

    def cfg(**over) -> BuildConfig:
        c = BuildConfig(work_dir=str(work), progress=False)
        c.cluster.k, c.cluster.method = k, "two_level"
        for key, v in over.items():
            obj, leaf = c, key.split(".")
            for p in leaf[:-1]:
                obj = getattr(obj, p)
            setattr(obj, leaf[-1], v)
        return c

    with PeakRSS() as m:
        t0 = time.time()
        run_build(cfg(stage="cluster"))
        t_cluster = time.time() - t0
    rss_cluster = m.peak
    import json
    kinfo = json.loads((work / "cluster" / "manifest.json").read_text())["kmeans"]

    # exact baseline on a subset of the images, over the cluster-sorted sentences (same vectors, same ids)
    sent_ids, sent = ArrayReader.open(work / "cluster", "emb").load(np.float32)
    img_ids, img = ArrayReader.open(work / "dedup_images", "emb").load(np.float32)
    sub = np.linspace(0, len(img) - 1, min(a.exact_subset, len(img))).astype(int)
    with PeakRSS() as m:
        t0 = time.time()
        index = faiss.IndexFlatIP(a.dim)
        index.add(sent)
        _, exact = index.search(np.ascontiguousarray(img[sub]), 3)
        t_exact_sub = time.time() - t0
    rss_exact = m.peak
    del index, sent
    t_exact = t_exact_sub * len(img) / len(sub)
    truth = {img_ids[i]: [sent_ids[x] for x in row] for i, row in zip(sub, exact)}

    rows = []
    for nprobe in [int(x) for x in a.nprobes.split(",")]:
        with PeakRSS() as m:
            t0 = time.time()
            run_build(cfg(stage="retrieve", force="retrieve", **{"retrieve.nprobe": nprobe}))
            t_ret = time.time() - t0
        got = {}
        for f in sorted((work / "retrieve").glob("retrieved-*.parquet")):
            for r in pq.read_table(f, columns=["id", "sentence_ids"]).to_pylist():
                if r["id"] in truth:
                    got[r["id"]] = r["sentence_ids"]
        recall = np.mean([len(set(got.get(i, [])) & set(t)) / 3 for i, t in truth.items()])
        top1 = np.mean([t[0] in got.get(i, []) for i, t in truth.items()])
        rows.append((nprobe, t_ret, m.peak, recall, top1))
    load_after = os.getloadavg()[0]
    gib = 2 ** 30
    head = ("| nprobe | cluster s | retrieve s | peak RSS cluster / retrieve GiB | recall@3 | exact top-1 in 3 | "
            "speed-up cluster+retrieve | speed-up retrieve |\n|---|---|---|---|---|---|---|---|")
    table = head + "".join(
        f"\n| {p} | {t_cluster:.1f} | {t:.1f} | {rss_cluster / gib:.2f} / {rss / gib:.2f} | {rec:.3f} | {t1:.3f} | "
        f"{t_exact / (t_cluster + t):.0f}x | {t_exact / t:.0f}x |" for p, t, rss, rec, t1 in rows)
    table += (f"\n| exact (faiss flat, fp32) | - | {t_exact:.1f} (measured {t_exact_sub:.1f} s on {len(sub)} images, "
              f"x{len(img) / len(sub):.0f}) | {rss_exact / gib:.2f} | 1 | 1 | 1x | 1x |")
    print(table)
    try:
        cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        cpu = "?"
    notes = (f"{a.sentences:,} sentences x {a.images:,} images, d={a.dim}, {a.topics} Zipf(1.1) topics, modality "
             f"gap 0.8 x a shared unit vector on the image side; fp16 arrays on disk (data written in {t_data:.0f} s). "
             f"`cluster`: k={kinfo['k']} (sentences/420, the paper's ratio), two-level (coarse {kinfo.get('coarse_k')}, "
             f"{kinfo['points_per_centre']} training points per centre), assignment agreement with exact "
             f"{kinfo.get('assign_agreement_top1')}; `retrieve`: exact probe, one process, blas_threads=1. "
             f"Exact: faiss IndexFlatIP over all sentences for {len(sub)} evenly spread images, time scaled linearly "
             f"to all {a.images:,} (recall is measured on those {len(sub)}). Speed-ups: exact time / hierarchical "
             f"time. Machine shared with other developers: load average {load_before:.1f} before, "
             f"{load_after:.1f} after ({cpu} cores). "
             + target_notes(rows, t_cluster, t_exact, a.dim, time.time() - started, sys.argv[1:]))
    print(notes)
    if not os.environ.get("BENCH_DRY"):  # a trial run that leaves docs/benchmarks.md alone
        append_result("Hierarchical retrieval vs exact search (real cluster + retrieve stages)", table, notes)


if __name__ == "__main__":
    main()
