"""Stage `balance`: semantic balance sampling (RealSyn §3.3): similarity window, image k-means, nested caps.

1. similarity per image: cosine(image, syn_text) (paper; needs the syn_text stage of issue 6 and an embedding of its
   texts) or, with the explicit `balance.similarity_text=text1`, the retrieval cosine of text1. Never silently
   switched: without syn_text and without the flag the stage stops with a one-line error.
2. window: keep low <= sim <= high (absolute, paper [0.51, 0.61]) or bounds at quantiles of the observed sims.
3. spherical k-means over the embeddings of the in-window images (paper 1M centres; trained on a seeded sample,
   `centroids.npy` reused on resume), every in-window image assigned.
4. cap: one seeded ranking inside each cluster (caps.py); cap t keeps cluster_rank < t, so the caps are nested.
Global stage: rank 0 computes, other ranks wait (the global state is a few numbers per image).
Output per retrieve shard j: `balanced-j.parquet` = the retrieve columns + syn_text, similarity, image_cluster,
cluster_size, cluster_rank, for every in-window image; drops below_window, above_window, no_similarity, no_syn_text.
Produced: cap_<t> (pairs kept by cap t). Side files for the dataset card: `similarity.npy` (every image's sim before
the window), `image_cluster_sizes.npy`.

Contract with the syn_text stage (issue 6): a done stage dir `<work>/<balance.syn_text_stage>` whose per-shard
record files `*-{j:05d}.parquet` (shard j of retrieve) have columns id (image id) and syn_text; and a done dir
`<work>/<balance.syn_emb_stage>` with `emb-{j:05d}.npy` + ids: the teacher's L2-normalised syn_text embeddings.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.balance import caps
from realsyn_pl.construct.engine.arrays import ArrayReader, read_array_shard
from realsyn_pl.construct.engine.config import BalanceConfig, BuildConfig
from realsyn_pl.construct.engine.records import write_table
from realsyn_pl.construct.engine.stage import MANIFEST, Counts, Stage, StageError, input_indices, rank_world
from realsyn_pl.construct.retrieve import kmeans, twolevel
from realsyn_pl.construct.retrieve.cluster import (
    CENTROIDS,
    NOT_HASHED,
    assigner_for,
    fit_centroids,
    save_npy,
    spec_from,
)
from realsyn_pl.construct.retrieve.hierarchical import RETRIEVED

NAME, RETR, IMG = "balance", "retrieve", "dedup_images"
BALANCED = pa.schema(list(RETRIEVED) + [
    pa.field("syn_text", pa.string()), pa.field("similarity", pa.float32()), pa.field("image_cluster", pa.int64()),
    pa.field("cluster_size", pa.int64()), pa.field("cluster_rank", pa.int64())])


def _done_dir(work: Path, name: str, what: str) -> Path:
    d = work / name
    if not (d / MANIFEST).is_file():
        raise StageError(f"balance.similarity_text=syn_text needs {what} in {d} (stage {name!r}, issue 6), which "
                         "is not built; build it first, or set balance.similarity_text=text1 to apply the window "
                         "to the retrieval similarity of text1 instead")
    return d


def syn_texts(work: Path, b: BalanceConfig, j: int) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """syn_text and its embedding by image id, for retrieve shard j."""
    d = _done_dir(work, b.syn_text_stage, "synthetic texts")
    e = _done_dir(work, b.syn_emb_stage, "syn_text embeddings")
    texts: dict[str, str] = {}
    for f in sorted(d.glob(f"*-{j:05d}.parquet")):
        if f.name.endswith(".ids.parquet") or "syn_text" not in pq.read_schema(f).names:
            continue
        for r in pq.read_table(f, columns=["id", "syn_text"]).to_pylist():
            if r["syn_text"]:
                texts[r["id"]] = r["syn_text"]
    emb: dict[str, np.ndarray] = {}
    if (e / f"emb-{j:05d}.npy").is_file():
        ids, arr = read_array_shard(e, "emb", j)
        emb = {i: np.asarray(v, np.float32) for i, v in zip(ids, arr)}
    return texts, emb


class ShardState:
    """What the global steps need of one retrieve shard: rows, similarity, syn_text, row in the image emb shard."""

    def __init__(self, work: Path, cfg: BuildConfig, j: int):
        self.rows = pq.read_table(work / RETR / f"retrieved-{j:05d}.parquet").to_pylist()
        emb_ids, self.emb = read_array_shard(work / IMG, "emb", j, mmap=True)
        pos = {i: p for p, i in enumerate(emb_ids)}
        self.emb_row = np.array([pos[r["id"]] for r in self.rows], np.int64)
        self.syn: list[Optional[str]] = [None] * len(self.rows)
        self.sim = np.full(len(self.rows), np.nan, np.float32)
        self.missing_syn = np.zeros(len(self.rows), bool)
        b = cfg.balance
        if b.similarity_text == "text1":
            self.sim[:] = [r["sims"][0] for r in self.rows]
        else:
            texts, embs = syn_texts(work, b, j)
            for n, r in enumerate(self.rows):
                t, v = texts.get(r["id"]), embs.get(r["id"])
                self.syn[n] = t
                if t is None or v is None:
                    self.missing_syn[n] = True
                else:
                    self.sim[n] = float(np.asarray(self.emb[self.emb_row[n]], np.float32) @ v)
        if b.similarity_text == "text1":
            # syn_text still rides along when it exists (the writer's .json wants it), the window does not use it
            d = work / b.syn_text_stage
            if (d / MANIFEST).is_file() and (work / b.syn_emb_stage / MANIFEST).is_file():
                texts, _ = syn_texts(work, b, j)
                self.syn = [texts.get(r["id"]) for r in self.rows]


def run(cfg: BuildConfig) -> bool:
    started = time.time()
    b = cfg.balance
    if b.similarity_text not in ("syn_text", "text1"):
        raise StageError(f"balance.similarity_text must be syn_text or text1, got {b.similarity_text!r}")
    if not b.caps or any(t < 1 for t in b.caps):
        raise StageError(f"balance.caps must be positive cluster caps, got {list(b.caps)}")
    work = Path(cfg.work_dir)
    indices = input_indices(work / RETR, "retrieved")
    # with text1 the syn_text stages are read too when they exist (their syn_text rides along): always inputs
    inputs = [RETR, IMG, b.syn_text_stage, b.syn_emb_stage]
    stage = Stage(work, NAME, asdict(b) | {key: None for key in NOT_HASHED if key in asdict(b)}, inputs)
    if stage.skip_complete(cfg.force):
        return True
    if rank_world()[0] != 0:
        stage.wait_complete()
        return True
    gpu = kmeans.use_gpu(b.gpu, "balance.gpu")
    twolevel.check(spec_from(b, "balance"))  # an init that cannot run at this k is refused before any work
    stage.begin(cfg.force)
    shards = {j: ShardState(work, cfg, j) for j in indices}
    all_sims = np.concatenate([s.sim for s in shards.values()]) if shards else np.zeros(0, np.float32)
    try:
        lo, hi = caps.window_bounds(all_sims, b.window)
    except ValueError as err:
        raise StageError(f"balance: {err}") from None
    save_npy(stage.dir / "similarity.npy", all_sims)
    reasons = {j: [("no_syn_text" if s.missing_syn[n] else caps.window_reason(float(s.sim[n]), lo, hi))
                   for n in range(len(s.rows))] for j, s in shards.items()}
    # image k-means over the in-window images only (the paper clusters the 168.3M pairs left by the window)
    reader = ArrayReader.open(work / IMG, "emb", indices)
    masks = []
    for j in indices:
        m = np.zeros(len(shards[j].emb), bool)
        m[shards[j].emb_row[[r is None for r in reasons[j]]]] = True
        masks.append(m)
    if not any(m.any() for m in masks):
        raise StageError(f"balance: no pair lies inside the window [{lo:.4f}, {hi:.4f}]; check the similarity "
                         "scale of the embedding model or use balance.window.mode=quantile")
    # a global stage: rank 0 runs every k-means step itself (ranks=(0, 1)), flat or two-level
    spec = spec_from(b, "balance")
    info = fit_centroids(stage, reader, spec, gpu, masks, ranks=(0, 1))
    centroids = np.load(stage.dir / CENTROIDS, mmap_mode="r", allow_pickle=False)
    assigner = assigner_for(stage.dir, spec, gpu)
    kept_j, kept_n, clusters, ids = [], [], [], []
    for j in indices:
        s = shards[j]
        sel = [n for n, r in enumerate(reasons[j]) if r is None]
        if sel:
            lab, _ = assigner.search(np.asarray(s.emb[s.emb_row[sel]], np.float32), 1)
            clusters.append(lab[:, 0])
        kept_j += [j] * len(sel)
        kept_n += sel
        ids += [s.rows[n]["id"] for n in sel]
    clusters = np.concatenate(clusters).astype(np.int64)
    ranks = caps.cluster_ranks(clusters, caps.draw_keys(ids, b.seed))
    sizes = np.bincount(clusters, minlength=len(centroids))
    save_npy(stage.dir / "image_cluster_sizes.npy", sizes)
    placed = {(j, n): (int(c), int(r)) for j, n, c, r in zip(kept_j, kept_n, clusters, ranks)}
    for j in indices:
        if stage.shard_done(j):
            continue
        t0, s, c, out = time.time(), shards[j], Counts(), []
        for n, row in enumerate(s.rows):
            if reasons[j][n] is not None:
                c.drop(reasons[j][n])
                continue
            cl, rk = placed[(j, n)]
            c.keep()
            for t in b.caps:
                if rk < t:
                    c.produce(f"cap_{t}")
            out.append({**row, "syn_text": s.syn[n], "similarity": float(s.sim[n]), "image_cluster": cl,
                        "cluster_size": int(sizes[cl]), "cluster_rank": rk})
        cols = {f.name: [r.get(f.name) for r in out] for f in BALANCED}
        write_table(stage.path("balanced", j), pa.Table.from_pydict(cols, schema=BALANCED))
        stage.mark_shard_done(j, c, time.time() - t0)
    summary = {"window": {"mode": b.window.mode, "low": lo, "high": hi, "similarity_text": b.similarity_text,
                          "removed_fraction": round(1 - len(ids) / max(1, len(all_sims)), 6)},
               "kmeans": info, "caps": caps.cap_sizes(clusters, ranks, b.caps),
               "image_clusters": {"non_empty": int((sizes > 0).sum()), "max": int(sizes.max()),
                                  **{f"max_after_cap_{t}": int(np.minimum(sizes, t).max()) for t in b.caps}}}
    if b.similarity_text == "text1":
        summary["window"]["note"] = ("window applied to the retrieval similarity of text1 "
                                     "(balance.similarity_text=text1), not to syn_text as in the paper")
    return stage.finalize(indices, started, summary)
