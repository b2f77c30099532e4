"""Stage `balance`: semantic balance sampling (RealSyn §3.3): similarity window, image k-means, nested caps.

Map -> reduce -> map as Ray tasks, each step resumable; the driver starts a step once the one before is done:
1. `_sims/`   per retrieve shard j: sim-j.npy (float32 cosine, NaN where none), base-j.npy (int8: 0 has a
              similarity, 1 no_syn_text), embrow-j.npy (row of each image in `dedup_images` emb-j.npy). The
              similarity is cosine(image, syn_text) (paper; the syn_text stage and an embedding of its
              texts) or, with the explicit `balance.similarity_text=text1`, the retrieval cosine of text1. Never
              silently switched: without syn_text and without the flag the stage stops with a one-line error.
              Ids are joined with Arrow (index_in), cosines are one batched product.
2. window     low <= sim <= high: absolute (paper [0.51, 0.61]) or the exact global quantiles of the sims, found by
              one task in two streamed histogram passes (window.py; equal to np.quantile bit for bit).
3. k-means    spherical k-means over the in-window images (paper 1M centres; `centroids.npy` reused on resume;
              construct/clustering/): flat (one task) or two-level (a task per unit). Each task builds the
              in-window mask of the shards it reads (flat: every shard's, 1 byte per image, plus the in-window rows).
4. `_assign/` per shard: nearest centre of every in-window image and its key (caps.draw_keys) ->
              pairs-j.npy (cluster, key, shard, row) sorted by cluster; with balance.sampling=random also
              rkey-j.npy, the random subset's key of every in-window row (random_subset.py).
5. `_rank-P/` per reducer p of P = ceil(in-window pairs / balance.reduce_items): the clusters [p k/P, (p+1) k/P)
              read from every pairs file, ranked as caps.cluster_ranks does (by key, ties by global position) ->
              ranked-p.npy (shard, row, cluster, rank, size) sorted by (shard, row), sizes-p.npy. P changes no byte.
6. write      per shard: `balanced-j.parquet` = the retrieve columns (Arrow take of the in-window rows) + syn_text,
              similarity, image_cluster, cluster_size, cluster_rank. Drops below_window, above_window,
              no_similarity, no_syn_text. Produced: cap_<t> (pairs kept by cap t: cluster_rank < t, so caps nest).
              balance.sampling=random: one task first finds, per cap t, the cut of the N_t (= balanced cap-t size)
              smallest random keys over the rkey files (random_subset.cuts, streamed); each shard then also gets
              random_cap (the smallest cap whose random set holds the pair, null for none: cap t's random set is
              random_cap <= t) and the produced counts random_cap_<t>.
Once every shard is written, one task writes the side files for the dataset card, `similarity.npy` (every image's
sim before the window, streamed shard by shard into one array) and `image_cluster_sizes.npy` (k int64), and the
driver the manifest (window, kmeans, caps, image_clusters, sampling; random_caps with sampling=random). The output
is the same on any worker count and after a kill.

Contract with the syn_text stage: a done stage dir `<work>/<balance.syn_text_stage>` whose per-shard
record files `*-{j:05d}.parquet` (shard j of retrieve) have columns id (image id) and syn_text; and a done dir
`<work>/<balance.syn_emb_stage>` with `emb-{j:05d}.npy` + ids: the teacher's L2-normalised syn_text embeddings.
An id listed twice takes its last occurrence; an empty syn_text counts as none.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realsyn_pl.construct.balance import caps, random_subset, window
from realsyn_pl.construct.clustering import kmeans, twolevel
from realsyn_pl.construct.clustering.centroids import CENTROIDS, AssignerOf, fit_centroids, spec_from
from realsyn_pl.construct.engine.arrays import ArrayReader, array_path, ids_path, save_npy
from realsyn_pl.construct.engine.config import BalanceConfig, BuildConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.partition import read_range, save_sorted
from realsyn_pl.construct.engine.records import tmp_name, write_table
from realsyn_pl.construct.engine.schemas import RETRIEVED
from realsyn_pl.construct.engine.stage import MANIFEST, Counts, Stage, StageError, input_indices

NAME, RETR, IMG = "balance", "retrieve", "dedup_images"
BALANCED = pa.schema(list(RETRIEVED) + [
    pa.field("syn_text", pa.string()), pa.field("similarity", pa.float32()), pa.field("image_cluster", pa.int64()),
    pa.field("cluster_size", pa.int64()), pa.field("cluster_rank", pa.int64())])
PAIRS = np.dtype([("cluster", "<i8"), ("key", "<u8"), ("shard", "<i8"), ("row", "<i8")])
RANKED = np.dtype([("shard", "<i8"), ("row", "<i8"), ("cluster", "<i8"), ("rank", "<i8"), ("size", "<i8")])
# left out of the config entirely: they change no byte, and old builds keep their hash. window_text_tags changes
# the syn_text embeddings, so it is in embed_syn_text's fingerprint, which this stage's covers
UNSTORED = ("reduce_items", "window_text_tags")
CHUNK = 65536  # rows per batched cosine product
RANDOM = pa.field("random_cap", pa.int64())  # the column balance.sampling=random adds


def stage_config(b: BalanceConfig) -> dict[str, Any]:
    conf = asdict(b)
    for key in UNSTORED:
        conf.pop(key, None)
    conf["window"].pop("accept_removal", None)  # a guard, not an input: a rerun that accepts continues
    if conf.get("sampling") == "balanced":  # the default is stored as absent: builds from before the key keep their hash
        conf.pop("sampling")
    return conf


def _done_dir(work: Path, name: str, what: str) -> Path:
    d = work / name
    if not (d / MANIFEST).is_file():
        raise StageError(f"balance.similarity_text=syn_text needs {what} in {d} (stage {name!r}), which "
                         "is not built; build it first, or set balance.similarity_text=text1 to apply the window "
                         "to the retrieval similarity of text1 instead")
    return d


def last_index(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Position in `value_set` of each value's last occurrence (-1: absent), as a dict built in order would give."""
    n = len(value_set)
    if n == 0 or len(values) == 0:
        return np.full(len(values), -1, np.int64)
    reverse = pc.take(value_set, pa.array(np.arange(n - 1, -1, -1, dtype=np.int64)))
    idx = pc.index_in(values, value_set=reverse).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(idx >= 0, n - 1 - idx, -1)


