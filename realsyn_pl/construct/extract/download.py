"""Stage `download`: give every image record its bytes (fetching URLs), with a per-URL status shard.

Per input shard i: `images-i.parquet` (records that now have bytes or a readable local path) and
`fetch-i.parquet` (id, url, status, error_message, sizes, sha256 for every URL tried). Drops: `fetch_<status>` for
failed URLs (http_404, timeout, too_large, opted_out for an X-Robots-Tag opt-out, decode_error, invalid_url,
local_path_refused for a file:// URL outside the image root, ...), `local_path_refused` for a record whose only source
is a local path outside the image root, `no_image_data` for records with neither bytes, a readable path, nor a URL (or
download.enabled=false).

Local files are read only under download.image_root (null = input.image_root; neither set = none): a corpus row that
names /etc/shadow or ../../.ssh/id_rsa must not end up in a published tar. A record's path is kept only when it
resolves (symlinks, ..) under that root, and is then stored resolved; a refused one is cleared, so no later reader
(image_filter, engine/image_source.py) can open it. Paths of records that carry their bytes are never read and are
left as they are. The manifest adds `fetch_stats`:
attempted, ok, success_rate, by status, and the fetcher used. `images-i.parquet` is the one copy of the bytes: later
records point at its rows (src_row, engine/image_source.py), and its small row groups let a reader read few of them.

The fetcher is img2dataset (download.fetcher, the `download` extra): per input shard its URLs become one img2dataset
input parquet, split into download.processes pieces so every process has work, downloaded with its distributor and
resize, and its parquet output is read back in input order. img2dataset numbers its own output shards; wrapping it
per input shard keeps this stage's contract (output shard i from input shard i, resumable per shard). Without the
extra the builtin threaded fetcher (extract/fetch.py) is used: same statuses and opt-outs, originals kept. Both
fetch each URL through extract/fetch.py (img2dataset_run.py explains how), so download.deadline_s and max_bytes bound
both, and a URL `fetch.refusal` rejects (not http(s), or file:// outside the root) is never handed to img2dataset.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.config import BuildConfig, DownloadConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.image_source import DOWNLOAD_ROWS_PER_GROUP
from realsyn_pl.construct.engine.records import ShardWriter, read_batches, write_records, write_table
from realsyn_pl.construct.engine.schemas import FETCH_STATUS, IMAGES
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices
from realsyn_pl.construct.extract import img2dataset_run as i2d
from realsyn_pl.construct.extract.fetch import LOCAL_REFUSED, fetch_all, is_file, local_path, refusal

NAME, INPUT = "download", "extract"
MAX_PIECE = 10_000  # img2dataset rows per piece: bounds the bytes held while reading its output back
_I2D_COLS = ["id", "key", "status", "error_message", "width", "height", "original_width", "original_height",
             "sha256", "jpg"]


def fetch_config(cfg: BuildConfig) -> DownloadConfig:
    """download.* with the image root in force: download.image_root, else input.image_root (where the corpus's
    relative paths point), else None (every local path refused)."""
    return replace(cfg.download, image_root=cfg.download.image_root or cfg.input.image_root)


def _vet(r: dict[str, Any], root: str | None) -> dict[str, Any]:
    """`r` with its path resolved when it lies under `root`, else cleared (refused: key `_refused`). Records that
    carry their bytes keep their path untouched: nobody reads it."""
    if r["bytes"] or not r["path"]:
        return r
    real = local_path(r["path"], root)
    return {**r, "path": str(real)} if real is not None else {**r, "path": None, "_refused": True}


def _has_data(r: dict[str, Any]) -> bool:
    return bool(r["bytes"]) or bool(r["path"] and is_file(r["path"]))


def _batches(in_path: Path, cfg: BuildConfig) -> Iterator[list[dict[str, Any]]]:
    root = fetch_config(cfg).image_root
    for batch in read_batches(in_path, batch_size=max(64, cfg.download.threads * 4)):
        yield [_vet(r, root) for r in batch.to_pylist()]


def _wanted(r: dict[str, Any], cfg: BuildConfig) -> bool:
    return cfg.download.enabled and not _has_data(r) and bool(r["url"])


def _finish(r: dict[str, Any], res: dict[str, Any] | None, data: bytes | None, counts: Counts, out: ShardWriter,
            statuses: list[dict[str, Any]]) -> None:
    refused = r.pop("_refused", False)
    if res is not None:
        statuses.append(res)
        if res["status"] != "ok":
            counts.drop(f"fetch_{res['status']}")
            return
        r = {**r, "bytes": data}
    elif not _has_data(r):
        counts.drop(LOCAL_REFUSED if refused else "no_image_data")
        return
    counts.keep()
    out.write(r)


def builtin_shard(cfg: BuildConfig, stage: Stage, in_path: Path, index: int) -> tuple[Counts, list[dict[str, Any]]]:
    counts, statuses, d = Counts(), [], fetch_config(cfg)
    with ShardWriter(stage.path("images", index), IMAGES, DOWNLOAD_ROWS_PER_GROUP) as out:
        for rows in _batches(in_path, cfg):
            wanted = [r for r in rows if _wanted(r, cfg)]
            results = {r["id"]: res for r, res in zip(wanted, fetch_all([r["url"] for r in wanted], d))}
            for r in rows:
                res = results.get(r["id"])
                status = None if res is None else {
                    "id": r["id"], "url": r["url"], "status": res.status, "attempts": res.attempts,
                    "seconds": res.seconds, "sha256": hashlib.sha256(res.data).hexdigest() if res.data else None}
                _finish(r, status, res.data if res else None, counts, out, statuses)
    return counts, statuses


def _run_img2dataset(cfg: BuildConfig, work: Path, urls: pa.Table) -> int:
    """img2dataset over one input shard's URLs in `work`; returns its rows per piece."""
    d = fetch_config(cfg)
    per = max(1, min(MAX_PIECE, -(-urls.num_rows // d.processes)))
    write_table(work / "input.parquet", urls)
    i2d.run(d, url_list=str(work / "input.parquet"), input_format="parquet", url_col="url",
            save_additional_columns=["id"], output_format="parquet", output_folder=str(work / "out"),
            # "incremental" on a fresh folder: img2dataset 1.47's "overwrite" deletes the _tmp folder it has just made
            number_sample_per_shard=per, incremental_mode="incremental", image_size=d.image_size,
            resize_mode=d.resize_mode, resize_only_if_bigger=d.resize_only_if_bigger, skip_reencode=True,
            encode_format="jpg", encode_quality=95, extract_exif=False, compute_hash="sha256",
            max_image_area=float(cfg.image_filter.max_pixels), **i2d.common_args(d))
    return per


class _Pieces:
    """img2dataset's output pieces, one at a time, each sorted back into input order (its key)."""

    def __init__(self, folder: Path, per: int):
        self.folder, self.per, self.loaded, self.rows = folder, per, -1, None

    def row(self, j: int) -> dict[str, Any] | None:
        p = j // self.per
        if p != self.loaded:
            path = self.folder / f"{p:05d}.parquet"
            self.loaded = p
            self.rows = None
            if path.is_file():
                t = pq.read_table(path, columns=_I2D_COLS)
                self.rows = t.sort_by("key").to_pylist()
        if self.rows is None or j % self.per >= len(self.rows):
            return None  # the piece failed in img2dataset (after its shard retries)
        return self.rows[j % self.per]


def img2dataset_shard(cfg: BuildConfig, stage: Stage, in_path: Path, index: int
                      ) -> tuple[Counts, list[dict[str, Any]]]:
    work = stage.dir / "_img2dataset" / f"{index:05d}"
    if work.exists():
        shutil.rmtree(work)  # what a killed run left: redo the shard
    work.mkdir(parents=True)
    ids, urls, refused, d = [], [], {}, fetch_config(cfg)
    for rows in _batches(in_path, cfg):
        for r in rows:
            if _wanted(r, cfg):
                why = refusal(r["url"], d)
                if why is not None:  # never handed over: img2dataset's own urlopen would read a file:// URL
                    refused[r["id"]] = why
                    continue
                ids.append(r["id"])
                urls.append(r["url"])
    per = _run_img2dataset(cfg, work, pa.table({"id": ids, "url": urls})) if ids else 1
    pieces, counts, statuses, j = _Pieces(work / "out", per), Counts(), [], 0
    with ShardWriter(stage.path("images", index), IMAGES, DOWNLOAD_ROWS_PER_GROUP) as out:
        for rows in _batches(in_path, cfg):
            for r in rows:
                res, data = None, None
                if _wanted(r, cfg) and r["id"] in refused:
                    res = {"id": r["id"], "url": r["url"], "status": refused[r["id"]],
                           "error_message": "not fetched: not an http(s) URL, or a file outside download.image_root"}
                elif _wanted(r, cfg):
                    got = pieces.row(j)
                    j += 1
                    if got is not None and got["id"] != r["id"]:
                        raise StageError(f"download shard {index}: img2dataset output out of order at {r['id']}")
                    if got is None:
                        res = {"id": r["id"], "url": r["url"], "status": "shard_failed",
                               "error_message": "img2dataset failed this piece"}
                    else:
                        res = {k: got[k] for k in ("error_message", "width", "height", "original_width",
                                                   "original_height", "sha256")}
                        res.update(id=r["id"], url=r["url"], status=i2d.reason(got["status"], got["error_message"]))
                        data = got["jpg"]
                _finish(r, res, data, counts, out, statuses)
    shutil.rmtree(work)
    return counts, statuses


def download_shard(cfg: BuildConfig, stage: Stage, in_path: Path, index: int) -> Counts:
    shard = img2dataset_shard if i2d.use_img2dataset(cfg.download) else builtin_shard
    counts, statuses = shard(cfg, stage, in_path, index)
    write_records(stage.path("fetch", index), statuses, FETCH_STATUS)
    for s in statuses:
        counts.produce(f"status_{s['status']}")
    return counts


def fetch_stats(stage: Stage, fetcher: str) -> dict[str, Any]:
    by: dict[str, int] = {}
    for marker in sorted((stage.dir / "_done").glob("*.json")):
        for k, v in json.loads(marker.read_text())["counts"]["produced"].items():
            by[k[len("status_"):]] = by.get(k[len("status_"):], 0) + v
    attempted = sum(by.values())
    return {"attempted": attempted, "ok": by.get("ok", 0), "fetcher": fetcher,
            "success_rate": round(by.get("ok", 0) / attempted, 4) if attempted else None, "by_status": by}


def run(cfg: BuildConfig, ex: Executor) -> bool:
    d = cfg.download
    fetcher = "img2dataset" if i2d.use_img2dataset(d) else "builtin"
    i2d.check(d)
    in_dir = Path(cfg.work_dir) / INPUT
    indices = input_indices(in_dir, "images")
    # what changes the output (not processes/threads/distributor, which only change speed)
    config = {"enabled": d.enabled, "retries": d.retries, "timeout_s": d.timeout_s, "fetcher": fetcher,
              "disallowed_header_directives": list(d.disallowed_header_directives),
              "user_agent_token": d.user_agent_token, "max_bytes": d.max_bytes, "deadline_s": d.deadline_s,
              "image_root": fetch_config(cfg).image_root}
    if fetcher == "img2dataset":
        config.update(image_size=d.image_size, resize_mode=d.resize_mode, resize_only_if_bigger=d.resize_only_if_bigger,
                      max_image_area=cfg.image_filter.max_pixels)
    stage = Stage(cfg.work_dir, NAME, config, [INPUT])
    extra = lambda st: {"fetch_stats": fetch_stats(st, fetcher)}  # noqa: E731
    res = ex.resources(NAME)
    if fetcher == "img2dataset":  # img2dataset starts download.processes processes inside the task
        res = replace(res, cpus=max(res.cpus, d.processes))
    return run_sharded(ex, stage, indices, lambda i: download_shard(cfg, stage, in_dir / f"images-{i:05d}.parquet", i),
                       cfg.force, extra=extra, resources=res)
