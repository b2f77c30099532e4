"""Stage `image_filter`: decode every image and keep it if min(w, h) >= min_side and min_aspect <= w/h <= max_aspect.

Drops: decode_error (not an image / corrupt / truncated), decompression_bomb (w*h > max_pixels, checked from the
header before any pixel is decoded), too_small, bad_aspect, no_image_data. Output records add width, height, the
sha256 of the encoded bytes (used by exact dedup) and `src_row`: the record's row in `download/images-i.parquet`
(same shard index). The bytes stay there only (bytes null here, one copy on disk); readers get them through
engine/image_source.py. image_filter.keep_bytes=true stores an inline copy too. A record with only a local `path`
keeps it (src_row null).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from PIL import Image

from realsyn_pl.construct.engine.config import BuildConfig, ImageFilterConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.mapping import write_results
from realsyn_pl.construct.engine.records import read_batches
from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES
from realsyn_pl.construct.engine.stage import Counts, Stage, input_indices

NAME, INPUT = "image_filter", "download"


def image_bytes(row: dict[str, Any]) -> Optional[bytes]:
    if row.get("bytes"):
        return row["bytes"]
    if row.get("path") and Path(row["path"]).is_file():
        return Path(row["path"]).read_bytes()
    return None


def size_reason(width: int, height: int, cfg: ImageFilterConfig) -> Optional[str]:
    """The paper's quality rule on a decoded size; None = keep."""
    if min(width, height) < cfg.min_side:
        return "too_small"
    ratio = width / height
    if ratio < cfg.min_aspect or ratio > cfg.max_aspect:
        return "bad_aspect"
    return None


def inspect(data: bytes, cfg: ImageFilterConfig) -> Union[tuple[int, int], str]:
    """(width, height) of a fully decodable, acceptable image, else the drop reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > cfg.max_pixels:
                    return "decompression_bomb"
                im.load()  # decode every pixel: truncated / corrupt files fail here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "decompression_bomb"
    except Exception:  # PIL raises many types for bad input (OSError, SyntaxError, ValueError, ...)
        return "decode_error"
    if w <= 0 or h <= 0:
        return "decode_error"
    return size_reason(w, h, cfg) or (w, h)


def filter_row(row: dict[str, Any], cfg: ImageFilterConfig, src_row: Optional[int] = None
               ) -> Union[dict[str, Any], str]:
    """`src_row`: the row's number in its download shard, stored when the bytes live there (not for path rows)."""
    data = image_bytes(row)
    if data is None:
        return "no_image_data"
    res = inspect(data, cfg)
    if isinstance(res, str):
        return res
    return {**row, "bytes": data if cfg.keep_bytes else None, "width": res[0], "height": res[1],
            "sha256": hashlib.sha256(data).hexdigest(), "src_row": src_row if row.get("bytes") else None}


def filter_shard(in_path: Path, out_path: Path, cfg: ImageFilterConfig, batch_size: int = 256) -> Counts:
    def results() -> Iterator[Union[dict[str, Any], str]]:
        start = 0
        for batch in read_batches(in_path, batch_size=batch_size):
            for k, row in enumerate(batch.to_pylist()):
                yield filter_row(row, cfg, start + k)
            start += batch.num_rows

    return write_results(out_path, FILTERED_IMAGES, results())


def run(cfg: BuildConfig, ex: Executor) -> bool:
    in_dir = Path(cfg.work_dir) / INPUT
    indices = input_indices(in_dir, "images")
    f = cfg.image_filter
    stage = Stage(cfg.work_dir, NAME, {"min_side": f.min_side, "min_aspect": f.min_aspect,
                                       "max_aspect": f.max_aspect, "max_pixels": f.max_pixels,
                                       "keep_bytes": f.keep_bytes}, [INPUT])
    return run_sharded(ex, stage, indices, lambda i: filter_shard(in_dir / f"images-{i:05d}.parquet",
                                                                  stage.path("images", i), f), cfg.force)
