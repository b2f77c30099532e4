"""`build release` through img2dataset: the authors' recipe on the published parquet files, then this stage's
manifest (counts by drop reason, from img2dataset's per-shard parquet) and sizes.json beside its output folder.

img2dataset owns its output folder: it numbers shards per input file, resumes from the shards that have a
`_stats.json`, and reads every other `.json` there as a shard id, so nothing of this stage is written inside it.
img2dataset spreads its work itself (download.processes, or its Spark / Ray distributor), so the whole download is
one Ray task asking for download.processes CPUs; it marks every finished tar done, and a rerun resumes the rest.
Each URL is fetched through extract/fetch.py inside img2dataset (img2dataset_run.py), so download.deadline_s,
max_bytes and image_root bound the release as they do the download stage: a URL that is not http(s), or a file://
URL outside the image root, is refused there before any I/O and counted (fetch_invalid_url,
fetch_local_path_refused).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor, Resources, write_manifest
from realsyn_pl.construct.engine.records import write_table
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, parse_force, write_json
from realsyn_pl.construct.extract import img2dataset_run as i2d
from realsyn_pl.construct.extract.download import fetch_config

NAME = "release"
_OWN_JSON = re.compile(r"^\d+_stats\.json$")


def recipe_args(cfg: BuildConfig, input_folder: Path, output_folder: Path) -> dict[str, Any]:
    """The authors' img2dataset command (RealSyn download.md) as keyword arguments; concurrency and identification
    from download.*, retries from release.retries (0, as in the recipe)."""
    r = cfg.release
    return {"url_list": str(input_folder), "input_format": "parquet", "url_col": r.url_col,
            "caption_col": r.caption_col, "save_additional_columns": list(r.extra_cols),
            "output_format": "webdataset", "output_folder": str(output_folder), "image_size": r.image_size,
            "resize_mode": "keep_ratio", "resize_only_if_bigger": r.resize_only_if_bigger,
            "skip_reencode": r.skip_reencode, "encode_quality": r.jpeg_quality,
            "number_sample_per_shard": r.samples_per_shard, "incremental_mode": "incremental",
            **i2d.common_args(cfg.download), "retries": r.retries}


def _inputs(stage: Stage, files: list[Path], sizes: list[int], max_rows: int | None, columns: list[str]
            ) -> tuple[Path, list[int]]:
    """One folder img2dataset reads in order (it takes a file or a folder): links to the files, or with
    release.max_rows the first rows written out. Returns it and the row count of each file in it."""
    folder = stage.dir / "_input"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    left, counts = (sum(sizes) if max_rows is None else max_rows), []
    for k, (f, n) in enumerate(zip(files, sizes)):
        if left <= 0:
            break
        dest = folder / f"{k:05d}.parquet"
        if n <= left:
            os.symlink(f.resolve(), dest)
        else:
            write_table(dest, pq.read_table(f, columns=columns).slice(0, left))
        counts.append(min(n, left))
        left -= counts[-1]
    return folder, counts


def shard_counts(out: Path, t: int) -> Counts:
    c = Counts()
    table = pq.read_table(out / f"{t:05d}.parquet", columns=["url", "status", "error_message"])
    for url, status, error in zip(*(table.column(n).to_pylist() for n in ("url", "status", "error_message"))):
        if status == "success":
            c.keep()
        elif not url:
            c.drop("no_url")
        else:
            why = i2d.reason(status, error)
            c.drop(why if status == "failed_to_resize" else f"fetch_{why}")
    return c


def download_tars(cfg: BuildConfig, stage: Stage, folder: Path, out: Path, n_tars: int) -> None:
    """The task: img2dataset over the whole input (it resumes the tars it finished before), then each tar's counts
    from its parquet as the tar's `_done` marker."""
    i2d.run(fetch_config(cfg), **recipe_args(cfg, folder, out))
    missing = [t for t in range(n_tars) if not (out / f"{t:05d}_stats.json").is_file()]
    if missing:
        raise StageError(f"img2dataset left {len(missing)} of {n_tars} shards unfinished (first {missing[0]:05d}); "
                         f"rerun the same command to retry them")
    for t in range(n_tars):
        if not stage.shard_done(t):
            stage.mark_shard_done(t, shard_counts(out, t), 0.0)


def run_release(cfg: BuildConfig, ex: Executor, files: list[Path], sizes: list[int]) -> bool:
    r, d = cfg.release, cfg.download
    i2d.check(d)
    started = time.time()
    config = {"files": [str(f) for f in files], "fetcher": "img2dataset",
              **{k: v for k, v in vars(r).items() if k != "paths"},
              "disallowed_header_directives": list(d.disallowed_header_directives),
              "user_agent_token": d.user_agent_token, "timeout_s": d.timeout_s, "max_bytes": d.max_bytes,
              "deadline_s": d.deadline_s, "image_root": fetch_config(cfg).image_root}
    stage = Stage(cfg.work_dir, NAME, config)
    if stage.skip_complete(cfg.force):
        return True
    stage.begin(cfg.force)
    out = Path(r.output_dir) if r.output_dir is not None else stage.dir / "shards"
    foreign = sorted(p.name for p in out.glob("*.json") if not _OWN_JSON.match(p.name)) if out.is_dir() else []
    if foreign:
        raise StageError(f"release.output_dir {out} holds {foreign[0]}, which img2dataset would read as a shard: "
                         f"give an empty folder")
    folder, counts = _inputs(stage, files, sizes, r.max_rows, [r.url_col, r.caption_col, *r.extra_cols])
    n_tars = sum(math.ceil(n / r.samples_per_shard) for n in counts)
    if parse_force(cfg.force) in (True, NAME) and out.exists():
        # img2dataset 1.47's incremental_mode=overwrite deletes the _tmp folder it has just made: wipe it here
        shutil.rmtree(out)
    if not all(stage.shard_done(t) for t in range(n_tars)):
        ex.call(stage, "img2dataset", download_tars, cfg, stage, folder, out, n_tars,
                resources=Resources(max(ex.rc.task_cpus, cfg.download.processes), 0.0, ex.rc.task_memory_gb))
    shutil.rmtree(folder, ignore_errors=True)

    def summary(st: Stage) -> dict[str, Any]:
        sizes_json = {f"{t:05d}.tar": st.shard_counts(t).n_out for t in range(n_tars)}
        write_json(st.dir / "sizes.json", sizes_json)
        total = sum(sizes_json.values())
        return {"samples": total, "rows": sum(counts), "success_rate": round(total / max(1, sum(counts)), 4),
                "output_dir": str(out), "urls": f"{out}/{{00000..{max(n_tars - 1, 0):05d}}}.tar"}

    return write_manifest(ex, stage, range(n_tars), started, extra=summary)
