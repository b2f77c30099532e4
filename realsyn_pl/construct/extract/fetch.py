"""The builtin HTTP image fetcher, the fallback when img2dataset (the `download` extra) is not installed: threads,
timeouts, retries with backoff, a size cap, and a status for every URL. It keeps originals (no resize) and behaves as
img2dataset does towards publishers: the same neutral User-Agent (with download.project_url) and X-Robots-Tag
opt-outs honoured (status opted_out). Work is spread over Ray tasks by shard and over threads inside a task. Statuses: ok, http_<code>, timeout, connection_error, too_large, invalid_url, opted_out.
Retried: timeouts, connection errors, HTTP 429 and 5xx. Never retried: other 4xx, too_large, opted_out.
"""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from typing import Optional, Sequence
from urllib.parse import urlsplit

from realsyn_pl.construct.engine.config import DownloadConfig

RETRYABLE_HTTP = {429, 500, 502, 503, 504}


@dataclass
class FetchResult:
    url: str
    status: str
    data: Optional[bytes] = None
    attempts: int = 0
    seconds: float = 0.0


def _valid(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


BROWSER_UA = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def user_agent(cfg: DownloadConfig) -> str:
    """img2dataset's User-Agent, naming the project URL the user configured instead of img2dataset's."""
    if not cfg.user_agent_token:
        return BROWSER_UA
    return f"{BROWSER_UA} (compatible; {cfg.user_agent_token}; +{cfg.project_url})"


def opted_out(headers: Message, cfg: DownloadConfig) -> bool:
    """True when an X-Robots-Tag line (for every crawler, or for ours by token) carries a disallowed directive:
    img2dataset's rule (`X-Robots-Tag: noai` or `X-Robots-Tag: img2dataset: noimageai, noindex`)."""
    banned = {x.strip().lower() for x in cfg.disallowed_header_directives}
    token = (cfg.user_agent_token or "").strip().lower()
    for value in headers.get_all("X-Robots-Tag") or []:
        parts = value.split(":", 1)
        agent = parts[0].strip().lower() if len(parts) == 2 else None
        directives = {x.strip().lower() for x in parts[-1].split(",")}
        if (agent is None or agent == token) and directives & banned:
            return True
    return False


def _get_once(url: str, cfg: DownloadConfig) -> tuple[str, Optional[bytes]]:
    req = urllib.request.Request(url, headers={"User-Agent": user_agent(cfg)})
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
            if opted_out(resp.headers, cfg):
                return "opted_out", None
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                return "too_large", None
            data = resp.read(cfg.max_bytes + 1)
            if len(data) > cfg.max_bytes:
                return "too_large", None
            return "ok", data
    except urllib.error.HTTPError as err:
        return f"http_{err.code}", None
    except (socket.timeout, TimeoutError):
        return "timeout", None
    except urllib.error.URLError as err:
        return ("timeout" if isinstance(err.reason, (socket.timeout, TimeoutError)) else "connection_error"), None
    except (OSError, ValueError):  # reset mid-body, bad chunking, ...
        return "connection_error", None


def _retryable(status: str) -> bool:
    if status in ("timeout", "connection_error"):
        return True
    return status.startswith("http_") and int(status[5:]) in RETRYABLE_HTTP


def fetch(url: str, cfg: DownloadConfig) -> FetchResult:
    t0 = time.time()
    if not _valid(url):
        return FetchResult(url, "invalid_url", None, 0, 0.0)
    status, data, attempt = "connection_error", None, 0
    for attempt in range(1, cfg.retries + 2):
        status, data = _get_once(url, cfg)
        if status == "ok" or not _retryable(status) or attempt == cfg.retries + 1:
            break
        time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
    return FetchResult(url, status, data, attempt, round(time.time() - t0, 3))


def fetch_all(urls: Sequence[str], cfg: DownloadConfig) -> list[FetchResult]:
    """Results in the order of `urls` (whatever order the threads finish in)."""
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.threads, len(urls)))) as pool:
        return list(pool.map(lambda u: fetch(u, cfg), urls))
