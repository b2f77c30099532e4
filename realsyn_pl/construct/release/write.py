"""Stage `write`: the balanced pairs as webdataset shards in the released RealSyn layout, plus a parquet index.

Selection: the pairs of `balance` with cluster_rank < write.cap (null: every in-window pair), in balance shard order;
with balance.sampling=random the random subset of the same size instead: random_cap <= write.cap (sampler.py).
Texts: text1-3 as extracted, or with write.text_style=official lower-cased and space-tokenised like the published
files (text_style.py); syn_text as written.
Output tar t holds selected pairs t*S .. (t+1)*S-1 (S = write.samples_per_shard), so names run 00000..N-1 without
gaps (brace-expandable) whatever the input shards were; each tar is one resumable unit (a Ray task),
written to a temp name and renamed (realsyn_pl/data/shard_writer.py), then marked done: a kill never leaves a
corrupt tar and a rerun writes only the missing ones.
Per sample (img2dataset's layout, what `fit` and open_clip_train read): `.jpg` (prepared like the authors'
img2dataset recipe, imaging.py), `.txt` = text1, `.json` = {key, url, caption, text2, text3, syn_text, width,
height, original_width, original_height, status} + provenance (image_id, doc_id, sentence_ids, sims,
text_clusters, image_cluster, cluster_size, cluster_rank, similarity, syn_meta).
Per tar `{t:05d}.parquet`: the released columns raw_image_url, text1, text2, text3, syn_text + key and provenance.
`sizes.json` (tar -> samples) is written when the stage completes; then the dataset card (card.py).
Per tar only its balance rows are read (their row groups, Arrow take); they are joined to image records of shard j
by id with Arrow (index_in; shard j first: balance shard j came from image shard j, then the others), and the bytes
come through engine/image_source.py (inline, the download shard's row src_row, or the local path), one pass over
the needed row groups per image shard. Each image is prepared as it is read; the tar's prepared images (at most
samples_per_shard, about image_size x image_size JPEGs) are held until the tar is written in balance order.
Drops: no_image_data (also a download row that vanished), decode_error.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.image_source import record_bytes, take_rows
from realsyn_pl.construct.engine.records import write_table
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices, write_json
from realsyn_pl.construct.release.imaging import Prepared, prepare_image
from realsyn_pl.construct.release.text_style import TEXT_STYLES, styled
from realsyn_pl.data.shard_writer import ShardWriter

NAME, BAL, IMG = "write", "balance", "dedup_images"
RELEASED = ("raw_image_url", "text1", "text2", "text3", "syn_text")
INDEX = pa.schema([(c, pa.string()) for c in RELEASED] + [
    ("key", pa.string()), ("image_id", pa.string()), ("doc_id", pa.string()),
    ("sentence_ids", pa.list_(pa.string())), ("sims", pa.list_(pa.float32())),
    ("text_clusters", pa.list_(pa.int64())), ("image_cluster", pa.int64()), ("cluster_size", pa.int64()),
    ("cluster_rank", pa.int64()), ("similarity", pa.float32()), ("width", pa.int32()), ("height", pa.int32())])


def selected_rows(path: Path, cap: Optional[int], sampling: str = "balanced") -> np.ndarray:
    """Rows of a balanced shard that cap `cap` keeps: the balanced set, or with sampling=random the random one."""
    if sampling == "random":
        col = pq.read_table(path, columns=["random_cap"]).column("random_cap")
        smallest = pc.fill_null(col, -1).to_numpy()  # null: in no cap's random set
        return np.arange(len(smallest)) if cap is None else np.flatnonzero((smallest >= 0) & (smallest <= cap))
    ranks = pq.read_table(path, columns=["cluster_rank"]).column("cluster_rank").to_numpy()
    return np.flatnonzero(ranks < cap) if cap is not None else np.arange(len(ranks))


def released_texts(row: dict[str, Any], style: str = "natural") -> dict[str, Optional[str]]:
    texts = [styled(t, style) for t in row["texts"]] + [None] * 3
    return {"text1": texts[0], "text2": texts[1], "text3": texts[2], "syn_text": row.get("syn_text")}


class Plan:
    """Which balance rows go into which tar: global position p of a selected pair -> tar p // S. It holds one count
    per balance shard (built by one task, `Plan.count`); a tar's task reads the rows of the shards it spans."""

    def __init__(self, work: Path, cap: Optional[int], per_shard: int, shards: list[int], counts: list[int],
                 sampling: str = "balanced"):
        self.bal_dir, self.img_dir = work / BAL, work / IMG
        self.cap, self.shards, self.sampling = cap, shards, sampling
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total, self.per_shard = int(self.offsets[-1]), per_shard
        self.num_tars = -(-self.total // per_shard)

    @classmethod
    def count(cls, work: Path, cap: Optional[int], per_shard: int, sampling: str = "balanced") -> "Plan":
        shards = input_indices(work / BAL, "balanced")
        counts = [len(selected_rows(work / BAL / f"balanced-{j:05d}.parquet", cap, sampling)) for j in shards]
        return cls(work, cap, per_shard, shards, counts, sampling)

    def pieces(self, t: int) -> list[tuple[int, np.ndarray]]:
        """(balance shard, its row numbers) making up tar t, in order."""
        lo, hi = t * self.per_shard, min(self.total, (t + 1) * self.per_shard)
        out = []
        for p, j in enumerate(self.shards):
            a, b = max(lo, self.offsets[p]), min(hi, self.offsets[p + 1])
            if b > a:
                rows = selected_rows(self.bal_dir / f"balanced-{j:05d}.parquet", self.cap, self.sampling)
                out.append((j, rows[a - self.offsets[p]:b - self.offsets[p]]))
        return out


def image_shards(img_dir: Path, first: Optional[int]) -> list[int]:
    others = sorted(int(p.name[7:12]) for p in img_dir.glob("images-?????.parquet"))
    return ([first] if first is not None else []) + [s for s in others if s != first]


def locate(img_dir: Path, first: Optional[int], ids: pa.Array) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(image shard s, positions k into `ids`, their rows in shard s) for the ids found, shard `first` first."""
    left = np.arange(len(ids))
    for s in image_shards(img_dir, first):
        f = img_dir / f"images-{s:05d}.parquet"
        if not left.size:
            break
        if not f.is_file():
            continue
        shard_ids = pq.read_table(f, columns=["id"]).column("id")
        at = pc.fill_null(pc.index_in(ids.take(pa.array(left)), value_set=shard_ids), -1)
        at = np.asarray(at.to_numpy(zero_copy_only=False), dtype=np.int64)
        hit = at >= 0
        if hit.any():
            yield s, left[hit], at[hit]
        left = left[~hit]


def prepared_images(cfg: BuildConfig, plan: Plan, j: int, ids: pa.Array) -> list[Union[Prepared, str]]:
    """The prepared image of every id (a balance piece of shard j), else its drop reason."""
    w = cfg.write
    out: list[Union[Prepared, str]] = ["no_image_data"] * len(ids)
    for s, ks, rows in locate(plan.img_dir, j, ids):
        for k, data in record_bytes(plan.img_dir / f"images-{s:05d}.parquet", rows, Path(cfg.work_dir), s):
            if data is None:
                continue
            try:
                out[ks[k]] = prepare_image(data, w.image_size, w.resize_only_if_bigger, True, w.jpeg_quality)
            except ValueError:
                out[ks[k]] = "decode_error"
    return out


def write_tar(cfg: BuildConfig, stage: Stage, plan: Plan, t: int) -> Counts:
    counts, index = Counts(), []
    with ShardWriter(stage.dir, samples_per_shard=10 ** 12, start_index=t) as tar:
        pos = 0
        for j, rows in plan.pieces(t):
            table = take_rows(plan.bal_dir / f"balanced-{j:05d}.parquet", rows)
            images = prepared_images(cfg, plan, j, table.column("id").combine_chunks())
            for r, img in zip(table.to_pylist(), images):
                if isinstance(img, str):
                    counts.drop(img)
                    continue
                key = f"{t:05d}{pos:04d}" if plan.per_shard <= 10_000 else f"{t:05d}{pos:08d}"
                pos += 1
                texts = released_texts(r, cfg.write.text_style)
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
            "sampling": plan.sampling, "text_style": cfg.write.text_style,
            "urls": f"{stage.dir}/{{00000..{max(plan.num_tars - 1, 0):05d}}}.tar"}
    if cfg.write.card:
        from realsyn_pl.construct.release.card import write_card

        info["card"] = str(write_card(Path(cfg.work_dir), stage.dir, cfg.write.cap, plan.sampling))
    return info


def run(cfg: BuildConfig, ex: Executor) -> bool:
    w = cfg.write
    if w.samples_per_shard < 1:
        raise StageError("write.samples_per_shard must be >= 1")
    if w.cap is not None and w.cap not in cfg.balance.caps:
        raise StageError(f"write.cap={w.cap} is not one of balance.caps {list(cfg.balance.caps)}")
    if w.text_style not in TEXT_STYLES:
        raise StageError(f"write.text_style must be one of {', '.join(TEXT_STYLES)}, got {w.text_style!r}")
    work = Path(cfg.work_dir)
    sampling = balance_sampling(work, cfg.balance.sampling)
    conf = asdict(w) | {"card": None}
    if conf["text_style"] == "natural":  # the default is stored as absent: builds from before the key keep their hash
        conf.pop("text_style")
    stage = Stage(work, NAME, conf, [BAL, IMG])
    if w.output_dir is not None:  # a separate place for the shards: the stage directory is that folder
        stage.dir = Path(w.output_dir)
    if stage.skip_complete(cfg.force):
        return True
    plan = ex.call(stage, "plan", Plan.count, work, w.cap, w.samples_per_shard, sampling)
    if plan.total == 0:
        raise StageError(f"write: balance selected no pairs (cap {w.cap}, sampling {sampling}); nothing to write")
    # the one buffer not bounded by a row group: a tar's prepared images wait for its balance order
    held = min(w.samples_per_shard, plan.total)
    print(f"[build] {NAME}: holds up to {held} prepared images per tar in memory (write.samples_per_shard; about "
          f"{held * 0.3 * w.image_size ** 2 / 2 ** 20:.1f} MiB at ~0.3 byte/pixel of {w.image_size}px JPEGs)",
          flush=True)
    return run_sharded(ex, stage, range(plan.num_tars), lambda t: write_tar(cfg, stage, plan, t), cfg.force,
                       extra=lambda st: finish(st, plan, cfg))


def balance_sampling(work: Path, wanted: str) -> str:
    """The sampling the done balance stage was built with, which must be balance.sampling (a stage=write run does
    not rebuild balance: its shards of the other sampling would be written under this setting's name)."""
    m_path = work / BAL / "manifest.json"
    if not m_path.is_file():
        return wanted  # input_indices says that balance is not done
    built = json.loads(m_path.read_text()).get("sampling", "balanced")  # older manifests: balanced
    if built != wanted:
        raise StageError(f"write: balance.sampling={wanted} but the balance stage in {work / BAL} was built with "
                         f"sampling={built}; rebuild it (stage=balance force=balance) or set balance.sampling={built}")
    return built


def shard_urls(out_dir: Path) -> str:
    n = len(json.loads((Path(out_dir) / "sizes.json").read_text()))
    return f"{out_dir}/{{00000..{n - 1:05d}}}.tar"