def syn_records(work: Path, b: BalanceConfig, j: int) -> tuple[pa.Array, pa.Array]:
    """(ids, syn_texts) of shard j's syn_text records with a non-empty syn_text, in file order."""
    d = work / b.syn_text_stage
    ids, texts = [], []
    for f in sorted(d.glob(f"*-{j:05d}.parquet")):
        if f.name.endswith(".ids.parquet") or "syn_text" not in pq.read_schema(f).names:
            continue
        t = pq.read_table(f, columns=["id", "syn_text"])
        keep = pc.fill_null(pc.greater(pc.utf8_length(t.column("syn_text")), 0), False)
        t = t.filter(keep)
        ids.append(t.column("id").combine_chunks().cast(pa.string()))
        texts.append(t.column("syn_text").combine_chunks().cast(pa.string()))
    if not ids:
        return pa.array([], pa.string()), pa.array([], pa.string())
    return pa.concat_arrays(ids), pa.concat_arrays(texts)


def _ids(folder: Path, j: int) -> pa.Array:
    return pq.read_table(ids_path(folder, "emb", j), columns=["id"]).column("id").combine_chunks().cast(pa.string())


def _retrieved(work: Path, j: int) -> Path:
    return work / RETR / f"retrieved-{j:05d}.parquet"


