"""Stages `dedup_images` and `dedup_sentences`: exact dedup by 64-bit keys, then semantic dedup inside k-means
clusters (SemDeDup layout), every step a set of Ray tasks (one per shard, key range, bucket or part), resumable.

Items are the rows of the embedding shards; (shard, row) order is id order, a global position = shard offset + row.
1. exact (exact_keys.py): `_keys/` per shard, a uint64 key per item (images: first 64 bits of the records'
   `sha256`; sentences: hash64 of the normalised text: lower-case words, single spaces), sorted by key;
   `_exact/` per key range (dedup.partitions reducers, 0 = ceil(2 items / dedup.reducer_items)): every item whose key
   occurred earlier in (shard, row) order is an `exact_duplicate` of that first occurrence.
2. semantic (semdedup.py) on the exact survivors: `_centres/` spherical k-means into ceil(survivors /
   dedup.cluster_size) centres (none for one cluster); `_assign/` per shard, each item's nearest (member) and
   second-nearest (guest) centre, its rows beside the records in the same order; `_pairs/` per bucket of whole
   clusters (at most dedup.bucket_items members + guests; a larger cluster in square tiles of bucket_items / 2 rows
   by as many columns), every member x member and member x guest pair with cosine distance < dedup.threshold
   (strict), folded dedup.pair_chunk at a time into the unit's minimum spanning forest, which is what it writes: at
   most one edge per item however dense its near-duplicate groups (n copies make n^2 / 2 pairs), and for every
   threshold the same connected items as all pairs. Unlike the former faiss search there is no
   k-nearest-neighbour cap (all pairs within a cluster are seen), and a pair is found only when one item's two
   nearest centres include the other's nearest (the guests catch border pairs). On data where every near pair
   shares a cluster this equals the former flat search whenever no item had more than k near neighbours. One task
   then folds the forests into one (O(grouped items)): with dedup.mode=quantile the threshold is the smallest at
   which the stage removes dedup.quantile of its input in total (the count removed is the number of forest edges
   below it); connected components are the groups -> `_groups.npy`. `_keepers/` per part of the groups: the member
   with the highest dot product with the group's mean vector stays (ties: lowest position), the others are
   `near_duplicate`s of it.
3. kept ids, a shuffle keyed by the keeper's shard (partition.save_sorted / read_range): `_removed/` per shard, each
   removed row with its keeper's (shard, row) (an exact duplicate's keeper is the keeper of its first occurrence's
   group), sorted by the keeper's shard; `_kept/` per run of ~sqrt(shards) keeper shards (one range read of every
   removed-row file per run: shards^1.5 opens, not shards^2), for each keeper shard s the removed rows pointing into
   s, their keepers' ids from s's id column (read once), an Arrow IPC file (shard, row, kept_id) sorted by (shard,
   row).
   Each id column is so read O(1) times in the stage, not once per output shard that points into it.
4. per shard i: `{images|sentences}-i.parquet` (the kept input records with every input column, an Arrow filter),
   `emb-i.npy` + ids (kept rows), `removed-i.parquet` (id, reason, kept_id: the keeper of its group), its kept ids
   cut by binary search from the memory-mapped `_kept/` files of the keeper shards it points into.
The manifest adds `removed_per_step`, `semantic_threshold`, `clusters`, `pairs` (found under the search threshold)
and `grouping_edges` (the forest's edges under the threshold used: grouped items minus groups). Every step writes
files that do not depend on the number of workers, so 1 or N workers, or a killed run rerun, write the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realsyn_pl.construct import calibration
from realsyn_pl.construct.clustering import kmeans, twolevel
from realsyn_pl.construct.clustering.centroids import CENTROIDS, AssignerOf, fit_centroids
from realsyn_pl.construct.engine import products
from realsyn_pl.construct.engine.arrays import (
    ArrayReader,
    MappedShards,
    ids_path,
    read_array_shard,
    save_npy,
    shard_sizes,
    write_array_shard,
)
from realsyn_pl.construct.engine.config import BuildConfig, DedupConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.order import EMBED_INPUTS
from realsyn_pl.construct.engine.partition import read_range, save_sorted
from realsyn_pl.construct.engine.records import tmp_name, write_table
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices, write_json
from realsyn_pl.construct.extract import exact_keys as ek
from realsyn_pl.construct.extract import semdedup as sd

SOURCES = {"dedup_images": "embed_images", "dedup_sentences": "embed_sentences"}
REMOVED = pa.schema([("id", pa.string()), ("reason", pa.string()), ("kept_id", pa.string())])
# kept-id shuffle: a removed row (shard, row) and its keeper (kshard, krow); the resolved ids, per keeper shard
RESOLVE = np.dtype([("kshard", "<i4"), ("shard", "<i4"), ("row", "<i8"), ("krow", "<i8")])
KEPT = pa.schema([("shard", pa.int32()), ("row", pa.int64()), ("kept_id", pa.string())])
GROUPS, SEMANTIC = "_groups.npy", "_semantic.json"
TWO_LEVEL_ABOVE = 4096  # dedup centres from which k-means is two-level
PAPER = {"dedup_images": calibration.IMAGE_DEDUP, "dedup_sentences": calibration.SENTENCE_DEDUP}
REMOVAL_AT = calibration.BAND[0], 1.0, calibration.BAND[1]  # multiples of the paper's removal the stop line lists


def text_key(text: str) -> str:
    return hashlib.sha256(ek.normalised(text).encode()).hexdigest()


def exact_keep(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, row of the first occurrence of each row's key): the rule the key-range reducers apply."""
    first: dict[str, int] = {}
    rep = np.array([first.setdefault(k, i) for i, k in enumerate(keys)], dtype=np.int64)
    return rep == np.arange(len(keys)), rep


