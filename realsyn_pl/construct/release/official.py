"""Stage `release` (`build release`): the published RealSyn parquet files -> webdataset shards that `fit` reads.

With img2dataset installed (the `download` extra; download.fetcher auto|img2dataset) this runs the authors' recipe
(download.md) itself: img2dataset --input_format parquet --url_col raw_image_url --caption_col text1
--save_additional_columns '["text2","text3","syn_text"]' --output_format webdataset --image_size 224
--resize_only_if_bigger=True --resize_mode keep_ratio --skip_reencode=True, with download.processes / threads /
distributor / timeout, X-Robots-Tag opt-outs and user_agent_token, and release.retries (default 0, the recipe's;
the builtin fetcher below uses it too). Its output folder (release.output_dir, default <work_dir>/release/shards) is
exactly img2dataset's: `{t:05d}.tar`, `{t:05d}.parquet`, `{t:05d}_stats.json`
(it refuses other .json files there, so this stage's manifest, sizes.json and drop counts by reason live one level
up, in <work_dir>/release). A killed run resumes with img2dataset's incremental mode (shards with a _stats.json are
kept). On a Spark or Ray cluster: download.distributor=pyspark|ray (data_build/README.md).

Without the extra (download.fetcher=builtin) an img2dataset-like layout is produced by the builtin fetcher
(extract/fetch.py) and imaging.py (the same resize rules), in <work_dir>/release (or release.output_dir):
- input rows are numbered over the sorted files; tar t holds the successes among rows t*S .. (t+1)*S-1 (img2dataset's
  number_sample_per_shard, default 10,000), keys `{t:05d}{i:04d}` (shard, row in shard);
- `.jpg`, `.txt` = text1, `.json` = {url, key, status, caption, width, height, original_width, original_height,
  error_message} + text2, text3, syn_text; `{t:05d}.parquet` with every input row of the shard and its status;
  `{t:05d}_stats.json` (count, successes, failed_to_download, failed_to_resize) and `sizes.json`.
Where img2dataset differs: it shards each input file on its own (rows are not numbered across files), keys rows in
ceil(log10(S)) digits (4 here, 8 above S=10,000), writes to <work_dir>/release/shards, adds original_width,
original_height, sha256 and exif to the parquet (sha256, exif to `.json`) and more fields to `_stats.json`.
Each tar is a resumable unit (a Ray task, temp + rename). Drops: fetch_<status>, decode_error, no_url.

Before any work (`check_input`, also run by `build` before Ray starts): every input must be a parquet file with the
configured columns, and the first rows' URLs must be fetchable: http(s), or file:// under download.image_root. A CSV,
or a URL column of plain local paths (each would be dropped as fetch_invalid_url), is one line naming the file.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.records import write_table
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, expand_paths, write_json
from realsyn_pl.construct.extract import img2dataset_run as i2d
from realsyn_pl.construct.extract.fetch import fetch_all, refusal
from realsyn_pl.construct.release.imaging import prepare_image
from realsyn_pl.data.shard_writer import ShardWriter

NAME = "release"


ACCEPTED = ("parquet: the published RealSyn data/train-*.parquet, or your own with the columns release.url_col, "
            "release.caption_col and release.extra_cols (a CSV converts with pyarrow.csv.read_csv and "
            "pyarrow.parquet.write_table)")
URL_SNIFF_ROWS = 100  # rows of the first file whose URLs are looked at before any work


def read_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise StageError(f"{path}: not a parquet file ({why}); release.paths takes {ACCEPTED}") from None


def url_problem(cfg: BuildConfig, path: Path) -> str | None:
    """The one line to stop on when none of the first rows' URLs can be fetched (each would be a counted drop):
    plain local paths, file:// URLs without or outside download.image_root, other schemes. None when one can."""
    r = cfg.release
    head = next(pq.ParquetFile(path).iter_batches(batch_size=URL_SNIFF_ROWS, columns=[r.url_col]), None)
    urls = [u for u in (head.column(0).to_pylist() if head is not None else []) if isinstance(u, str) and u]
    why = [refusal(u, cfg.download) for u in urls]
    if not urls or any(w is None for w in why):
        return None
    first = urls[0]
    where = f"{path}: column {r.url_col}"
    if "://" not in first:
        return (f"{where} holds local paths, not URLs (first row: {first!r}); release fetches http(s) URLs. To "
                "include local images write them as file:// URLs (file:///abs/path/a.jpg) and set "
                "download.image_root to the folder that holds them (files outside it are refused)")
    if first.startswith("file:"):
        root = cfg.download.image_root
        state = "but download.image_root is not set" if root is None else f"outside download.image_root={root}"
        return (f"{where} holds file:// URLs {state} (first row: {first!r}): local files are read only under that "
                "folder; set download.image_root to the folder that holds them")
    return (f"{where} holds no URL release can fetch (first row: {first!r}): http(s), or file:// under "
            "download.image_root")


def check_input(cfg: BuildConfig) -> list[Path]:
    """The input files, once each is a parquet file with the configured columns and the first one's URLs can be
    fetched; else one line naming the file."""
    r = cfg.release
    files = expand_paths(r.paths, "release.paths")
    if not files:
        raise StageError("release.paths is empty: give the RealSyn parquet files (data/train-*.parquet)")
    for f in files:
        names = read_schema(f).names
        missing = [c for c in [r.url_col, r.caption_col, *r.extra_cols] if c not in names]
        if missing:
            raise StageError(f"{f}: missing column(s) {', '.join(missing)} (columns: {', '.join(names)})")
    why = url_problem(cfg, files[0])
    if why is not None:
        raise StageError(why)
    return files


