"""Running img2dataset (the `download` extra) for both image-fetching paths, and reading its per-URL outcomes.

`download` (extract/download.py) and `release` (release/official.py) call `run` with img2dataset's own keyword
arguments; this module adds what both need around it: a one-line error when the extra or a distributor's package is
missing, no network call at import (albumentations' update check), and `reason`, which turns img2dataset's
(status, error_message) into the drop-reason strings the builtin fetcher uses (http_404, timeout, opted_out, ...).

img2dataset 1.47 fetches each URL with `urlopen(...).read()`: its timeout bounds each socket read only (a server
sending a byte a second holds a thread for ever), nothing caps the body (an endless one fills memory), it follows
file:// URLs, and it checks X-Robots-Tag on the last response of a redirect chain only. It has no option for any of
this, so `run` makes its downloader fetch through extract/fetch.py instead: img2dataset's Downloader is wrapped
(`Bounded`, pickled into its worker processes like the Downloader itself), and in the process that downloads a
shard the wrapper puts `fetch` in place of img2dataset's `download_image_with_retry` for the length of that shard.
Everything else (readers, resize, writers, distributors, shard retries) stays img2dataset's. Errors come back as
its error_message: img2dataset's own opt-out sentence, else "fetch failed: <status>".
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import io
import os
import re
from dataclasses import replace
from typing import Any, Callable, Optional

from realsyn_pl.construct.engine.config import DownloadConfig
from realsyn_pl.construct.engine.stage import StageError
from realsyn_pl.construct.extract.fetch import fetch

FETCHERS = ("auto", "img2dataset", "builtin")
DISTRIBUTORS = {"multiprocessing": None, "pyspark": "pyspark"}
RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
OPTED_OUT = "Use of image disallowed by X-Robots-Tag directive"
FETCH_FAILED = "fetch failed: "  # + the status of extract/fetch.py, img2dataset's error_message for a failed URL
# the img2dataset function `Bounded` replaces, and the arguments img2dataset 1.47 calls it with
REPLACED = "download_image_with_retry"
REPLACED_ARGS = ["row", "timeout", "retries", "user_agent_token", "disallowed_header_directives"]


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
    for key in ("processes", "threads", "image_size", "max_bytes"):
        if getattr(d, key) < 1:
            raise StageError(f"download.{key} must be >= 1, got {getattr(d, key)}")
    if not d.deadline_s > 0:
        raise StageError(f"download.deadline_s must be > 0, got {d.deadline_s}")


def common_args(d: DownloadConfig) -> dict[str, Any]:
    """The img2dataset arguments every call shares: concurrency, distributor, timeouts, identification, opt-outs."""
    return {"processes_count": d.processes, "thread_count": d.threads, "distributor": d.distributor,
            "timeout": max(1, round(d.timeout_s)), "retries": d.retries, "user_agent_token": d.user_agent_token,
            # img2dataset reads [] as "check off" and None as its defaults; keep ours explicit either way
            "disallowed_header_directives": list(d.disallowed_header_directives), "enable_wandb": False}


def bounded_fetch(d: DownloadConfig) -> Callable[..., tuple[Any, Optional[io.BytesIO], Optional[str]]]:
    """img2dataset's download_image_with_retry done by extract/fetch.py with `d`: deadline, size cap, http(s) and
    image_root only, opt-outs on every redirect hop. Retries are the ones img2dataset passes (release has its own);
    the rest is d's (timeout_s unrounded; the token and directives common_args gave img2dataset too)."""
    def download_image_with_retry(row: tuple[Any, str], timeout: float, retries: int, user_agent_token: Any = None,
                                  disallowed_header_directives: Any = None
                                  ) -> tuple[Any, Optional[io.BytesIO], Optional[str]]:
        key, url = row
        res = fetch(url, replace(d, retries=retries))
        if res.status == "ok":
            return key, io.BytesIO(res.data or b""), None
        return key, None, OPTED_OUT if res.status == "opted_out" else f"{FETCH_FAILED}{res.status}"
    return download_image_with_retry


class Bounded:
    """img2dataset's Downloader, fetching through `bounded_fetch` in whichever process it runs a shard in."""

    def __init__(self, downloader: Any, d: DownloadConfig):
        self.downloader, self.d = downloader, d

    def __call__(self, row: Any) -> Any:
        module = importlib.import_module("img2dataset.downloader")
        real = getattr(module, REPLACED)
        setattr(module, REPLACED, bounded_fetch(self.d))
        try:
            return self.downloader(row)
        finally:
            setattr(module, REPLACED, real)


def _hooks() -> Any:
    """img2dataset's main module, once it is known to have what `Bounded` replaces; else a one-line error (an
    img2dataset without them would fetch unbounded)."""
    # import_module: the package's attribute `main` is the CLI function, not the module
    main, downloader = (importlib.import_module(f"img2dataset.{m}") for m in ("main", "downloader"))
    fn = getattr(downloader, REPLACED, None)
    if not hasattr(main, "Downloader") or fn is None or list(inspect.signature(fn).parameters) != REPLACED_ARGS:
        raise StageError("this img2dataset has no downloader the build can bound (deadline, size cap, local files): "
                         'install the pinned one (pip install -e ".[download]") or use download.fetcher=builtin')
    return main


def run(d: DownloadConfig, **kwargs: Any) -> None:
    """img2dataset's download(**kwargs), every URL fetched by extract/fetch.py with `d`."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones PyPI at import otherwise
    main = _hooks()
    real = main.Downloader
    main.Downloader = lambda **kw: Bounded(real(**kw), d)
    try:
        main.download(**kwargs)
    finally:
        main.Downloader = real


def reason(status: str | None, error: str | None) -> str:
    """img2dataset's outcome of one URL as a drop-reason suffix ("ok" for a success)."""
    if status == "success":
        return "ok"
    msg = (error or "").strip()
    low = msg.lower()
    if msg.startswith(OPTED_OUT[:40]):
        return "opted_out"
    if msg.startswith(FETCH_FAILED):
        return msg[len(FETCH_FAILED):]
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