def check(d: DedupConfig) -> None:
    if d.mode not in ("absolute", "quantile") or not 0.0 <= d.quantile < 1.0:
        raise StageError(f"dedup.mode must be absolute or quantile (with 0 <= dedup.quantile < 1), got {d.mode!r}, "
                         f"quantile {d.quantile}")
    for key in ("cluster_size", "bucket_items", "block", "pair_chunk", "reducer_items", "niter"):
        if getattr(d, key) < 1:
            raise StageError(f"dedup.{key} must be >= 1, got {getattr(d, key)}")
    if d.mode == "quantile" and not 0.0 <= d.quantile_floor < d.max_threshold:
        raise StageError(f"dedup.quantile_floor must be >= 0 and below dedup.max_threshold={d.max_threshold}, got "
                         f"{d.quantile_floor}")
    if d.partitions < 0:
        raise StageError(f"dedup.partitions must be >= 0 (0 = from the pool size), got {d.partitions}")


class Pool:
    """The embedding shards of one dedup run: sizes, offsets (global positions) and memory maps (opened in each task
    on first use; the object travels to the tasks as paths and sizes)."""

    def __init__(self, emb_dir: Path, indices: Sequence[int]):
        self.dir, self.indices = emb_dir, list(indices)
        self.arrays = MappedShards(emb_dir, "emb", self.indices)
        self.sizes = np.array(shard_sizes(emb_dir, "emb", self.indices), np.int64)
        self.offsets = np.r_[0, np.cumsum(self.sizes)[:-1]].astype(np.int64) if len(indices) else np.zeros(0, int)
        self.slot = {i: s for s, i in enumerate(self.indices)}
        self.rows = sd.Rows(self.arrays, self.offsets)

    @property
    def width(self) -> int:
        return next((a.shape[1] for a in self.arrays if a.ndim == 2 and len(a)), 0)

    @property
    def n(self) -> int:
        return int(self.sizes.sum())

    def pos(self, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
        slots = np.array([self.slot[int(i)] for i in np.unique(shard)], np.int64)
        lut = np.zeros(int(max(self.indices, default=0)) + 1, np.int64)
        lut[np.unique(shard).astype(np.int64)] = self.offsets[slots] if len(slots) else 0
        return lut[np.asarray(shard, np.int64)] + np.asarray(row, np.int64)


def _files(st: Stage, kind: str, units: Sequence[int]) -> list[Path]:
    return [st.path(kind, u, "npy") for u in units]


def _produced(n: int, what: str) -> Counts:
    c = Counts()
    c.produce(what, n)
    return c


def cluster_sizes(assign_files: Sequence[Path], n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(members + guests, members) per cluster, counted over every shard's assignment records."""
    sizes, members = np.zeros(n_clusters, np.int64), np.zeros(n_clusters, np.int64)
    for p in assign_files:
        rec = np.load(p, mmap_mode="r", allow_pickle=False)
        sizes += np.bincount(rec["cluster"], minlength=n_clusters)
        members += np.bincount(rec["cluster"][rec["role"] == 0], minlength=n_clusters)
    return sizes, members


def run(cfg: BuildConfig, ex: Executor, name: str) -> bool:
    emb_name = SOURCES[name]
    rec_stage, kind = EMBED_INPUTS[emb_name]
    own = name == "dedup_sentences" and cfg.dedup_text is not None
    d, key = (cfg.dedup_text, "dedup_text") if own else (cfg.dedup, "dedup")
    work = Path(cfg.work_dir)
    emb_dir, rec_dir = work / emb_name, work / rec_stage
    indices = input_indices(emb_dir, "emb")
    stage = Stage(work, name, stage_config(d), [emb_name, rec_stage])
    if stage.skip_complete(cfg.force):
        return True
    check(d)
    pool = Pool(emb_dir, indices)
    # derived: half the budget on average, so the spread of a uniform hash over key ranges stays inside it
    parts = d.partitions or max(1, math.ceil(2 * pool.n / d.reducer_items))
    if pool.n / parts > d.reducer_items:
        raise StageError(f"dedup: {pool.n} items over {parts} exact reducers is above dedup.reducer_items="
                         f"{d.reducer_items} each; raise dedup.partitions")
    stage.begin(cfg.force)
    sub = lambda nm: stage.sub(nm, {"of": stage.hash})  # noqa: E731
    rec_path = lambda i: rec_dir / f"{kind}-{i:05d}.parquet"  # noqa: E731

    # 1. exact
    keys_st, exact_st = sub("_keys"), sub("_exact")
    if d.exact:
        def keys_unit(i: int) -> Counts:
            ids, _ = read_array_shard(emb_dir, "emb", i, mmap=True)
            ek.save_keys(keys_st.path("keys", i, "npy"), i, ek.shard_keys(rec_path(i), kind, ids))
            return _produced(len(ids), "keys")

        run_sharded(ex, keys_st, indices, keys_unit)
        key_files = _files(keys_st, "keys", indices)
        run_sharded(ex, exact_st, range(parts), lambda p: _produced(
            ek.reduce_partition(key_files, p, parts, d.reducer_items, exact_st.path("dups", p, "npy")),
            "duplicates"))
    dup_files = _files(exact_st, "dups", range(parts)) if d.exact else []

    def duplicates(i: int) -> np.ndarray:
        return ek.shard_duplicates(dup_files, i) if d.exact else np.zeros(0, ek.DUPS)

    # 2. semantic
    n_dups = sum(exact_st.shard_counts(p).produced.get("duplicates", 0) for p in range(parts)) if d.exact else 0
    n_surv = pool.n - n_dups
    info: dict[str, Any] = {"mode": d.mode, "threshold": d.threshold if d.semantic else None}
    summary: dict[str, Any] = {"clusters": 0, "pairs": 0}
    keeper_files: list[Path] = []
    if d.semantic and n_surv:
        k = max(1, math.ceil(n_surv / d.cluster_size))
        assigner, gpu = None, False
        # the pair blocks and a torch assignment run on a GPU wherever the cluster has one (faiss-gpu or not)
        pair_gpu = products.wants_gpu(d.gpu, "dedup.gpu", ex.session.gpus)
        if k > 1:
            cent_st = sub("_centres")
            cent_st.begin()
            # above a few thousand centres a flat fit and a flat assignment are O(N k) on one task: two-level
            spec = twolevel.Spec(k=k, niter=d.niter, seed=d.seed, key="dedup", two_level_above=TWO_LEVEL_ABOVE)
            gpu = kmeans.use_gpu(d.gpu, "dedup.gpu", ex.session.gpus)
            fit_centroids(ex, cent_st, ArrayReader.open(emb_dir, "emb", indices), spec, gpu)
            assigner = AssignerOf(cent_st.dir, spec, gpu, mode="auto")  # two-level on a CPU, exact on a GPU
        assign_st = sub("_assign")

        def assign_unit(i: int) -> Counts:
            s = pool.slot[i]
            mask = np.ones(pool.sizes[s], bool)
            mask[duplicates(i)["row"]] = False
            rows = np.flatnonzero(mask)
            labels = np.zeros((len(rows), 1), np.int64)
            if assigner is not None and len(rows):
                labels = assigner().search(pool.arrays[s][rows], 2)[0]
            x = np.asarray(pool.arrays[s][rows]) if len(rows) else np.zeros((0, pool.width), np.float16)
            n = sd.save_assignment(assign_st.path("assign", i, "npy"), pool.offsets[s] + rows, labels, x)
            return _produced(n, "assignments")

        run_sharded(ex, assign_st, indices, assign_unit, resources=ex.resources(name, gpu=gpu or pair_gpu))
        assign_files = _files(assign_st, "assign", indices)
        n_clusters = k if assigner is None else len(assigner_centres(sub("_centres")))
        sizes, members = ex.call(assign_st, "cluster sizes", cluster_sizes, assign_files, n_clusters)
        plan = sd.buckets(sizes, d.bucket_items, members)
        search_t = d.max_threshold if d.mode == "quantile" else d.threshold
        pairs_st = sub("_pairs")

        def pairs_unit(b: int) -> Counts:
            forest, seen = sd.bucket_forest(assign_files, plan[b], search_t, d.block, d.mode == "quantile",
                                            d.pair_chunk, products.task_device(),
                                            d.quantile_floor if d.mode == "quantile" else 0.0)
            save_npy(pairs_st.path("forest", b, "npy"), forest)
            c = _produced(len(forest), "forest_edges")
            c.produce("pairs", seen)
            return c

        run_sharded(ex, pairs_st, range(len(plan)), pairs_unit, resources=ex.resources(name, gpu=pair_gpu))
        groups_path = stage.dir / GROUPS
        if not groups_path.is_file():
            ex.call(stage, "groups", _reduce, _files(pairs_st, "forest", range(len(plan))), d, pool.n, n_surv,
                    parts, stage.dir, info, PAPER[name])
        info = json.loads((stage.dir / SEMANTIC).read_text())
        # before the keepers and the outputs: a rerun with accept_removal=true (not fingerprinted) goes on from here
        stop = removal_stop(d, key, name, pool.n, n_dups, info) or floor_stop(d, key, name, info)
        if stop:
            raise StageError(stop)
        bounds = info.pop("part_bounds")
        n_pairs = sum(pairs_st.shard_counts(b).produced.get("pairs", 0) for b in range(len(plan)))
        summary = {"clusters": int(n_clusters), "pairs": n_pairs, "grouping_edges": info.pop("edges")}
        keep_st = sub("_keepers")

        def keepers_unit(p: int) -> Counts:
            groups = np.array(np.load(groups_path, mmap_mode="r", allow_pickle=False)[bounds[p]:bounds[p + 1]])
            save_npy(keep_st.path("keepers", p, "npy"), sd.keepers(groups, pool.rows))
            return _produced(len(groups), "grouped")

        run_sharded(ex, keep_st, range(parts), keepers_unit)
        keeper_files = _files(keep_st, "keepers", range(parts))

    # 3. kept ids, shuffled by the keeper's shard so each shard's id column is read once in the stage
    # kept ids resolved for runs of ~sqrt(shards) keeper shards per unit: each removed-row file is opened
    # shards^0.5 times in all, not once per keeper shard
    per = max(1, math.isqrt(len(indices)))
    kept_groups = [indices[g:g + per] for g in range(0, len(indices), per)]
    removed_st, kept_st = sub("_removed"), stage.sub("_kept", {"of": stage.hash, "per_unit": per})

    def removed_unit(i: int) -> Counts:
        return _produced(save_removed(removed_st.path("removed", i, "npy"), pool, i,
                                      fate(pool, i, duplicates(i), keeper_files)), "removed")

    run_sharded(ex, removed_st, indices, removed_unit)
    removed_files = _files(removed_st, "removed", indices)
    run_sharded(ex, kept_st, range(len(kept_groups)), lambda g: _produced(
        resolve_kept_group(removed_files, pool, kept_groups[g], lambda s: kept_st.path("kept", s, "arrow")),
        "resolved"))

    # 4. per-shard output
    def final_unit(i: int) -> Counts:
        return write_shard(stage, pool, i, rec_path(i), kind, fate(pool, i, duplicates(i), keeper_files),
                           lambda s: kept_st.path("kept", s, "arrow"), cfg.embed.dtype)

    def extra(st: Stage) -> dict[str, Any]:
        total = Counts()
        for i in indices:
            total.add(st.shard_counts(i))
        steps = {r: int(total.dropped.get(r, 0)) for r in ("exact_duplicate", "near_duplicate")}
        return {"removed_per_step": steps, "semantic_threshold": info, **summary}

    return run_sharded(ex, stage, indices, final_unit, extra=extra)


def assigner_centres(st: Stage) -> np.ndarray:
    return np.load(st.dir / CENTROIDS, mmap_mode="r", allow_pickle=False)


def stage_config(d: DedupConfig) -> dict[str, Any]:
    conf = asdict(d)
    conf.pop("accept_removal")  # a guard, not an input: a rerun that accepts continues from the done units
    if not conf["quantile_floor"]:
        conf.pop("quantile_floor")  # 0: every pair ranked, as before the setting existed (earlier builds keep their hash)
    return conf


def removal_distances(n_items: int, n_surv: int, dist: np.ndarray, fractions: Sequence[float]
                      ) -> list[Optional[float]]:
    """Per fraction of the n_items input: the smallest cosine distance at which exact + semantic dedup remove it
    (0.0: the exact duplicates alone do), from the forest edges' distances `dist`; None where the edges are too few
    (the fraction needs pairs beyond those searched)."""
    n_exact = n_items - n_surv
    out: list[Optional[float]] = []
    for f in fractions:
        want = max(0.0, f * n_items - n_exact) / max(1, n_surv)
        t, got = sd.forest_threshold(n_surv, dist, want)
        out.append(t if got >= math.ceil(want * n_surv) else None)
    return out


def removal_stop(d: DedupConfig, key: str, name: str, n_items: int, n_exact: int, info: dict[str, Any]
                 ) -> Optional[str]:
    """The one line that stops an absolute threshold whose removal (exact + semantic, of the input) is outside
    [0.5x, 2x] the paper's, with the distances that would remove 0.5x / 1x / 2x of it; None when it passes."""
    if d.mode != "absolute" or d.accept_removal or not n_items or "removal_at" not in info:
        return None
    paper = PAPER[name]
    removal = (n_exact + int(info["edges"])) / n_items
    if not calibration.outside_band(removal, paper):
        return None
    # the absolute search keeps a spanning forest of the pairs under the threshold, not the minimum one by distance,
    # so a distance read from it for a smaller removal is an upper bound; a larger removal needs unsearched pairs
    # sentences on dedup's settings (dedup_text null): dedup.mode would move the images' dedup too
    calibrate = (f"dedup_text={{mode: quantile, quantile: {paper}}} (the sentences' own settings)"
                 if name == "dedup_sentences" and key == "dedup" else f"{key}.mode=quantile ({key}.quantile={paper})")
    at = []
    for f, t in zip(REMOVAL_AT, info["removal_at"]):
        where = (f"above {d.threshold:g} (not searched)" if t is None else "0 (exact duplicates alone)" if t == 0
                 else f"<= {t:.4f}")
        at.append(f"{f * paper:.1%} at distance {where}")
    return (f"{name}: cosine distance < {d.threshold:g} ({key}.mode=absolute) removes {removal:.1%} of {n_items} "
            f"items (exact {n_exact / n_items:.1%} + semantic {int(info['edges']) / n_items:.1%}; "
            f"{calibration.band_text(paper)}): this model's distance scale is not the one the threshold was set on; "
            f"removal {', '.join(at)}; set {calibrate} or {key}.accept_removal=true to keep this threshold")


def floor_stop(d: DedupConfig, key: str, name: str, info: dict[str, Any]) -> Optional[str]:
    """The one line that stops a quantile threshold the floor hides: the pairs closer than dedup.quantile_floor
    already remove the target, so the threshold lies below it, where distances were not ranked."""
    if d.mode != "quantile" or not info.get("floor_hides"):
        return None
    at = info["removal_at_floor"]
    return (f"{name}: the pairs closer than {key}.quantile_floor={d.quantile_floor:g} already remove {at:.1%} "
            f"(target {key}.quantile={d.quantile}): the threshold lies below the floor, where distances are not "
            f"ranked; lower {key}.quantile_floor (0 ranks every pair)")


def _reduce(forest_files: Sequence[Path], d: DedupConfig, n_items: int, n_surv: int, parts: int, out: Path,
            info: dict[str, Any], paper: float) -> None:
    """One task, O(grouped items): the units' spanning forests folded into one (`dedup.pair_chunk` edges waiting
    at a time), the threshold (quantile mode), the groups and the bounds of the keeper parts; `_semantic.json`
    first, the groups file last (its presence means the reduce is done)."""
    forest = sd.Forest(d.pair_chunk, by_distance=d.mode == "quantile")
    for p in forest_files:
        forest.add(np.load(p, allow_pickle=False))
    edges = forest.result()
    info = dict(info)
    if d.mode == "quantile":
        # the semantic step's share of the target: what the exact step did not already remove
        want = max(0.0, d.quantile * n_items - (n_items - n_surv)) / max(1, n_surv)
        t, _ = sd.forest_threshold(n_surv, edges["dist"], want)
        if d.quantile_floor > 0:
            # below the floor the forest holds only which items connect (exactly), not every distance: the threshold
            # is exact where the removal at the floor is still short of the target
            merges = int((edges["dist"] < d.quantile_floor).sum())
            info.update(quantile_floor=d.quantile_floor, removal_at_floor=(n_items - n_surv + merges) / max(1, n_items),
                        floor_hides=bool(0 < math.ceil(want * n_surv) <= merges))
        edges = edges[edges["dist"] < t]
        info.update(threshold=t, target_fraction=d.quantile, searched_up_to=d.max_threshold)
    else:  # what the stop line of an absolute threshold far from the paper's lists (removal_stop)
        info["removal_at"] = removal_distances(n_items, n_surv, edges["dist"], [f * paper for f in REMOVAL_AT])
    groups = sd.components(edges) if len(edges) else np.zeros(0, sd.GROUPS)
    info["edges"] = int(len(edges))
    info["part_bounds"] = sd.group_bounds(groups, parts).tolist()
    write_json(out / SEMANTIC, info)
    save_npy(out / GROUPS, groups)


def fate(pool: Pool, i: int, dups: np.ndarray, keeper_files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]:
    """(exact survivor mask, kept mask, keeper position) of every row of shard i."""
    n = int(pool.sizes[pool.slot[i]])
    pos = pool.offsets[pool.slot[i]] + np.arange(n, dtype=np.int64)
    exact = np.ones(n, bool)
    exact[dups["row"]] = False
    keeper = sd.lookup(keeper_files, pos)
    keep = exact & (keeper == pos)
    # an exact duplicate points at the keeper of its first occurrence's group
    keeper[dups["row"]] = sd.lookup(keeper_files, pool.pos(dups["rep_shard"], dups["rep_row"]))
    return exact, keep, keeper


def save_removed(path: Path, pool: Pool, i: int, fated: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
    """Shard i's removed rows with their keeper's (shard, row), saved sorted by the keeper's shard (the map of the
    kept-id shuffle). Returns how many."""
    _, keep, keeper = fated
    gone = np.flatnonzero(~keep)
    kpos = keeper[gone]
    kslot = np.searchsorted(pool.offsets, kpos, "right") - 1  # 'right': an empty shard shares its successor's offset
    rec = np.zeros(len(gone), RESOLVE)
    rec["kshard"] = np.asarray(pool.indices, np.int64)[kslot]
    rec["shard"], rec["row"], rec["krow"] = i, gone, kpos - pool.offsets[kslot]
    save_sorted(path, rec, ["kshard", "shard", "row"])
    return len(rec)


def resolve_kept_group(removed_files: Sequence[Path], pool: Pool, shards: Sequence[int],
                       out: Callable[[int], Path]) -> int:
    """The reduce of the kept-id shuffle for a run of consecutive keeper shards: one range read of every removed-row
    file for the whole run (a unit per keeper shard would open every file once per shard: shards^2 opens), then
    `resolve_kept` per shard. Returns how many rows."""
    rec = read_range(removed_files, "kshard", shards[0], shards[-1] + 1, RESOLVE)
    order = np.argsort(rec["kshard"], kind="stable")  # file order kept within a keeper shard
    rec = rec[order]
    cut = np.searchsorted(rec["kshard"], list(shards) + [shards[-1] + 1])
    return sum(resolve_kept(rec[cut[j]:cut[j + 1]], pool, s, out(s)) for j, s in enumerate(shards))


def resolve_kept(rec: np.ndarray, pool: Pool, s: int, out: Path) -> int:
    """Keeper shard s's part of the kept-id shuffle: the removed rows whose keeper lies in s (`rec`), their keepers'
    ids from shard s's id column (read once), saved as (shard, row, kept_id) sorted by (shard, row). Returns how
    many."""
    rec = rec[np.lexsort((rec["row"], rec["shard"]))]
    kept = pa.array([], pa.string())
    if len(rec):
        col = pq.read_table(ids_path(pool.dir, "emb", s), columns=["id"]).column("id")
        kept = col.take(pa.array(rec["krow"])).combine_chunks().cast(pa.string())
    table = pa.table([pa.array(rec["shard"], pa.int32()), pa.array(rec["row"], pa.int64()), kept], schema=KEPT)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(out)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, KEPT) as writer:
        writer.write_table(table)
    os.replace(tmp, out)
    return len(rec)


def kept_ids(kept_path: Callable[[int], Path], pool: Pool, i: int, gone: np.ndarray, kpos: np.ndarray) -> list[str]:
    """Ids of the keepers of shard i's removed rows `gone` (ascending; keeper positions `kpos`): shard i's slice of
    the kept-id file of each keeper shard it points into, memory-mapped and cut by binary search."""
    rows, ids = [], []
    for slot in np.unique(np.searchsorted(pool.offsets, kpos, "right") - 1).tolist():
        with pa.memory_map(str(kept_path(pool.indices[slot]))) as src:
            reader = pa.ipc.open_file(src)
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                shard = batch.column(0).to_numpy()
                lo, hi = np.searchsorted(shard, i, "left"), np.searchsorted(shard, i, "right")
                rows.append(batch.column(1).to_numpy()[lo:hi].copy())
                ids.extend(batch.column(2)[lo:hi].to_pylist())
    got = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    order = np.argsort(got, kind="stable")
    if not np.array_equal(got[order], gone):
        raise StageError(f"dedup: the kept-id files hold {len(got)} rows of shard {i} where {len(gone)} were removed; "
                         f"rerun with force=true")
    return [ids[j] for j in order.tolist()]


def write_shard(stage: Stage, pool: Pool, i: int, rec_path: Path, kind: str,
                fated: tuple[np.ndarray, np.ndarray, np.ndarray], kept_path: Callable[[int], Path],
                dtype: str) -> Counts:
    exact, keep, keeper = fated
    ids, arr = read_array_shard(pool.dir, "emb", i, mmap=True)
    kept_rows = np.flatnonzero(keep)
    kept_ids_ = [ids[j] for j in kept_rows]
    table = pq.read_table(rec_path)
    table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(kept_ids_, pa.string())))
    write_table(stage.path(kind, i), table)
    width = arr.shape[1] if arr.ndim == 2 and arr.shape[1] else pool.width
    write_array_shard(stage.dir, "emb", i, kept_ids_,
                      np.asarray(arr[kept_rows], np.float32) if len(kept_rows) else np.zeros((0, width)), dtype)
    gone = np.flatnonzero(~keep)
    reasons = np.where(exact[gone], "near_duplicate", "exact_duplicate")
    removed = {"id": [ids[j] for j in gone], "reason": reasons.tolist(),
               "kept_id": kept_ids(kept_path, pool, i, gone, keeper[gone])}
    write_table(stage.path("removed", i), pa.Table.from_pydict(removed, schema=REMOVED))
    c = Counts()
    c.keep(len(kept_rows))
    for r in ("exact_duplicate", "near_duplicate"):
        if (reasons == r).any():
            c.drop(r, int((reasons == r).sum()))
    return c
