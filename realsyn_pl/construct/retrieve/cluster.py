"""Stage `cluster`: text semantic clustering of the deduplicated sentence pool (RealSyn §3.2, paper K = 2M).

1. Spherical k-means on a seeded sample of the sentence embeddings -> `centroids.npy` (a killed run that already
   has it does not retrain; construct/clustering/): flat (one task) up to `cluster.two_level_above` centres,
   two-level above it (coarse centres, then one resumable sub-clustering task per coarse centre; `coarse.npy` +
   `parent.npy` next to the centroids).
2. Every sentence shard i is assigned to its nearest centre in a streamed pass (a task per shard, resumable) and
   rewritten *sorted by cluster id*: `emb-i.npy` + ids and `sentences-i.parquet`
   (id, doc_id, text, cluster, centroid_sim). Sorting turns each shard into a set of contiguous per-cluster
   slices (an IVF layout spread over shards), so retrieval reads one range of clusters from every shard with
   sequential reads instead of a random gather over the whole pool.
   Two-level fits assign through both levels (top `cluster.assign_probe` coarse centres, then their children);
   the manifest reports the top-1 agreement with exact assignment on a sample (`kmeans.assign_agreement_top1`).
Counts: every sentence is kept (n_in == n_out); the manifest adds k, training size, points per centre (a thin
sample is reported as `kmeans.thin_sample`), GPU use and cluster sizes.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.clustering import kmeans, twolevel
from realsyn_pl.construct.clustering.centroids import CENTROIDS, AssignerOf, fit_centroids, spec_from
from realsyn_pl.construct.engine.arrays import ArrayReader, read_array_shard, save_npy, write_array_shard
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.records import tmp_name, write_table
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices

NAME, INPUT = "cluster", "dedup_sentences"
ROW_GROUP = 8192  # small row groups let retrieval read one cluster range of a shard without the rest
SENTENCES = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("text", pa.string()),
                       ("cluster", pa.int64()), ("centroid_sim", pa.float32())])


NOT_HASHED = ("assign_batch",)  # keys that do not change a byte of the output


def sorted_by_cluster(labels: np.ndarray) -> np.ndarray:
    return np.argsort(labels, kind="stable")  # stable: ties keep input order, so reruns write the same bytes


def assign_shard(stage: Stage, in_dir: Path, index: int, assigner: Any) -> Counts:
    ids, emb = read_array_shard(in_dir, "emb", index, mmap=True)
    texts = {}
    for rec in pq.read_table(in_dir / f"sentences-{index:05d}.parquet", columns=["id", "doc_id", "text"]).to_pylist():
        texts[rec["id"]] = rec
    counts = Counts()
    if len(ids) == 0:
        write_array_shard(stage.dir, "emb", index, [], np.zeros((0, emb.shape[1] if emb.ndim == 2 else 0)),
                          str(emb.dtype))
        write_table(stage.path("sentences", index), SENTENCES.empty_table())
        return counts
    labels, sims = assigner.search(emb, 1)
    labels, sims = labels[:, 0], sims[:, 0]
    order = sorted_by_cluster(labels)
    missing = [ids[j] for j in order if ids[j] not in texts]
    if missing:
        raise StageError(f"{INPUT} shard {index}: {len(missing)} embedded sentence(s) have no record, "
                         f"first {missing[0]}")
    rows = [texts[ids[j]] for j in order]
    table = pa.table({"id": [r["id"] for r in rows], "doc_id": [r["doc_id"] for r in rows],
                      "text": [r["text"] for r in rows], "cluster": labels[order].astype(np.int64),
                      "centroid_sim": sims[order].astype(np.float32)}, schema=SENTENCES)
    tmp = tmp_name(stage.path("sentences", index))
    pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP)
    os.replace(tmp, stage.path("sentences", index))
    write_array_shard(stage.dir, "emb", index, [ids[j] for j in order], np.asarray(emb)[order], str(emb.dtype))
    counts.keep(len(ids))
    return counts


def size_summary(stage: Stage, indices: list[int], k: int) -> dict[str, Any]:
    labels = [pq.read_table(stage.path("sentences", i), columns=["cluster"]).column("cluster").to_numpy()
              for i in indices]
    sizes = kmeans.cluster_sizes(labels, k)
    save_npy(stage.dir / "cluster_sizes.npy", sizes)
    nz = sizes[sizes > 0]
    return {"cluster_sizes": {"k": int(k), "non_empty": int(len(nz)), "max": int(nz.max()) if len(nz) else 0,
                              "median": float(np.median(nz)) if len(nz) else 0.0,
                              "mean": float(nz.mean()) if len(nz) else 0.0}}


def run(cfg: BuildConfig, ex: Executor) -> bool:
    c = cfg.cluster
    work = Path(cfg.work_dir)
    in_dir = work / INPUT
    indices = input_indices(in_dir, "emb")
    stage = Stage(work, NAME, asdict(c) | {key: None for key in NOT_HASHED}, [INPUT])
    if stage.skip_complete(cfg.force):
        return True
    gpu = kmeans.use_gpu(c.gpu, "cluster.gpu", ex.session.gpus)
    spec = spec_from(c, "cluster")
    reader = ArrayReader.open(in_dir, "emb", indices)
    plan = twolevel.plan(spec, len(reader))  # refuses a config that cannot run before any work
    stage.begin(cfg.force)
    info = fit_centroids(ex, stage, reader, spec, gpu, info=plan)
    assigner = AssignerOf(stage.dir, spec, gpu, c.assign_batch, c.gpu_fp16)
    k = len(np.load(stage.dir / CENTROIDS, mmap_mode="r", allow_pickle=False))
    extra = lambda st: {"kmeans": info, **size_summary(st, indices, k)}  # noqa: E731
    return run_sharded(ex, stage, indices, lambda i: assign_shard(stage, in_dir, i, assigner()), cfg.force,
                       extra=extra, resources=ex.resources(NAME, gpu=gpu))
