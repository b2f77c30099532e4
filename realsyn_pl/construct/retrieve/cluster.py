"""Stage `cluster`: text semantic clustering of the deduplicated sentence pool (RealSyn §3.2, paper K = 2M).

1. Spherical k-means on a seeded sample of the sentence embeddings -> `centroids.npy` (a killed run that already
   has it does not retrain): flat (kmeans.py, rank 0 trains, the others wait with a heartbeat) up to
   `cluster.two_level_above` centres, two-level above it (twolevel.py: coarse centres, then one resumable
   sub-clustering per coarse centre, split over every rank; `coarse.npy` + `parent.npy` next to the centroids).
2. Every sentence shard i is assigned to its nearest centre in a streamed pass (per-shard, RANK/WORLD_SIZE split,
   resumable) and rewritten *sorted by cluster id*: `emb-i.npy` + ids and `sentences-i.parquet`
   (id, doc_id, text, cluster, centroid_sim). Sorting turns each shard into a set of contiguous per-cluster
   slices (an IVF layout spread over shards), so retrieval reads one range of clusters from every shard with
   sequential reads instead of a random gather over the whole pool.
   Two-level fits assign through both levels (top `cluster.assign_probe` coarse centres, then their children);
   the manifest reports the top-1 agreement with exact assignment on a sample (`kmeans.assign_agreement_top1`).
Counts: every sentence is kept (n_in == n_out); the manifest adds k, training size, points per centre (a thin
sample is reported as `kmeans.thin_sample`), GPU use and cluster sizes.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.arrays import ArrayReader, read_array_shard, save_npy, write_array_shard
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.records import tmp_name, write_table
from realsyn_pl.construct.engine.stage import (
    Counts,
    Stage,
    StageError,
    input_indices,
    rank_world,
    run_sharded,
    write_json,
)
from realsyn_pl.construct.retrieve import kmeans, twolevel
from realsyn_pl.construct.retrieve.waiting import wait_until

NAME, INPUT = "cluster", "dedup_sentences"
CENTROIDS = "centroids.npy"
ROW_GROUP = 8192  # small row groups let retrieval read one cluster range of a shard without the rest
SENTENCES = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("text", pa.string()),
                       ("cluster", pa.int64()), ("centroid_sim", pa.float32())])


NOT_HASHED = ("assign_batch", "wait_timeout_s", "heartbeat_s")  # keys that do not change a byte of the output


def spec_from(c: Any, key: str) -> twolevel.Spec:
    """The k-means spec of a stage config (cluster.* or balance.*)."""
    fields = twolevel.Spec.__dataclass_fields__
    return twolevel.Spec(**{f: getattr(c, f) for f in fields if f != "key" and hasattr(c, f)}, key=key)


def fit_centroids(stage: Stage, reader: ArrayReader, spec: twolevel.Spec, gpu: bool,
                  masks: Optional[Sequence[np.ndarray]] = None, ranks: Optional[tuple[int, int]] = None,
                  info: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """`centroids.npy` on a sample of the rows (where `masks` are True): flat k-means trained by rank 0 (the other
    ranks wait, with a heartbeat and `<key>.wait_timeout_s`), or two-level k-means split over every rank
    (twolevel.py). `ranks`: the (rank, world) taking part, default the environment's. Returns the fit's summary."""
    path, info_path = stage.dir / CENTROIDS, stage.dir / "_kmeans.json"
    rank, world = ranks or rank_world()
    n_rows = int(sum(int(m.sum()) for m in masks)) if masks is not None else len(reader)
    info = info if info is not None else twolevel.plan(spec, n_rows)
    if path.is_file():
        return json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info["method"] == "two_level":
        return twolevel.TwoLevelFit(stage, reader, spec, gpu, info, masks, (rank, world)).run()
    if rank == 0:
        sample = kmeans.sample_rows(reader, info["n_sample_target"], spec.seed, masks)
        if len(sample) == 0:
            raise StageError(f"{stage.name}: no embeddings to cluster")
        try:
            fit = kmeans.train(sample, spec.k, spec.niter, spec.seed, gpu, spec.init, spec.nredo, f"{spec.key}.init")
        except ValueError as err:
            raise StageError(f"{stage.name}: {err}") from None
        write_json(info_path, {**info, "k": len(fit.centroids), "n_train": fit.n_train, "gpu": fit.gpu,
                               "objective": fit.objective, "niter": spec.niter, "init": spec.init,
                               "nredo": spec.nredo})
        save_npy(path, fit.centroids)
    else:
        wait_until(path.is_file, f"the {spec.key} centres from rank 0 ({path})", spec.wait_timeout_s,
                   spec.heartbeat_s, f"{spec.key}.wait_timeout_s")
    return json.loads(info_path.read_text()) if info_path.is_file() else {}


def assigner_for(stage_dir: Path, spec: twolevel.Spec, gpu: bool, batch: int = 65536, fp16: bool = True,
                 mode: Optional[str] = None):
    """The assignment of a fitted stage (`mode`, default spec.assign): exact (every centre; faiss, fp16 on this rank's
    GPU) | two_level (top assign_probe coarse centres, then their children; numpy on the CPU) | auto (two_level for
    a two-level fit on the CPU, exact on a GPU, where 2M centres x 1024 in fp16 are one product away)."""
    mode = mode or spec.assign
    if mode not in ("auto", "exact", "two_level"):
        raise StageError(f"{spec.key}.assign must be auto, exact or two_level, got {mode!r}")
    two = (stage_dir / "parent.npy").is_file()
    if mode == "two_level" and not two:
        raise StageError(f"{spec.key}.assign=two_level needs a two-level fit ({spec.key}.method=two_level)")
    centroids = np.load(stage_dir / CENTROIDS, allow_pickle=False)
    if two and (mode == "two_level" or (mode == "auto" and not gpu)):
        return twolevel.TwoLevelAssigner(np.load(stage_dir / "coarse.npy", allow_pickle=False), centroids,
                                         np.load(stage_dir / "parent.npy", allow_pickle=False), spec.assign_probe,
                                         batch)
    return kmeans.Assigner(centroids, gpu, batch, fp16)


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


def run(cfg: BuildConfig) -> bool:
    c = cfg.cluster
    work = Path(cfg.work_dir)
    in_dir = work / INPUT
    indices = input_indices(in_dir, "emb")
    stage = Stage(work, NAME, asdict(c) | {key: None for key in NOT_HASHED}, [INPUT])
    if stage.skip_complete(cfg.force):
        return True
    gpu = kmeans.use_gpu(c.gpu, "cluster.gpu")
    spec = spec_from(c, "cluster")
    reader = ArrayReader.open(in_dir, "emb", indices)
    plan = twolevel.plan(spec, len(reader))  # refuses a config that cannot run before any work
    stage.begin(cfg.force)
    info = fit_centroids(stage, reader, spec, gpu, info=plan)
    assigner = assigner_for(stage.dir, spec, gpu, c.assign_batch, c.gpu_fp16)
    k = len(np.load(stage.dir / CENTROIDS, mmap_mode="r", allow_pickle=False))
    extra = lambda st: {"kmeans": info, **size_summary(st, indices, k)}  # noqa: E731
    return run_sharded(stage, indices, lambda i: assign_shard(stage, in_dir, i, assigner), cfg.progress,
                       False, extra=extra)