def _fresh(*paths: Path) -> None:
    """Remove the temp files a killed writer of these outputs left. Only for a unit's own outputs: a unit belongs
    to one task, so no live writer's temp file is touched (a rerun then leaves the tree an uninterrupted run does)."""
    for path in paths:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


# ---- step 1: similarity per retrieve row ----------------------------------------------------------------------
def first_sims(sims: pa.ChunkedArray) -> np.ndarray:
    """The first (best) retrieval similarity of every row; NaN for a row without one."""
    arr = sims.combine_chunks()
    out = np.full(len(arr), np.nan, np.float32)
    if len(arr) == 0:
        return out
    offs = np.asarray(arr.offsets)
    has = offs[1:] > offs[:-1]
    vals = arr.values.to_numpy(zero_copy_only=False)
    out[has] = vals[offs[:-1][has]]
    return out


def cosines(a: np.ndarray, rows_a: np.ndarray, b: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """float32 a[rows_a[i]] . b[rows_b[i]] per i; the (1, d) x (d, 1) batched product gives the very bits of the
    single-pair float32 dot product (checked), in bounded chunks."""
    out = np.empty(len(rows_a), np.float32)
    for lo in range(0, len(rows_a), CHUNK):
        x = np.asarray(a[rows_a[lo:lo + CHUNK]], np.float32)
        y = np.asarray(b[rows_b[lo:lo + CHUNK]], np.float32)
        out[lo:lo + len(x)] = np.matmul(x[:, None, :], y[:, :, None])[:, 0, 0]
    return out


def similarity_shard(st: Stage, work: Path, b: BalanceConfig, j: int) -> Counts:
    _fresh(*(st.path(kind, j, "npy") for kind in ("base", "embrow", "sim")))
    t = pq.read_table(_retrieved(work, j), columns=["id", "sims"])
    ids = t.column("id").combine_chunks().cast(pa.string())
    emb_row = last_index(ids, _ids(work / IMG, j))
    if (emb_row < 0).any():
        first = ids[int(np.flatnonzero(emb_row < 0)[0])].as_py()
        raise StageError(f"balance: retrieve shard {j}: {int((emb_row < 0).sum())} image(s) have no embedding in "
                         f"{IMG} emb-{j:05d}.npy, first {first}; rebuild retrieve from this {IMG}")
    base = np.zeros(len(ids), np.int8)
    if b.similarity_text == "text1":
        sim = first_sims(t.column("sims"))
    else:
        sim = np.full(len(ids), np.nan, np.float32)
        text_ids, _ = syn_records(work, b, j)
        emb_dir = work / b.syn_emb_stage
        has_emb = array_path(emb_dir, "emb", j).is_file()
        syn_row = last_index(ids, _ids(emb_dir, j)) if has_emb else np.full(len(ids), -1, np.int64)
        ok = (last_index(ids, text_ids) >= 0) & (syn_row >= 0)
        base[~ok] = window.NO_SYN_TEXT
        sel = np.flatnonzero(ok)
        if len(sel):
            img = np.load(array_path(work / IMG, "emb", j), mmap_mode="r", allow_pickle=False)
            syn = np.load(array_path(emb_dir, "emb", j), mmap_mode="r", allow_pickle=False)
            sim[sel] = cosines(img, emb_row[sel], syn, syn_row[sel])
    save_npy(st.path("base", j, "npy"), base)
    save_npy(st.path("embrow", j, "npy"), emb_row)
    save_npy(st.path("sim", j, "npy"), sim)  # last: the marker follows it
    c = Counts()
    c.keep(len(ids))
    return c


def shard_codes(sims: Stage, j: int, lo: float, hi: float) -> np.ndarray:
    return window.codes(np.load(sims.path("sim", j, "npy")), np.load(sims.path("base", j, "npy")), lo, hi)


class WindowMask:
    """Image shard p's in-window images (True at their embedding rows): what the k-means samples from. Built where a
    task needs it, shard by shard."""

    def __init__(self, work: Path, sims: Stage, indices: list[int], lo: float, hi: float):
        self.work, self.sims, self.indices, self.lo, self.hi = work, sims, indices, lo, hi

    def __call__(self, p: int) -> np.ndarray:
        j = self.indices[p]
        n = len(np.load(array_path(self.work / IMG, "emb", j), mmap_mode="r", allow_pickle=False))
        m = np.zeros(n, bool)
        m[np.load(self.sims.path("embrow", j, "npy"))[shard_codes(self.sims, j, self.lo, self.hi) ==
                                                        window.IN_WINDOW]] = True
        return m

    def total(self) -> int:
        return int(sum(int(self(p).sum()) for p in range(len(self.indices))))


def window_bounds(w: Any, sim_paths: list[Path]) -> tuple[float, float]:
    """The window's bounds; an absolute window far from the paper's removal stops here, before any k-means work and
    with the similarity units kept (balance.window.accept_removal is outside the fingerprint: a rerun resumes)."""
    try:
        lo, hi = window.bounds(w, sim_paths)
    except ValueError as err:
        raise StageError(f"balance: {err}") from None
    stop = window.removal_stop(w, sim_paths, lo, hi)
    if stop:
        raise StageError(f"balance: {stop}")
    return lo, hi


# ---- step 4: cluster and key per in-window row ----------------------------------------------------------------
def assign_shard(st: Stage, sims: Stage, work: Path, b: BalanceConfig, j: int, lo: float, hi: float,
                 assigner: Any) -> Counts:
    _fresh(st.path("pairs", j, "npy"), st.path("rkey", j, "npy"))
    sel = np.flatnonzero(shard_codes(sims, j, lo, hi) == window.IN_WINDOW)
    rec = np.zeros(len(sel), PAIRS)
    ids: list[str] = []
    if len(sel):
        img = np.load(array_path(work / IMG, "emb", j), mmap_mode="r", allow_pickle=False)
        emb_row = np.load(sims.path("embrow", j, "npy"))
        labels, _ = assigner.search(np.asarray(img[emb_row[sel]], np.float32), 1)
        ids = pq.read_table(_retrieved(work, j), columns=["id"]).column("id").take(pa.array(sel)).to_pylist()
        rec["cluster"], rec["key"] = labels[:, 0], caps.draw_keys(ids, b.seed)
        rec["shard"], rec["row"] = j, sel
    if b.sampling == "random":  # in row order, as the write step reads its in-window rows
        save_npy(st.path("rkey", j, "npy"), random_subset.random_keys(ids, b.seed))
    save_sorted(st.path("pairs", j, "npy"), rec, "cluster")  # last: the marker follows it
    c = Counts()
    c.keep(len(sel))
    return c


# ---- step 5: ranks inside clusters, one range of clusters per reducer -----------------------------------------
def cluster_range(p: int, parts: int, k: int) -> tuple[int, Optional[int]]:
    return p * k // parts, (None if p == parts - 1 else (p + 1) * k // parts)


def rank_partition(st: Stage, assign: Stage, indices: list[int], p: int, parts: int, k: int) -> Counts:
    _fresh(st.path("sizes", p, "npy"), st.path("ranked", p, "npy"))
    lo, hi = cluster_range(p, parts, k)
    rec = read_range([assign.path("pairs", j, "npy") for j in indices], "cluster", lo, hi, PAIRS)
    # global position order (shard, row): then caps.cluster_ranks' tie-break by position is the one over the pool
    rec = rec[np.lexsort((rec["row"], rec["shard"]))]
    ranks = caps.cluster_ranks(rec["cluster"], rec["key"])
    width = (k if hi is None else hi) - lo
    sizes = np.bincount(rec["cluster"] - lo, minlength=width).astype(np.int64)
    if len(sizes) != width:
        raise StageError(f"balance: cluster ids beyond the {k} centres in partition {p}")
    out = np.zeros(len(rec), RANKED)
    out["shard"], out["row"], out["cluster"], out["rank"] = rec["shard"], rec["row"], rec["cluster"], ranks
    out["size"] = sizes[rec["cluster"] - lo]
    save_npy(st.path("sizes", p, "npy"), sizes)
    save_sorted(st.path("ranked", p, "npy"), out, ("shard", "row"))
    c = Counts()
    c.keep(len(rec))
    return c


# ---- step 6: the balanced shards ------------------------------------------------------------------------------
def syn_column(work: Path, b: BalanceConfig, j: int, ids: pa.Array) -> pa.Array:
    """syn_text per row; with text1 it rides along when both syn_text stages are done (the writer's .json wants it)."""
    rides = (work / b.syn_text_stage / MANIFEST).is_file() and (work / b.syn_emb_stage / MANIFEST).is_file()
    if b.similarity_text == "text1" and not rides:
        return pa.nulls(len(ids), pa.string())
    text_ids, texts = syn_records(work, b, j)
    idx = last_index(ids, text_ids)
    return pc.take(texts, pa.array(idx, mask=idx < 0)) if len(texts) else pa.nulls(len(ids), pa.string())


def random_cuts(rank: Stage, parts: int, key_paths: list[Path], cap_list: list[int]) -> dict[int, random_subset.Cut]:
    """Per cap t, the random subset of the balanced cap-t size (sum over clusters of min(size, t))."""
    sizes = np.concatenate([np.load(rank.path("sizes", p, "npy")) for p in range(parts)]).astype(np.int64)
    wanted = sorted(set(cap_list))
    return dict(zip(wanted, random_subset.cuts(key_paths, [int(np.minimum(sizes, t).sum()) for t in wanted])))


def write_shard(stage: Stage, sims: Stage, ranked: list[Path], work: Path, b: BalanceConfig, j: int, lo: float,
                hi: float, rand: Optional[tuple[Path, int, dict[int, random_subset.Cut]]] = None) -> Counts:
    """Balanced shard j; `rand` (balance.sampling=random): its rkey file, its position in shard order, the cuts."""
    _fresh(stage.path("balanced", j))
    code = shard_codes(sims, j, lo, hi)
    sel = np.flatnonzero(code == window.IN_WINDOW)
    rec = read_range(ranked, "shard", j, j + 1, RANKED)
    rec = rec[np.argsort(rec["row"], kind="stable")]
    if not np.array_equal(rec["row"], sel):
        raise StageError(f"balance: shard {j}: the ranked pairs do not match its in-window rows; rerun with "
                         "force=balance")
    table = pq.read_table(_retrieved(work, j)).select(RETRIEVED.names).take(pa.array(sel)).cast(RETRIEVED)
    new = [syn_column(work, b, j, table.column("id").combine_chunks()),
           pa.array(np.load(sims.path("sim", j, "npy"))[sel], pa.float32()), pa.array(rec["cluster"], pa.int64()),
           pa.array(rec["size"], pa.int64()), pa.array(rec["rank"], pa.int64())]
    schema = BALANCED
    if rand is not None:
        rkey_path, s, cuts = rand
        smallest = random_subset.smallest_cap(np.load(rkey_path, allow_pickle=False), s, b.caps, cuts)
        new.append(pa.array(smallest, pa.int64(), mask=smallest < 0))
        schema = BALANCED.append(RANDOM)
    out = pa.Table.from_arrays([table.column(n).combine_chunks() for n in RETRIEVED.names] + new, schema=schema)
    write_table(stage.path("balanced", j), out)
    c = Counts()
    for reason_code, n in enumerate(np.bincount(code, minlength=len(window.REASONS) + 1).tolist()):
        if reason_code != window.IN_WINDOW and n:
            c.drop(window.REASONS[reason_code], n)
    c.keep(len(sel))
    for t in b.caps:
        n = int((rec["rank"] < t).sum())
        if n:
            c.produce(f"cap_{t}", n)
    if rand is not None:
        for t in b.caps:
            n = int(((smallest >= 0) & (smallest <= t)).sum())
            if n:
                c.produce(f"random_cap_{t}", n)
    return c


def write_similarity(path: Path, parts: list[Path]) -> None:
    """One float32 .npy of every shard's sims in shard order (what np.save of their concatenation writes), filled
    shard by shard through a memory map."""
    sizes = [len(np.load(p, mmap_mode="r", allow_pickle=False)) for p in parts]
    if sum(sizes) == 0:
        save_npy(path, np.zeros(0, np.float32))
        return
    tmp = tmp_name(path)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(sum(sizes),))
    start = 0
    for p, n in zip(parts, sizes):
        out[start:start + n] = np.load(p, allow_pickle=False)
        start += n
    out.flush()
    del out
    os.replace(tmp, path)


