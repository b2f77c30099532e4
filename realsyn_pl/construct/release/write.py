"""Stage `write`: the balanced pairs as webdataset shards in the released RealSyn layout, plus a parquet index.

Selection: the pairs of `balance` with cluster_rank < write.cap (null: every in-window pair), in balance shard order.
Output tar t holds selected pairs t*S .. (t+1)*S-1 (S = write.samples_per_shard), so names run 00000..N-1 without
gaps (brace-expandable) whatever the input shards were; each tar is one resumable unit (RANK/WORLD_SIZE split),
written to a temp name and renamed (realsyn_pl/data/shard_writer.py), then marked done: a kill never leaves a
corrupt tar and a rerun writes only the missing ones.
Per sample (img2dataset's layout, what `fit` and open_clip_train read): `.jpg` (prepared like the authors'
img2dataset recipe, imaging.py), `.txt` = text1, `.json` = {key, url, caption, text2, text3, syn_text, width,
height, original_width, original_height, status} + provenance (image_id, doc_id, sentence_ids, sims,
text_clusters, image_cluster, cluster_size, cluster_rank, similarity, syn_meta).
Per tar `{t:05d}.parquet`: the released columns raw_image_url, text1, text2, text3, syn_text + key and provenance.
`sizes.json` (tar -> samples) is written when the stage completes; then the dataset card (card.py).
Drops: no_image_data, decode_error.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.records import write_table
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices, run_sharded, write_json
from realsyn_pl.construct.extract.image_filter import image_bytes
from realsyn_pl.construct.release.imaging import prepare_image
from realsyn_pl.data.shard_writer import ShardWriter

NAME, BAL, IMG = "write", "balance", "dedup_images"
RELEASED = ("raw_image_url", "text1", "text2", "text3", "syn_text")
INDEX = pa.schema([(c, pa.string()) for c in RELEASED] + [
    ("key", pa.string()), ("image_id", pa.string()), ("doc_id", pa.string()),
    ("sentence_ids", pa.list_(pa.string())), ("sims", pa.list_(pa.float32())),
    ("text_clusters", pa.list_(pa.int64())), ("image_cluster", pa.int64()), ("cluster_size", pa.int64()),
    ("cluster_rank", pa.int64()), ("similarity", pa.float32()), ("width", pa.int32()), ("height", pa.int32())])


def selected_rows(path: Path, cap: Optional[int]) -> np.ndarray:
    ranks = pq.read_table(path, columns=["cluster_rank"]).column("cluster_rank").to_numpy()
    return np.flatnonzero(ranks < cap) if cap is not None else np.arange(len(ranks))


def released_texts(row: dict[str, Any]) -> dict[str, Optional[str]]:
    texts = list(row["texts"]) + [None] * 3
    return {"text1": texts[0], "text2": texts[1], "text3": texts[2], "syn_text": row.get("syn_text")}


class Plan:
    """Which balance rows go into which tar: global position p of a selected pair -> tar p // S."""

    def __init__(self, work: Path, cap: Optional[int], per_shard: int):
        self.bal_dir, self.img_dir = work / BAL, work / IMG
        self.shards = input_indices(self.bal_dir, "balanced")
        self.rows = [selected_rows(self.bal_dir / f"balanced-{j:05d}.parquet", cap) for j in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for r in self.rows])]).astype(np.int64)
        self.total, self.per_shard = int(self.offsets[-1]), per_shard
        self.num_tars = -(-self.total // per_shard)

    def pieces(self, t: int) -> list[tuple[int, np.ndarray]]:
        """(balance shard, its row numbers) making up tar t, in order."""
        lo, hi = t * self.per_shard, min(self.total, (t + 1) * self.per_shard)
        out = []
        for p, j in enumerate(self.shards):
            a, b = max(lo, self.offsets[p]), min(hi, self.offsets[p + 1])
            if b > a:
                out.append((j, self.rows[p][a - self.offsets[p]:b - self.offsets[p]]))
        return out


def image_lookup(img_dir: Path, j: int, ids: set[str]) -> dict[str, dict[str, Any]]:
    """Image records (bytes/path) of the given ids: shard j first (balance shard j came from image shard j)."""
    found: dict[str, dict[str, Any]] = {}
    files = [img_dir / f"images-{j:05d}.parquet"] + sorted(p for p in img_dir.glob("images-?????.parquet")
                                                           if p.name != f"images-{j:05d}.parquet")
    for f in files:
        if len(found) == len(ids) or not f.is_file():
            break
        for r in pq.read_table(f, columns=["id", "bytes", "path"]).to_pylist():
            if r["id"] in ids:
                found[r["id"]] = r
    return found


def write_tar(cfg: BuildConfig, stage: Stage, plan: Plan, t: int) -> Counts:
    w, counts, index = cfg.write, Counts(), []
    with ShardWriter(stage.dir, samples_per_shard=10 ** 12, start_index=t) as tar:
        pos = 0
        for j, rows in plan.pieces(t):
            table = pq.read_table(plan.bal_dir / f"balanced-{j:05d}.parquet").take(pa.array(rows))
            recs = table.to_pylist()
            images = image_lookup(plan.img_dir, j, {r["id"] for r in recs})
            for r in recs:
                data = image_bytes(images.get(r["id"], {}))
                if data is None:
                    counts.drop("no_image_data")
                    continue
                try:
                    img = prepare_image(data, w.image_size, w.resize_only_if_bigger, True, w.jpeg_quality)
                except ValueError:
                    counts.drop("decode_error")
                    continue
                key = f"{t:05d}{pos:04d}" if plan.per_shard <= 10_000 else f"{t:05d}{pos:08d}"
                pos += 1
                texts = released_texts(r)
                prov = {"image_id": r["id"], "doc_id": r["doc_id"], "sentence_ids": r["sentence_ids"],
                        "sims": r["sims"], "text_clusters": r["clusters"], "image_cluster": r["image_cluster"],
                        "cluster_size": r["cluster_size"], "cluster_rank": r["cluster_rank"],
                        "similarity": r["similarity"]}
                meta = {"key": key, "url": r["url"], "caption": texts["text1"], "status": "success",
                        "text2": texts["text2"], "text3": texts["text3"], "syn_text": texts["syn_text"],
                        "width": img.width, "height": img.height, "original_width": img.original_width,
                        "original_height": img.original_height, **prov}
                tar.write({"key": key, "jpg": img.jpg, "txt": texts["text1"], "json": meta})
                index.append({"raw_image_url": r["url"], **texts, "key": key, **prov, "width": img.width,
                              "height": img.height})
                counts.keep()
    if not (stage.dir / f"{t:05d}.tar").is_file():  # every pair of this tar was dropped: keep the numbering whole
        empty_tar(stage.dir / f"{t:05d}.tar")
    cols = {f.name: [row.get(f.name) for row in index] for f in INDEX}
    write_table(stage.dir / f"{t:05d}.parquet", pa.Table.from_pydict(cols, schema=INDEX))
    return counts


def empty_tar(path: Path) -> None:
    import os
    import tarfile

    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT):
        pass
    os.replace(tmp, path)


