"""Rows -> webdataset tars, as img2dataset's webdataset output: tar t holds the images of rows t*S .. (t+1)*S-1
that could be read (S = samples_per_shard), keyed as img2dataset keys them, `.jpg` (img2dataset's recipe: the
shorter side scaled down to image_size, never up; a JPEG that needs no resize keeps its bytes), `.txt` = the
caption, `.json` = {url, key, status, caption, width, height, original_width, original_height, sha256} + the extra
columns.

With img2dataset installed the rows go through img2dataset itself (extract/img2dataset_run.py: every URL, file://
included, fetched by extract/fetch.py under the image root, with its deadline and size cap); it also writes its
`{t:05d}.parquet` and `{t:05d}_stats.json` beside each tar. Without it the builtin fetcher (the same
extract/fetch.py, in threads) and release/imaging.py (the same resize rules) write the tars, and no exif field.
Both return the samples of each tar and count the rows that failed by reason (fetch_<status>, decode_error).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Union
from urllib.parse import urlsplit
from urllib.request import url2pathname

from realsyn_pl.config import ConfigError, ShardsConfig
from realsyn_pl.construct.engine.config import DownloadConfig
from realsyn_pl.construct.engine.records import atomic_write
from realsyn_pl.construct.engine.stage import StageError
from realsyn_pl.construct.extract import img2dataset_run as i2d
from realsyn_pl.construct.extract.fetch import fetch
from realsyn_pl.construct.release.imaging import Prepared, prepare_image
from realsyn_pl.data.own.inputs import Row, Skips

JPEG_QUALITY = 95  # img2dataset's encode_quality default, the release recipe's
SHARD_DIGITS = 5   # img2dataset's oom_shard_count default: tars 00000.tar, ...


def num_tars(rows: int, per_shard: int) -> int:
    return math.ceil(rows / per_shard)


def sample_key(shard: int, row: int, per_shard: int) -> str:
    """img2dataset's key of row `row` in shard `shard` (downloader.compute_key)."""
    digits = math.ceil(math.log10(per_shard))
    return f"{shard * 10 ** digits + row:0{digits + SHARD_DIGITS}d}"


def shown(url: str) -> str:
    """A row's image as the user gave it for a skip line: the path of a local file, else the URL."""
    return url2pathname(urlsplit(url).path) if url.startswith("file:") else url


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # same input -> same bytes
    tar.addfile(info, io.BytesIO(data))


def _prepare(row: Row, d: DownloadConfig, image_size: int) -> Union[tuple[Prepared, str], str]:
    """The row's image ready for the tar with the sha256 of the bytes read, or why not."""
    res = fetch(row.url, d)
    if res.status != "ok" or res.data is None:
        return f"fetch_{res.status}"
    try:
        img = prepare_image(res.data, image_size, only_if_bigger=True, skip_reencode=True, quality=JPEG_QUALITY)
    except ValueError:
        return "decode_error"
    return img, hashlib.sha256(res.data).hexdigest()


def write_builtin(rows: list[Row], out: Path, cfg: ShardsConfig, d: DownloadConfig, skips: Skips,
                  progress: Callable[[str], None]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    per, total = cfg.samples_per_shard, num_tars(len(rows), cfg.samples_per_shard)
    window = max(1, d.threads) * 8  # rows in flight: bounds the images held in memory at once
    with ThreadPoolExecutor(max_workers=max(1, d.threads)) as pool:
        for t in range(total):
            chunk, written = rows[t * per:(t + 1) * per], 0
            name = f"{t:05d}.tar"
            with atomic_write(out / name) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for lo in range(0, len(chunk), window):
                    part = chunk[lo:lo + window]
                    for i, (row, got) in enumerate(zip(part, pool.map(lambda r: _prepare(r, d, cfg.image_size),
                                                                      part)), lo):
                        if isinstance(got, str):
                            skips.add(got, shown(row.url))
                            continue
                        img, sha = got
                        key = sample_key(t, i, per)
                        meta = {**row.extra, "caption": row.caption, "url": row.url, "key": key, "status": "success",
                                "error_message": None, "width": img.width, "height": img.height,
                                "original_width": img.original_width, "original_height": img.original_height,
                                "sha256": sha}
                        _member(tar, f"{key}.jpg", img.jpg)
                        _member(tar, f"{key}.txt", row.caption.encode("utf-8"))
                        _member(tar, f"{key}.json", json.dumps(meta, indent=4).encode("utf-8"))
                        written += 1
            sizes[name] = written
            progress(f"shards: {name} {written} of {len(chunk)} rows [{t + 1}/{total} tars]")
    return sizes


def _img2dataset_counts(out: Path, t: int, skips: Skips) -> int:
    """Samples in tar t from img2dataset's per-tar parquet; each failed row counted by reason."""
    import pyarrow.parquet as pq

    table = pq.read_table(out / f"{t:05d}.parquet", columns=["url", "status", "error_message"])
    ok = 0
    for url, status, error in zip(*(table.column(n).to_pylist() for n in ("url", "status", "error_message"))):
        if status == "success":
            ok += 1
            continue
        why = i2d.reason(status, error)
        skips.add(why if status == "failed_to_resize" else f"fetch_{why}", shown(url or ""))
    return ok


def write_img2dataset(rows: list[Row], out: Path, cfg: ShardsConfig, d: DownloadConfig, extras: list[str],
                      skips: Skips) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = num_tars(len(rows), cfg.samples_per_shard)
    columns = {"url": [r.url for r in rows], "caption": [r.caption for r in rows],
               **{c: [r.extra.get(c) for r in rows] for c in extras}}
    # img2dataset reads every .json in its output folder as a shard's stats: its input lives elsewhere
    with tempfile.TemporaryDirectory(prefix="realsyn_pl_shards_") as tmp:
        table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})
        pq.write_table(table, Path(tmp) / "input.parquet")
        try:
            i2d.run(d, url_list=str(Path(tmp) / "input.parquet"), input_format="parquet", url_col="url",
                    caption_col="caption", save_additional_columns=extras or None, output_format="webdataset",
                    output_folder=str(out), image_size=cfg.image_size, resize_mode="keep_ratio",
                    resize_only_if_bigger=True, skip_reencode=True, encode_quality=JPEG_QUALITY,
                    number_sample_per_shard=cfg.samples_per_shard, incremental_mode="incremental",
                    **i2d.common_args(d))
        except StageError as err:
            raise ConfigError(str(err)) from None
    missing = [t for t in range(total) if not (out / f"{t:05d}_stats.json").is_file()]
    if missing:
        raise ConfigError(f"img2dataset left {len(missing)} of {total} tars unfinished (first {missing[0]:05d}.tar); "
                          f"run the same command again with overwrite=true")
    return {f"{t:05d}.tar": _img2dataset_counts(out, t, skips) for t in range(total)}
