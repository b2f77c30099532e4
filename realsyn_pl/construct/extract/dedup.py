"""Stages `dedup_images` and `dedup_sentences`: exact, then semantic (faiss + Union-Find) deduplication.

Global stage: rank 0 does the work, other ranks wait for the manifest. Steps:
1. exact: key = sha256 of the image bytes (from image_filter) / of the normalised text (lower-case, words only,
   single spaces); the first occurrence in id order stays, the rest are dropped as `exact_duplicate`.
2. semantic: on the embeddings of the survivors, pairs with cosine distance < dedup.threshold (default 0.1) among
   each item's dedup.k nearest neighbours (faiss flat or IVF inner product) are united (Union-Find); each group keeps
   the member nearest its centroid, the rest are dropped as `near_duplicate`. With dedup.mode=quantile the
   threshold is the smallest one at which the stage removes dedup.quantile of its input in total (bisection over
   the found pairs' distances, each step a scipy connected-components count), so a corpus can be matched to the
   paper's removal fractions; the manifest's `semantic_threshold` says what was used. Search results are cached per query
   chunk (`_pairs/`), so a killed run resumes there; everything is deterministic, so a rerun writes the same bytes.
Output per embedding shard i: `{images|sentences}-i.parquet` (the kept input records, full columns),
`emb-i.npy` + ids (kept embeddings), `removed-i.parquet` (id, reason, kept id of its group).
The manifest adds `removed_per_step`.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.arrays import ArrayReader, read_array_shard, write_array_shard
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.records import iter_rows, write_records, write_table
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices, rank_world
from realsyn_pl.construct.extract.model_stages import EMBED_INPUTS
from realsyn_pl.construct.extract.sentence_filters import words
from realsyn_pl.construct.extract.union_find import groups_and_keepers, near_duplicate_pairs, threshold_for_fraction

SOURCES = {"dedup_images": "embed_images", "dedup_sentences": "embed_sentences"}
REMOVED = pa.schema([("id", pa.string()), ("reason", pa.string()), ("kept_id", pa.string())])


def text_key(text: str) -> str:
    return hashlib.sha256(" ".join(w.lower() for w in words(text)).encode()).hexdigest()


def exact_keep(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, row of the first occurrence of each row's key)."""
    first: dict[str, int] = {}
    rep = np.array([first.setdefault(k, i) for i, k in enumerate(keys)], dtype=np.int64)
    return rep == np.arange(len(keys)), rep


def run(cfg: BuildConfig, name: str) -> bool:
    started = time.time()
    emb_name = SOURCES[name]
    rec_stage, kind = EMBED_INPUTS[emb_name]
    d = cfg.dedup_text if name == "dedup_sentences" and cfg.dedup_text is not None else cfg.dedup
    work = Path(cfg.work_dir)
    emb_dir, rec_dir = work / emb_name, work / rec_stage
    indices = input_indices(emb_dir, "emb")
    stage = Stage(work, name, asdict(d), [emb_name, rec_stage])
    if stage.skip_complete(cfg.force):
        return True
    rank, _ = rank_world()
    if rank != 0:
        stage.wait_complete()
        return True
    if d.index not in ("flat", "ivf"):
        raise StageError(f"dedup.index must be flat or ivf, got {d.index!r}")
    if d.mode not in ("absolute", "quantile") or not 0.0 <= d.quantile < 1.0:
        raise StageError(f"dedup.mode must be absolute or quantile (with 0 <= dedup.quantile < 1), got {d.mode!r}, "
                         f"quantile {d.quantile}")
    stage.begin(cfg.force)
    ids, x = ArrayReader.open(emb_dir, "emb", indices).load(np.float32)
    shard_of = np.concatenate([np.full(len(read_array_shard(emb_dir, "emb", i, mmap=True)[0]), i) for i in indices]
                              ) if indices else np.zeros(0, np.int64)
    # 1. exact
    n = len(ids)
    if d.exact:
        key_col = "sha256" if kind == "images" else "text"
        key_of = {}
        for i in indices:
            for r in iter_rows(rec_dir / f"{kind}-{i:05d}.parquet", ["id", key_col]):
                key_of[r["id"]] = r[key_col] if kind == "images" else text_key(r[key_col])
        exact_mask, exact_rep = exact_keep([key_of[i] for i in ids])
    else:
        exact_mask, exact_rep = np.ones(n, bool), np.arange(n)
    # 2. semantic, on the exact survivors
    keep = exact_mask.copy()
    near_rep = np.arange(n)
    threshold = {"mode": d.mode, "threshold": d.threshold if d.semantic else None}
    if d.semantic and n:
        rows = np.flatnonzero(exact_mask)
        sub = np.ascontiguousarray(x[rows])
        search_t = d.max_threshold if d.mode == "quantile" else d.threshold
        pairs, dist = near_duplicate_pairs(sub, search_t, d.k, d.index, d.nlist, d.nprobe, d.query_chunk,
                                           stage.dir / "_pairs", d.seed, cfg.progress, with_distances=True)
        if d.mode == "quantile":
            # the semantic step's share of the target: what the exact step did not already remove
            want = max(0.0, d.quantile * n - (n - len(rows))) / max(1, len(rows))
            t, _ = threshold_for_fraction(len(rows), pairs, dist, want)
            pairs = pairs[dist < t]
            threshold.update(threshold=t, target_fraction=d.quantile, searched_up_to=d.max_threshold)
        roots, sub_keep = groups_and_keepers(sub, pairs)
        keep[rows] = sub_keep
        keeper_of_root = {int(roots[j]): int(rows[j]) for j in np.flatnonzero(sub_keep)}
        near_rep[rows] = [keeper_of_root[int(r)] for r in roots]
    # exact duplicates point at the keeper of their first occurrence's group
    kept_id = [ids[near_rep[exact_rep[j]]] for j in range(n)]
    removed_steps = {"exact_duplicate": int((~exact_mask).sum()), "near_duplicate": int((exact_mask & ~keep).sum())}
    for i in indices:
        if stage.shard_done(i):
            continue
        t0 = time.time()
        sel = np.flatnonzero(shard_of == i)
        kept_rows = [j for j in sel if keep[j]]
        kept_ids = set(ids[j] for j in kept_rows)
        recs = [r for r in iter_rows(rec_dir / f"{kind}-{i:05d}.parquet") if r["id"] in kept_ids]
        schema = pq.read_schema(rec_dir / f"{kind}-{i:05d}.parquet")
        write_table(stage.path(kind, i), pa.Table.from_pylist(recs, schema=schema))
        write_array_shard(stage.dir, "emb", i, [ids[j] for j in kept_rows],
                          x[kept_rows] if kept_rows else np.zeros((0, x.shape[1] if x.ndim == 2 else 0)),
                          cfg.embed.dtype)
        c = Counts()
        removed = []
        for j in sel:
            if keep[j]:
                c.keep()
            else:
                reason = "exact_duplicate" if not exact_mask[j] else "near_duplicate"
                c.drop(reason)
                removed.append({"id": ids[j], "reason": reason, "kept_id": kept_id[j]})
        write_records(stage.path("removed", i), removed, REMOVED)
        stage.mark_shard_done(i, c, time.time() - t0)
    return stage.finalize(indices, started, {"removed_per_step": removed_steps, "semantic_threshold": threshold})
