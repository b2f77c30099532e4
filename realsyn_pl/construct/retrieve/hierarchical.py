"""Stage `retrieve`: the top-k realistic sentences for every image (RealSyn §3.2, hierarchical retrieval).

hierarchical (the paper): inter-cluster, each image finds its top-`nprobe` sentence-cluster centres (paper: top-1);
intra-cluster, the sentences of those clusters are ranked by cosine to the image and the best k are kept.
Three resumable steps, each a Ray task per unit:
  1. `_probe/`   per image shard j: probe-j.npy / probesim-j.npy, the nprobe nearest centres of each image (exact
                 by default, the step recall rests on; fp16 on the task's GPU when the cluster has GPUs);
  2. `_buckets/` per bucket b of consecutive cluster ids (at most `bucket_sentences` sentences, kept fp16, and
                 `clusters_per_bucket` clusters; BLAS on `blas_threads`): the sentences of those clusters
                 (one contiguous slice of every cluster-sorted shard from `cluster`) against every image that probes
                 one of them -> cand-b.parquet (image_row, probe, cluster, top-k sentence ids/texts/sims);
  3. merge       per image shard j: the candidates of its images from every bucket (row-group pruned reads),
                 best k over all probes -> retrieved-j.parquet.
exact: brute force over every sentence (validation on small data); same output.
Output `retrieved-j.parquet`: id, doc_id, url (the image), texts, sentence_ids, sims, clusters (best first;
texts[0] is text1), probe_cluster, probe_sim. Drops: no_text (probed clusters hold no sentence),
below_min_similarity (retrieve.min_similarity). The manifest adds the similarity distribution.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.clustering import kmeans
from realsyn_pl.construct.clustering.centroids import CENTROIDS, AssignerOf, spec_from
from realsyn_pl.construct.engine import products
from realsyn_pl.construct.engine.arrays import MappedShards, read_array_shard, save_npy, shard_sizes
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.histogram import Histogram
from realsyn_pl.construct.engine.memo import per_process
from realsyn_pl.construct.engine.records import tmp_name, write_table
from realsyn_pl.construct.engine.schemas import RETRIEVED
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices
from realsyn_pl.construct.retrieve import topk

NAME, SENT, IMG = "retrieve", "cluster", "dedup_images"
ROW_GROUP = 8192
CANDIDATES = pa.schema([("image_row", pa.int64()), ("probe", pa.int32()), ("cluster", pa.int64()),
                        ("sentence_ids", pa.list_(pa.string())), ("texts", pa.list_(pa.string())),
                        ("sims", pa.list_(pa.float32()))])


def read_row_range(path: Path, lo: int, hi: int, columns: list[str]) -> pa.Table:
    """Rows lo..hi-1 of a parquet file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(path)
    groups, first, start = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if start < hi and start + n > lo:
            groups.append(g)
            first = start if first is None else first
        start += n
    if not groups or hi <= lo:
        return pa.table({c: pa.array([], pf.schema_arrow.field(c).type) for c in columns})
    return pf.read_row_groups(groups, columns=columns).slice(lo - first, hi - lo)


class Pools:
    """Shard layout of the two inputs: image rows are numbered globally in shard order. Small enough to travel to
    every task (paths and sizes); the arrays are mapped there, on first use."""

    def __init__(self, work: Path):
        self.img_dir, self.sent_dir = work / IMG, work / SENT
        self.img_shards = input_indices(self.img_dir, "emb")
        self.sent_shards = input_indices(self.sent_dir, "emb")
        # memory maps of the arrays, by shard position: gathers never re-read an id shard
        self.img_arrays = MappedShards(self.img_dir, "emb", self.img_shards)
        self.img_sizes = shard_sizes(self.img_dir, "emb", self.img_shards)
        self.sent_arrays = MappedShards(self.sent_dir, "emb", self.sent_shards)
        self.img_offsets = np.concatenate([[0], np.cumsum(self.img_sizes)]).astype(np.int64)
        # only the count is needed here (the header of a memory map): a full fp32 load is 8 GB at 2M x 1024
        self.n_centroids = len(np.load(self.sent_dir / CENTROIDS, mmap_mode="r", allow_pickle=False))

    def image_range(self, j: int) -> tuple[int, int]:
        p = self.img_shards.index(j)
        return int(self.img_offsets[p]), int(self.img_offsets[p + 1])

    def image_embeddings(self, rows: np.ndarray) -> np.ndarray:
        """Embeddings of global image rows (any order) in their stored dtype (fp16: half the memory; the products
        convert one cluster at a time), gathered shard by shard from the memory maps."""
        out = None
        shard_pos = np.searchsorted(self.img_offsets, rows, side="right") - 1
        for p in np.unique(shard_pos):
            sel = np.flatnonzero(shard_pos == p)
            arr = self.img_arrays[p]
            local = rows[sel] - self.img_offsets[p]
            order = np.argsort(local)  # sorted reads from the memory map
            block = np.asarray(arr[local[order]])
            if out is None:
                out = np.zeros((len(rows), block.shape[1]), block.dtype)
            out[sel[order]] = block
        return out if out is not None else np.zeros((0, 0), np.float32)