def finish(stage: Stage, plan: Plan, cfg: BuildConfig) -> dict[str, Any]:
    sizes = {f"{t:05d}.tar": stage.shard_counts(t).n_out for t in range(plan.num_tars)}
    write_json(stage.dir / "sizes.json", sizes)
    info = {"samples": int(sum(sizes.values())), "tars": plan.num_tars, "cap": cfg.write.cap,
            "urls": f"{stage.dir}/{{00000..{max(plan.num_tars - 1, 0):05d}}}.tar"}
    if cfg.write.card:
        from realsyn_pl.construct.release.card import write_card

        info["card"] = str(write_card(Path(cfg.work_dir), stage.dir, cfg.write.cap))
    return info


def run(cfg: BuildConfig) -> bool:
    w = cfg.write
    if w.samples_per_shard < 1:
        raise StageError("write.samples_per_shard must be >= 1")
    if w.cap is not None and w.cap not in cfg.balance.caps:
        raise StageError(f"write.cap={w.cap} is not one of balance.caps {list(cfg.balance.caps)}")
    work = Path(cfg.work_dir)
    stage = Stage(work, NAME, asdict(w) | {"card": None}, [BAL, IMG])
    if w.output_dir is not None:  # a separate place for the shards: the stage directory is that folder
        stage.dir = Path(w.output_dir)
    if stage.skip_complete(cfg.force):
        return True
    plan = Plan(work, w.cap, w.samples_per_shard)
    if plan.total == 0:
        raise StageError(f"write: balance selected no pairs (cap {w.cap}); nothing to write")
    return run_sharded(stage, range(plan.num_tars), lambda t: write_tar(cfg, stage, plan, t), cfg.progress,
                       cfg.force, extra=lambda st: finish(st, plan, cfg))


def shard_urls(out_dir: Path) -> str:
    n = len(json.loads((Path(out_dir) / "sizes.json").read_text()))
    return f"{out_dir}/{{00000..{n - 1:05d}}}.tar"
