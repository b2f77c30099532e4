"""Stage `cluster`: text semantic clustering of the deduplicated sentence pool (RealSyn §3.2, paper K = 2M).

1. Rank 0 trains spherical k-means (kmeans.py) on a seeded sample of the sentence embeddings and writes
   `centroids.npy`; other ranks wait for it (a killed run that already has it does not retrain).
2. Every sentence shard i is assigned to its nearest centre in a streamed pass (per-shard, RANK/WORLD_SIZE split,
   resumable) and rewritten *sorted by cluster id*: `emb-i.npy` + ids and `sentences-i.parquet`
   (id, doc_id, text, cluster, centroid_sim). Sorting turns each shard into a set of contiguous per-cluster
   slices (an IVF layout spread over shards), so retrieval reads one range of clusters from every shard with
   sequential reads instead of a random gather over the whole pool.
Counts: every sentence is kept (n_in == n_out); the manifest adds k, training size, GPU use and cluster sizes.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.arrays import ArrayReader, read_array_shard, write_array_shard
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.records import tmp_name, write_table
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices, rank_world, run_sharded
from realsyn_pl.construct.retrieve import kmeans

NAME, INPUT = "cluster", "dedup_sentences"
CENTROIDS = "centroids.npy"
ROW_GROUP = 8192  # small row groups let retrieval read one cluster range of a shard without the rest
SENTENCES = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("text", pa.string()),
                       ("cluster", pa.int64()), ("centroid_sim", pa.float32())])


def save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = tmp_name(path)
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    os.replace(tmp, path)


def wait_for(path: Path, timeout_s: float = 86400.0) -> None:
    deadline = time.time() + timeout_s
    while not path.is_file():
        if time.time() > deadline:
            raise StageError(f"timed out waiting for {path}")
        time.sleep(2.0)


def fit_centroids(stage: Stage, reader: ArrayReader, k: int, niter: int, n_sample: int, seed: int,
                  gpu: bool, init: str, masks: Optional[Sequence[np.ndarray]] = None, nredo: int = 1) -> dict[str, Any]:
    """Train (rank 0) or wait for (other ranks) `centroids.npy` on a sample of the rows (where `masks` are True);
    returns the fit's summary for the manifest."""
    path, info_path = stage.dir / CENTROIDS, stage.dir / "_kmeans.json"
    if not path.is_file():
        if rank_world()[0] == 0:
            sample = kmeans.sample_rows(reader, n_sample, seed, masks)
            if len(sample) == 0:
                raise StageError(f"{stage.name}: no embeddings to cluster")
            try:
                fit = kmeans.train(sample, k, niter, seed, gpu, init, nredo)
            except ValueError as err:
                raise StageError(f"{stage.name}: {err}") from None
            from realsyn_pl.construct.engine.stage import write_json

            write_json(info_path, {"k_requested": k, "k": len(fit.centroids), "n_train": fit.n_train,
                                   "gpu": fit.gpu, "objective": fit.objective, "niter": niter, "init": init, "nredo": nredo})
            save_npy(path, fit.centroids)
        else:
            wait_for(path)
    import json

    return json.loads(info_path.read_text()) if info_path.is_file() else {}


def sorted_by_cluster(labels: np.ndarray) -> np.ndarray:
    return np.argsort(labels, kind="stable")  # stable: ties keep input order, so reruns write the same bytes


def assign_shard(stage: Stage, in_dir: Path, index: int, assigner: kmeans.Assigner) -> Counts:
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


def run(cfg: BuildConfig) -> bool:
    c = cfg.cluster
    work = Path(cfg.work_dir)
    in_dir = work / INPUT
    indices = input_indices(in_dir, "emb")
    stage = Stage(work, NAME, asdict(c) | {"assign_batch": None}, [INPUT])
    if stage.skip_complete(cfg.force):
        return True
    gpu = kmeans.use_gpu(c.gpu, "cluster.gpu")
    stage.begin(cfg.force)
    reader = ArrayReader.open(in_dir, "emb", indices)
    info = fit_centroids(stage, reader, c.k, c.niter, c.train_sample, c.seed, gpu, c.init, nredo=c.nredo)
    centroids = np.load(stage.dir / CENTROIDS, allow_pickle=False)
    assigner = kmeans.Assigner(centroids, gpu, c.assign_batch)
    extra = lambda st: {"kmeans": info, **size_summary(st, indices, len(centroids))}  # noqa: E731
    return run_sharded(stage, indices, lambda i: assign_shard(stage, in_dir, i, assigner), cfg.progress,
                       False, extra=extra)