# ---- step 1: inter-cluster probes ---------------------------------------------------------------------------
def probe_shard(stage: Stage, pools: Pools, j: int, assigner: Any, nprobe: int) -> Counts:
    _, emb = read_array_shard(pools.img_dir, "emb", j, mmap=True)
    labels, sims = assigner.search(emb, nprobe) if len(emb) else (np.zeros((0, nprobe), np.int64),
                                                                  np.zeros((0, nprobe), np.float32))
    save_npy(stage.path("probesim", j, "npy"), sims.astype(np.float32))
    save_npy(stage.path("probe", j, "npy"), labels.astype(np.int64))
    c = Counts()
    c.keep(len(emb))
    return c


# ---- step 2: intra-cluster search, one bucket of clusters at a time -------------------------------------------
def bucket_bounds(sizes: np.ndarray, max_sentences: int, max_clusters: int) -> np.ndarray:
    """Consecutive cluster ranges [bounds[b], bounds[b+1]) holding at most `max_sentences` sentences (a single
    larger cluster gets a bucket of its own) and at most `max_clusters` clusters: a rank's memory is bounded by the
    config, not by the corpus."""
    bounds, count, first = [0], 0, 0
    for c, n in enumerate(np.asarray(sizes, np.int64).tolist()):
        if c > first and (count + n > max_sentences or c - first >= max_clusters):
            bounds.append(c)
            count, first = 0, c
        count += n
    if len(sizes):
        bounds.append(len(sizes))
    return np.asarray(bounds, np.int64)


def sentence_offsets(pools: Pools, bounds: np.ndarray) -> np.ndarray:
    """(shards, buckets+1): where each bucket's cluster range starts in every cluster-sorted sentence shard."""
    rows = []
    for i in pools.sent_shards:
        clusters = pq.read_table(pools.sent_dir / f"sentences-{i:05d}.parquet", columns=["cluster"]).column(
            "cluster").to_numpy()
        rows.append(np.searchsorted(clusters, bounds, side="left"))
    return np.asarray(rows, np.int64).reshape(len(pools.sent_shards), len(bounds))


def probed_rows(probe_paths: list[Path], img_offsets: np.ndarray, lo_c: int, hi_c: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global image row, probe, cluster) of every probe into clusters lo_c..hi_c-1, sorted by image row then probe.
    One image shard's probes at a time through a memory map: all of them at once would be 198M x nprobe x 8 B in
    every task."""
    rows, probe, cluster = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for path, off in zip(probe_paths, img_offsets):
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        r, q = np.nonzero((arr >= lo_c) & (arr < hi_c))  # row-major: sorted by image row, then probe
        rows.append(r + off)
        probe.append(q)
        cluster.append(np.asarray(arr[r, q]))
    return np.concatenate(rows), np.concatenate(probe), np.concatenate(cluster)


def probe_counts(probe_paths: list[Path], bounds: np.ndarray) -> np.ndarray:
    """Probes into each bucket's cluster range, counted one image shard at a time (a bincount per shard)."""
    total = np.zeros(len(bounds) - 1, np.int64)
    for path in probe_paths:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.size:
            total += np.bincount(np.searchsorted(bounds, np.asarray(arr).ravel(), "right") - 1,
                                 minlength=len(total))[:len(total)]
        del arr
    return total


def bucket_units(counts: np.ndarray, max_images: int) -> list[tuple[int, int, int]]:
    """The search units: (bucket, first probe, end probe), a bucket's probes (sorted by image row) split into runs
    of at most `max_images`, so a hub cluster probed by millions of images is no single unit's load."""
    return [(b, lo, min(lo + max_images, int(n))) for b, n in enumerate(counts.tolist())
            for lo in range(0, max(int(n), 1), max_images)]