class Rows:
    """Global row numbering over the input parquet files, read by row range from the file metadata."""

    def __init__(self, files: list[Path], columns: list[str], max_rows: int | None):
        self.files, self.columns = files, columns
        self.sizes = []
        for f in files:
            schema = read_schema(f)
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise StageError(f"{f}: missing column(s) {', '.join(missing)} (columns: {', '.join(schema.names)})")
            self.sizes.append(pq.ParquetFile(f).metadata.num_rows)
        self.total = sum(self.sizes) if max_rows is None else min(sum(self.sizes), max_rows)

    def slice(self, lo: int, hi: int) -> list[dict[str, Any]]:
        out, start = [], 0
        for f, n in zip(self.files, self.sizes):
            a, b = max(lo, start), min(hi, start + n)
            if b > a:
                out.extend(pq.read_table(f, columns=self.columns).slice(a - start, b - a).to_pylist())
            start += n
        return out


def release_tar(cfg: BuildConfig, stage: Stage, rows: Rows, t: int) -> Counts:
    r = cfg.release
    lo, hi = t * r.samples_per_shard, min(rows.total, (t + 1) * r.samples_per_shard)
    recs = rows.slice(lo, hi)
    with_url = [x for x in recs if x.get(r.url_col)]
    fetch_cfg = replace(cfg.download, retries=r.retries)
    fetched = dict(zip((id(x) for x in with_url), fetch_all([x[r.url_col] for x in with_url], fetch_cfg)))
    counts, index, stats = Counts(), [], {"count": len(recs), "successes": 0, "failed_to_download": 0,
                                           "failed_to_resize": 0}
    with ShardWriter(stage.dir, samples_per_shard=10 ** 12, start_index=t) as tar:
        for i, x in enumerate(recs):
            key = f"{t:05d}{i:04d}" if r.samples_per_shard <= 10_000 else f"{t:05d}{i:08d}"
            res = fetched.get(id(x))
            status, error, meta = "success", None, {}
            if res is None:
                status, error = "failed_to_download", "no_url"
                counts.drop("no_url")
            elif res.status != "ok":
                status, error = "failed_to_download", res.status
                counts.drop(f"fetch_{res.status}")
            else:
                try:
                    img = prepare_image(res.data, r.image_size, r.resize_only_if_bigger, r.skip_reencode,
                                        r.jpeg_quality)
                except ValueError as err:
                    status, error = "failed_to_resize", str(err)
                    counts.drop("decode_error")
                else:
                    meta = {"width": img.width, "height": img.height, "original_width": img.original_width,
                            "original_height": img.original_height}
                    extra = {c: x.get(c) for c in r.extra_cols}
                    tar.write({"key": key, "jpg": img.jpg, "txt": x.get(r.caption_col) or "",
                               "json": {"url": x[r.url_col], "key": key, "status": status, "error_message": None,
                                        "caption": x.get(r.caption_col), **meta, **extra}})
                    counts.keep()
            stats["successes" if status == "success" else status] += 1
            index.append({"url": x.get(r.url_col), "key": key, "status": status, "error_message": error,
                          "caption": x.get(r.caption_col), **{c: x.get(c) for c in r.extra_cols},
                          "width": meta.get("width"), "height": meta.get("height")})
    if not (stage.dir / f"{t:05d}.tar").is_file():
        from realsyn_pl.construct.release.write import empty_tar

        empty_tar(stage.dir / f"{t:05d}.tar")
    schema = pa.schema([("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
                        ("error_message", pa.string()), ("caption", pa.string())]
                       + [(c, pa.string()) for c in r.extra_cols] + [("width", pa.int32()), ("height", pa.int32())])
    write_table(stage.dir / f"{t:05d}.parquet", pa.Table.from_pylist(index, schema=schema))
    write_json(stage.dir / f"{t:05d}_stats.json", stats)
    return counts


def run(cfg: BuildConfig, ex: Executor) -> bool:
    r = cfg.release
    files = check_input(cfg)
    if r.samples_per_shard < 1:
        raise StageError("release.samples_per_shard must be >= 1")
    rows = Rows(files, [r.url_col, r.caption_col, *r.extra_cols], r.max_rows)
    if i2d.use_img2dataset(cfg.download):
        from realsyn_pl.construct.release.via_img2dataset import run_release

        return run_release(cfg, ex, files, rows.sizes)
    config = {"files": [str(f) for f in files], **{k: v for k, v in vars(r).items() if k not in ("paths",)}}
    stage = Stage(cfg.work_dir, NAME, config)
    if r.output_dir is not None:
        stage.dir = Path(r.output_dir)
    n_tars = -(-rows.total // r.samples_per_shard)

    def finish(st: Stage) -> dict[str, Any]:
        sizes = {f"{t:05d}.tar": st.shard_counts(t).n_out for t in range(n_tars)}
        write_json(st.dir / "sizes.json", sizes)
        total = sum(sizes.values())
        return {"samples": total, "rows": rows.total, "success_rate": round(total / max(1, rows.total), 4),
                "urls": f"{st.dir}/{{00000..{max(n_tars - 1, 0):05d}}}.tar"}

    return run_sharded(ex, stage, range(n_tars), lambda t: release_tar(cfg, stage, rows, t), cfg.force, extra=finish)