def summary(stage: Stage, sims: Stage, rank: Stage, parts: int, indices: list[int], b: BalanceConfig,
            lo: float, hi: float, info: dict[str, Any]) -> dict[str, Any]:
    sizes = np.concatenate([np.load(rank.path("sizes", p, "npy")) for p in range(parts)]).astype(np.int64)
    save_npy(stage.dir / "image_cluster_sizes.npy", sizes)
    write_similarity(stage.dir / "similarity.npy", [sims.path("sim", j, "npy") for j in indices])
    counts = [stage.shard_counts(j) for j in indices]
    n_all, n_kept = sum(c.n_in for c in counts), sum(c.n_out for c in counts)
    # the written shards' drop counts are the window's sides: a pair has a finite similarity exactly where it is
    # neither no_syn_text nor no_similarity
    dropped = {r: sum(c.dropped.get(r, 0) for c in counts) for r in window.REASONS.values()}
    below, above = dropped["below_window"], dropped["above_window"]
    n_sims = n_all - dropped["no_syn_text"] - dropped["no_similarity"]
    out = {"window": {"mode": b.window.mode, "low": lo, "high": hi, "similarity_text": b.similarity_text,
                      "removed_fraction": round(1 - n_kept / max(1, n_all), 6),
                      # the card's "both ways": the bounds as fractions of the sims, and the removal the guard reads
                      "below_low": round(below / max(1, n_sims), 6), "above_high": round(above / max(1, n_sims), 6),
                      "outside_of_sims": round((below + above) / max(1, n_sims), 6), "text_tags": b.window_text_tags,
                      "accept_removal": b.window.accept_removal},
           # cap t keeps min(size, t) of every cluster (ranks < t)
           "kmeans": info, "caps": {int(t): int(np.minimum(sizes, t).sum()) for t in b.caps},
           "image_clusters": {"non_empty": int((sizes > 0).sum()), "max": int(sizes.max()),
                              **{f"max_after_cap_{t}": int(np.minimum(sizes, t).max()) for t in b.caps}},
           "sampling": b.sampling}
    if b.sampling == "random":  # sizes equal to caps by construction; counted from the shards as written
        out["random_caps"] = {int(t): sum(c.produced.get(f"random_cap_{t}", 0) for c in counts) for t in b.caps}
    if b.similarity_text == "text1":
        out["window"]["note"] = ("window applied to the retrieval similarity of text1 "
                                 "(balance.similarity_text=text1), not to syn_text as in the paper")
    return out