def bucket_shard(stage: Stage, pools: Pools, unit: tuple[int, int, int], bounds: np.ndarray, offsets: np.ndarray,
                 probe_paths: list[Path], k: int, image_chunk: int = 1_000_000, blas_threads: int = 1,
                 index: int = 0) -> Counts:
    """One search unit (`bucket_units`): its probes against its bucket's sentences -> cand-`index`.parquet."""
    b, first, end = unit
    rows, probe, cluster = probed_rows(probe_paths, pools.img_offsets, bounds[b], bounds[b + 1])
    rows, probe, cluster = rows[first:end], probe[first:end], cluster[first:end]
    embs, ids, texts, clusters = [], [], [], []
    for p, i in enumerate(pools.sent_shards):
        a, z = int(offsets[p, b]), int(offsets[p, b + 1])
        if z <= a or len(rows) == 0:
            continue
        arr = pools.sent_arrays[p]  # the ids come with the records below: no id shard is read
        # a copy in the stored dtype (fp16: converted one cluster at a time); a view would keep this shard's memory
        # map, and its file descriptor, open until the bucket is done: one per sentence shard
        embs.append(np.array(arr[a:z]))
        t = read_row_range(pools.sent_dir / f"sentences-{i:05d}.parquet", a, z, ["id", "text", "cluster"])
        ids.extend(t.column("id").to_pylist())
        texts.extend(t.column("text").to_pylist())
        clusters.append(t.column("cluster").to_numpy())
    out = {"image_row": rows.astype(np.int64), "probe": probe.astype(np.int32),
           "cluster": cluster.astype(np.int64), "sentence_ids": [[] for _ in rows],
           "texts": [[] for _ in rows], "sims": [[] for _ in rows]}
    if embs:
        cl = np.concatenate(clusters)
        order = np.argsort(cl, kind="stable")  # shard slices are each sorted; merge them into one sorted run
        sent = np.concatenate(embs)
        embs.clear()  # the slices go before the reordered copy is made: two copies of the bucket at most
        sent = sent[order]
        ids = [ids[o] for o in order]
        texts = [texts[o] for o in order]
        idx = np.full((len(rows), k), -1, np.int64)
        val = np.full((len(rows), k), topk.NEG, np.float32)
        from threadpoolctl import threadpool_limits

        # the per-cluster products are small (hundreds of rows): threads would fight more than help; tasks (one per
        # core) give the parallelism
        with threadpool_limits(limits=blas_threads, user_api="blas"):
            for lo in range(0, len(rows), image_chunk):  # images in bounded chunks too
                sl = slice(lo, lo + image_chunk)
                idx[sl], val[sl] = topk.intra_cluster_topk(pools.image_embeddings(rows[sl]), out["cluster"][sl],
                                                           sent, cl[order], k, products.task_device())
        for r in range(len(rows)):
            keep = idx[r] >= 0
            out["sentence_ids"][r] = [ids[x] for x in idx[r][keep]]
            out["texts"][r] = [texts[x] for x in idx[r][keep]]
            out["sims"][r] = val[r][keep].tolist()
    path = stage.path("cand", index)
    tmp = tmp_name(path)
    pq.write_table(pa.table(out, schema=CANDIDATES), tmp, compression="zstd", row_group_size=ROW_GROUP)
    os.replace(tmp, path)
    c = Counts()
    c.keep(len(rows))
    return c


# ---- step 3: merge per image shard -----------------------------------------------------------------------------
def image_records(pools: Pools, j: int) -> tuple[list[str], list[dict[str, Any]]]:
    ids, _ = read_array_shard(pools.img_dir, "emb", j, mmap=True)
    meta = {r["id"]: r for r in pq.read_table(pools.img_dir / f"images-{j:05d}.parquet",
                                              columns=["id", "doc_id", "url"]).to_pylist()}
    return ids, [meta.get(i, {"id": i, "doc_id": None, "url": None}) for i in ids]


