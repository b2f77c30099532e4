"""Running img2dataset (the `download` extra) for both image-fetching paths, and reading its per-URL outcomes.

`download` (extract/download.py) and `release` (release/official.py) call `run` with img2dataset's own keyword
arguments; this module adds what both need around it: a one-line error when the extra or a distributor's package is
missing, no network call at import (albumentations' update check), and `reason`, which turns img2dataset's
(status, error_message) into the drop-reason strings the builtin fetcher uses (http_404, timeout, opted_out, ...).
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

from realsyn_pl.construct.engine.config import DownloadConfig
from realsyn_pl.construct.engine.stage import StageError

FETCHERS = ("auto", "img2dataset", "builtin")
DISTRIBUTORS = {"multiprocessing": None, "pyspark": "pyspark"}
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
OPTED_OUT = "Use of image disallowed by X-Robots-Tag directive"


def available() -> bool:
    return importlib.util.find_spec("img2dataset") is not None


def use_img2dataset(d: DownloadConfig) -> bool:
    """Which fetcher this config selects; a bad value or a missing extra is a one-line error."""
    if d.fetcher not in FETCHERS:
        raise StageError(f"download.fetcher must be one of {', '.join(FETCHERS)}, got {d.fetcher!r}")
    if d.fetcher == "builtin":
        return False
    if d.fetcher == "img2dataset" and not available():
        raise StageError('download.fetcher=img2dataset but img2dataset is not installed: pip install -e ".[download]"')
    return available()


def check(d: DownloadConfig) -> None:
    if d.distributor == "ray":  # img2dataset's own Ray distributor, inside a task of the build's: nested for nothing
        raise StageError("download.distributor=ray is not needed: the build runs on Ray itself, one download task per "
                         "shard across the cluster (RAY_ADDRESS or data_build/launch/ray_slurm.sbatch); use "
                         "download.distributor=multiprocessing")
    if d.distributor not in DISTRIBUTORS:
        raise StageError(f"download.distributor must be one of {', '.join(DISTRIBUTORS)}, got {d.distributor!r}")
    module = DISTRIBUTORS[d.distributor]
    # a distributor whose package is missing would fail deep inside img2dataset: refuse in one line instead
    if module and importlib.util.find_spec(module) is None:
        raise StageError(f"download.distributor={d.distributor} needs the {module} package (pip install {module})")
    if d.resize_mode not in RESIZE_MODES:
        raise StageError(f"download.resize_mode must be one of {', '.join(RESIZE_MODES)}, got {d.resize_mode!r}")
    for key in ("processes", "threads", "image_size"):
        if getattr(d, key) < 1:
            raise StageError(f"download.{key} must be >= 1, got {getattr(d, key)}")
    # img2dataset hardcodes its repository in the User-Agent: a user who set their own URL must learn it is not sent
    if d.project_url != DownloadConfig.project_url and use_img2dataset(d):
        print(f"[build] notice: img2dataset sends its own User-Agent (+{DownloadConfig.project_url}); "
              f"download.project_url={d.project_url} is used by the builtin fetcher only", flush=True)


def common_args(d: DownloadConfig) -> dict[str, Any]:
    """The img2dataset arguments every call shares: concurrency, distributor, timeouts, identification, opt-outs."""
    return {"processes_count": d.processes, "thread_count": d.threads, "distributor": d.distributor,
            "timeout": max(1, round(d.timeout_s)), "retries": d.retries, "user_agent_token": d.user_agent_token,
            # img2dataset reads [] as "check off" and None as its defaults; keep ours explicit either way
            "disallowed_header_directives": list(d.disallowed_header_directives), "enable_wandb": False}


def run(**kwargs: Any) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones PyPI at import otherwise
    from img2dataset import download

    download(**kwargs)


def reason(status: str | None, error: str | None) -> str:
    """img2dataset's outcome of one URL as a drop-reason suffix ("ok" for a success)."""
    if status == "success":
        return "ok"
    msg = (error or "").strip()
    low = msg.lower()
    if msg.startswith(OPTED_OUT[:40]):
        return "opted_out"
    m = re.match(r"http error (\d{3})", low)
    if m:
        return f"http_{m.group(1)}"
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if status == "failed_to_resize":
        if "decod" in low:
            return "decode_error"
        return re.sub(r"[^a-z0-9]+", "_", low).strip("_")[:40] or "resize_error"
    if "unknown url type" in low or "no host given" in low or "url can't contain control" in low:
        return "invalid_url"
    if "urlopen error" in low or "connection" in low or "remote end closed" in low:
        return "connection_error"
    return "download_error"
