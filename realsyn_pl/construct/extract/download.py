"""Stage `download`: give every image record its bytes (fetching URLs), with a per-URL status shard.

Per input shard i: `images-i.parquet` (records that now have bytes or a readable local path) and
`fetch-i.parquet` (id, url, status, attempts, seconds for every URL tried). Drops: `fetch_<status>` for failed URLs,
`no_image_data` for records with neither bytes, a readable path, nor a URL (or download.enabled=false). The
manifest adds `fetch_stats`: attempted, ok, success_rate, by status.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.records import ShardWriter, read_batches, write_records
from realsyn_pl.construct.engine.schemas import FETCH_STATUS, IMAGES
from realsyn_pl.construct.engine.stage import Counts, Stage, input_indices, run_sharded
from realsyn_pl.construct.extract.fetch import fetch_all

NAME, INPUT = "download", "extract"


def download_shard(cfg: BuildConfig, stage: Stage, in_path: Path, index: int) -> Counts:
    counts, statuses = Counts(), []
    with ShardWriter(stage.path("images", index), IMAGES) as out:
        for batch in read_batches(in_path, batch_size=max(64, cfg.download.threads * 4)):
            rows = batch.to_pylist()
            need = [r for r in rows if not r["bytes"] and not (r["path"] and Path(r["path"]).is_file())]
            wanted = [r for r in need if r["url"]] if cfg.download.enabled else []
            results = {r["id"]: res for r, res in zip(wanted, fetch_all([r["url"] for r in wanted], cfg.download))}
            for r in rows:
                res = results.get(r["id"])
                if res is not None:
                    statuses.append({"id": r["id"], "url": r["url"], "status": res.status,
                                     "attempts": res.attempts, "seconds": res.seconds})
                    if res.status != "ok":
                        counts.drop(f"fetch_{res.status}")
                        continue
                    r = {**r, "bytes": res.data}
                elif not r["bytes"] and not (r["path"] and Path(r["path"]).is_file()):
                    counts.drop("no_image_data")
                    continue
                counts.keep()
                out.write(r)
    write_records(stage.path("fetch", index), statuses, FETCH_STATUS)
    for s in statuses:
        counts.produce(f"status_{s['status']}")
    return counts


def fetch_stats(stage: Stage) -> dict[str, Any]:
    by: dict[str, int] = {}
    for marker in sorted((stage.dir / "_done").glob("*.json")):
        for k, v in json.loads(marker.read_text())["counts"]["produced"].items():
            by[k[len("status_"):]] = by.get(k[len("status_"):], 0) + v
    attempted = sum(by.values())
    return {"attempted": attempted, "ok": by.get("ok", 0),
            "success_rate": round(by.get("ok", 0) / attempted, 4) if attempted else None, "by_status": by}


def run(cfg: BuildConfig) -> bool:
    in_dir = Path(cfg.work_dir) / INPUT
    indices = input_indices(in_dir, "images")
    d = cfg.download
    stage = Stage(cfg.work_dir, NAME, {"enabled": d.enabled, "retries": d.retries, "timeout_s": d.timeout_s,
                                       "max_bytes": d.max_bytes}, [INPUT])
    extra = lambda st: {"fetch_stats": fetch_stats(st)}  # noqa: E731
    return run_sharded(stage, indices, lambda i: download_shard(cfg, stage, in_dir / f"images-{i:05d}.parquet", i),
                       cfg.progress, cfg.force, extra=extra)