def finish_rows(stage: Stage, j: int, recs: list[dict[str, Any]], cands: list[list[tuple]], probe_cluster,
                probe_sim, k: int, min_sim: Optional[float]) -> Counts:
    """cands[r]: (sim, probe, position, sentence_id, text, cluster) tuples for image r; best k over all probes."""
    counts, rows = Counts(), []
    for r, rec in enumerate(recs):
        best = sorted(cands[r], key=lambda t: (-t[0], t[1], t[2]))[:k]
        if not best:
            counts.drop("no_text")
            continue
        if min_sim is not None and best[0][0] < min_sim:
            counts.drop("below_min_similarity")
            continue
        counts.keep()
        if len(best) < k:
            counts.produce("fewer_than_k_texts")
        rows.append({**rec, "texts": [t[4] for t in best], "sentence_ids": [t[3] for t in best],
                     "sims": [float(t[0]) for t in best], "clusters": [int(t[5]) for t in best],
                     "probe_cluster": int(probe_cluster[r]), "probe_sim": float(probe_sim[r])})
    cols = {f.name: [row.get(f.name) for row in rows] for f in RETRIEVED}
    write_table(stage.path("retrieved", j), pa.Table.from_pydict(cols, schema=RETRIEVED))
    return counts


def merge_shard(stage: Stage, probe_stage: Stage, bucket_stage: Stage, pools: Pools, j: int, n_buckets: int,
                k: int, min_sim: Optional[float]) -> Counts:
    lo, hi = pools.image_range(j)
    _, recs = image_records(pools, j)
    cands: list[list[tuple]] = [[] for _ in range(hi - lo)]
    for b in range(n_buckets):
        t = pq.read_table(bucket_stage.path("cand", b), filters=[("image_row", ">=", lo), ("image_row", "<", hi)])
        for row in t.to_pylist():
            for pos, (sid, text, sim) in enumerate(zip(row["sentence_ids"], row["texts"], row["sims"])):
                cands[row["image_row"] - lo].append((sim, row["probe"], pos, sid, text, row["cluster"]))
    probes = np.load(probe_stage.path("probe", j, "npy"))
    sims = np.load(probe_stage.path("probesim", j, "npy"))
    return finish_rows(stage, j, recs, cands, probes[:, 0] if len(probes) else probes,
                       sims[:, 0] if len(sims) else sims, k, min_sim)


def sentence_pool(pools: Pools) -> dict[str, list]:
    """Every sentence's id, text and cluster (exact mode: small data only)."""
    sent: dict[str, list] = {"id": [], "text": [], "cluster": []}
    for i in pools.sent_shards:
        t = pq.read_table(pools.sent_dir / f"sentences-{i:05d}.parquet", columns=["id", "text", "cluster"])
        ids_i, _ = read_array_shard(pools.sent_dir, "emb", i, mmap=True)
        if t.column("id").to_pylist() != list(ids_i):
            raise StageError(f"{SENT} shard {i}: records and embeddings are not aligned")
        for key in sent:
            sent[key].extend(t.column(key).to_pylist())
    return sent


def sentence_chunks(pools: Pools) -> Iterator[tuple[int, np.ndarray]]:
    """(global offset, embeddings) of every sentence shard in order, mapped as they are reached: a list of every
    shard's map would hold a file descriptor per shard."""
    off = 0
    for arr in pools.sent_arrays:
        yield off, arr
        off += len(arr)