def run(cfg: BuildConfig, ex: Executor) -> bool:
    b = cfg.balance
    if b.similarity_text not in ("syn_text", "text1"):
        raise StageError(f"balance.similarity_text must be syn_text or text1, got {b.similarity_text!r}")
    if not b.caps or any(t < 1 for t in b.caps):
        raise StageError(f"balance.caps must be positive cluster caps, got {list(b.caps)}")
    if b.reduce_items < 1:
        raise StageError(f"balance.reduce_items must be >= 1, got {b.reduce_items}")
    if b.sampling not in random_subset.SAMPLINGS:
        raise StageError(f"balance.sampling must be one of {', '.join(random_subset.SAMPLINGS)}, got {b.sampling!r}")
    work = Path(cfg.work_dir)
    indices = input_indices(work / RETR, "retrieved")
    # with text1 the syn_text stages are read too when they exist (their syn_text rides along): always inputs
    inputs = [RETR, IMG, b.syn_text_stage, b.syn_emb_stage]
    stage = Stage(work, NAME, stage_config(b), inputs)
    if stage.skip_complete(cfg.force):
        return True
    if b.similarity_text == "syn_text":
        _done_dir(work, b.syn_text_stage, "synthetic texts")
        _done_dir(work, b.syn_emb_stage, "syn_text embeddings")
    gpu = kmeans.use_gpu(b.gpu, "balance.gpu", ex.session.gpus)
    spec = spec_from(b, "balance")
    twolevel.check(spec)  # an init that cannot run at this k is refused before any work
    stage.begin(cfg.force)
    sub = {"balance": stage.hash}  # the steps live inside the stage dir: its config covers theirs
    sims = stage.sub("_sims", sub)
    run_sharded(ex, sims, indices, lambda j: similarity_shard(sims, work, b, j))
    lo, hi = ex.call(sims, "window", window_bounds, b.window, [sims.path("sim", j, "npy") for j in indices])

    if (stage.dir / CENTROIDS).is_file():  # a resumed run: the fit is done
        info = json.loads((stage.dir / "_kmeans.json").read_text())
    else:
        mask = WindowMask(work, sims, indices, lo, hi)
        n_rows = ex.call(stage, "in-window count", WindowMask.total, mask)
        if n_rows == 0:
            raise StageError(f"balance: no pair lies inside the window [{lo:.4f}, {hi:.4f}]; check the similarity "
                             "scale of the embedding model or use balance.window.mode=quantile")
        # the paper clusters the 168.3M pairs left by the window
        info = fit_centroids(ex, stage, ArrayReader.open(work / IMG, "emb", indices), spec, gpu, mask, n_rows)
    assign = stage.sub("_assign", sub)
    if not assign.is_complete():
        assigner = AssignerOf(stage.dir, spec, gpu)
        run_sharded(ex, assign, indices, lambda j: assign_shard(assign, sims, work, b, j, lo, hi, assigner()),
                    resources=ex.resources(NAME, gpu=gpu))
    k = len(np.load(stage.dir / CENTROIDS, mmap_mode="r", allow_pickle=False))
    n_window = sum(assign.shard_counts(j).n_out for j in indices)
    parts = max(1, min(k, -(-n_window // b.reduce_items)))
    # P in the name: another reduce_items starts a fresh reduce instead of mixing two partitionings
    rank = stage.sub(f"_rank-{parts}", sub | {"partitions": parts})
    run_sharded(ex, rank, range(parts), lambda p: rank_partition(rank, assign, indices, p, parts, k))
    ranked = [rank.path("ranked", p, "npy") for p in range(parts)]
    rand: dict[int, tuple[Path, int, dict[int, random_subset.Cut]]] = {}
    if b.sampling == "random":
        key_paths = [assign.path("rkey", j, "npy") for j in indices]
        cuts = ex.call(stage, "random subset", random_cuts, rank, parts, key_paths, list(b.caps))
        rand = {j: (key_paths[s], s, cuts) for s, j in enumerate(indices)}
    extra = lambda st: summary(st, sims, rank, parts, indices, b, lo, hi, info)  # noqa: E731
    return run_sharded(ex, stage, indices, lambda j: write_shard(stage, sims, ranked, work, b, j, lo, hi,
                                                                 rand.get(j)), extra=extra)