def exact_shard(stage: Stage, pools: Pools, j: int, sent: dict[str, list], assigner: kmeans.Assigner, k: int,
                min_sim: Optional[float]) -> Counts:
    """Brute force against every sentence (validation mode); the probe columns still report the nearest centre."""
    _, emb = read_array_shard(pools.img_dir, "emb", j, mmap=True)
    _, recs = image_records(pools, j)
    idx, val = topk.exact_topk(np.asarray(emb, np.float32), sentence_chunks(pools), k) if len(emb) else (
        np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
    probes, psims = assigner.search(emb, 1) if len(emb) else (np.zeros((0, 1), np.int64), np.zeros((0, 1)))
    cands = [[(float(v), 0, p, sent["id"][x], sent["text"][x], sent["cluster"][x])
              for p, (x, v) in enumerate(zip(idx[r], val[r])) if x >= 0] for r in range(len(recs))]
    return finish_rows(stage, j, recs, cands, probes[:, 0], psims[:, 0], k, min_sim)


def similarity_summary(stage: Stage, indices: list[int]) -> dict[str, Any]:
    """Quantiles of the best text's similarity over every image: a fixed-bin histogram filled one shard at a time
    (quantiles to 1e-4, min and max exact), not a list of every image's value in one process."""
    import pyarrow.compute as pc

    hist = Histogram()
    for j in indices:
        sims = pq.read_table(stage.path("retrieved", j), columns=["sims"]).column("sims")
        hist.add(pc.list_element(pc.filter(sims, pc.greater(pc.list_value_length(sims), 0)), 0).to_numpy())
    if not hist.n:
        return {"text1_similarity": None}
    q = hist.quantiles([0.0, 0.05, 0.5, 0.95, 1.0])
    return {"text1_similarity": dict(zip(["min", "p05", "median", "p95", "max"], q))}


def run(cfg: BuildConfig, ex: Executor) -> bool:
    r = cfg.retrieve
    if r.mode not in ("hierarchical", "exact"):
        raise StageError(f"retrieve.mode must be hierarchical or exact, got {r.mode!r}")
    if r.probe not in ("auto", "exact", "two_level"):
        raise StageError(f"retrieve.probe must be auto, exact or two_level, got {r.probe!r}")
    for key in ("k", "nprobe", "clusters_per_bucket", "bucket_sentences", "bucket_images", "blas_threads"):
        if getattr(r, key) < 1:
            raise StageError(f"retrieve.{key} must be >= 1, got {getattr(r, key)}")
    work = Path(cfg.work_dir)
    if r.probe == "two_level" and not (work / SENT / "parent.npy").is_file():
        raise StageError("retrieve.probe=two_level needs a two-level cluster fit (cluster.method=two_level)")
    unhashed = {"blas_threads": None, "bucket_images": None}  # change no byte of the output
    config = asdict(r) | unhashed if r.mode == "hierarchical" else asdict(r) | unhashed | {
        "nprobe": None, "clusters_per_bucket": None, "bucket_sentences": None, "probe": None}
    stage = Stage(work, NAME, config, [SENT, IMG])
    if stage.skip_complete(cfg.force):
        return True
    pools = Pools(work)  # lists the shards and reads their sizes: not for a stage that is already done
    stage.begin(cfg.force)
    gpu = kmeans.use_gpu(cfg.cluster.gpu, "cluster.gpu", ex.session.gpus)
    # the probe and the bucket products on a GPU wherever the cluster has one (torch where faiss has no GPU)
    accel = products.wants_gpu(cfg.cluster.gpu, "cluster.gpu", ex.session.gpus)
    spec = spec_from(cfg.cluster, "cluster")
    nprobe = min(r.nprobe, pools.n_centroids)
    # auto: every centre on a GPU (one product), the two-level search on CPUs where the fit has one
    assigner = AssignerOf(pools.sent_dir, spec, gpu, cfg.cluster.assign_batch, cfg.cluster.gpu_fp16,
                          r.probe)
    probe_res = ex.resources(NAME, gpu=gpu or accel)
    extra = lambda st: similarity_summary(st, pools.img_shards)  # noqa: E731
    if r.mode == "exact":
        def exact(j: int) -> Counts:
            sent = per_process(f"{stage.hash}/sentences", lambda: sentence_pool(pools))
            return exact_shard(stage, pools, j, sent, assigner(), r.k, r.min_similarity)

        return run_sharded(ex, stage, pools.img_shards, exact, cfg.force, extra=extra, resources=probe_res)

    sub = {"k": r.k, "nprobe": nprobe, "clusters_per_bucket": r.clusters_per_bucket,
           "bucket_sentences": r.bucket_sentences, "probe": r.probe}
    probe_stage = stage.sub("_probe", sub, [SENT, IMG])
    run_sharded(ex, probe_stage, pools.img_shards,
                lambda j: probe_shard(probe_stage, pools, j, assigner(), nprobe), resources=probe_res)
    bounds = bucket_bounds(np.load(pools.sent_dir / "cluster_sizes.npy", allow_pickle=False), r.bucket_sentences,
                           r.clusters_per_bucket)
    bucket_stage = stage.sub("_buckets", {**sub, "bucket_images": r.bucket_images}, [SENT, IMG])
    probe_paths = [probe_stage.path("probe", j, "npy") for j in pools.img_shards]
    units = bucket_units(ex.call(bucket_stage, "probe counts", probe_counts, probe_paths, bounds), r.bucket_images)
    n_buckets = len(units)
    if not bucket_stage.is_complete():
        offsets = ex.call(bucket_stage, "sentence offsets", sentence_offsets, pools, bounds)
        run_sharded(ex, bucket_stage, range(n_buckets),
                    lambda u: bucket_shard(bucket_stage, pools, units[u], bounds, offsets, probe_paths, r.k,
                                           r.bucket_images, r.blas_threads, u),
                    resources=ex.resources(NAME, gpu=accel))
    return run_sharded(ex, stage, pools.img_shards,
                       lambda j: merge_shard(stage, probe_stage, bucket_stage, pools, j, n_buckets, r.k,
                                             r.min_similarity), extra=extra)
