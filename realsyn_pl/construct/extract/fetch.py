"""The per-URL image fetch of both fetchers: the builtin one (threads, no resize; the fallback when img2dataset, the
`download` extra, is not installed) and img2dataset's, whose own urllib call extract/img2dataset_run.py replaces with
`fetch`. Threads, timeouts, retries with backoff, a size cap, a deadline, and a status for every URL. It keeps
originals (no resize) and behaves as img2dataset does towards publishers: the same neutral User-Agent (with
download.project_url) and X-Robots-Tag opt-outs honoured (status opted_out), on every response of a redirect chain.
Work is spread over Ray tasks by shard and over threads inside a task.

Hostile corpora and servers are bounded: only http(s) is fetched (a redirect elsewhere is refused); a file:// URL is
read only under download.image_root (`local_path`, which the download stage also applies to plain paths), else
status local_path_refused; a body is read at most download.max_bytes + 1 bytes (too_large); and one URL, all
attempts and redirects together, ends at download.deadline_s (timeout) even against a server that sends a byte a
second, which a per-read timeout (timeout_s) never ends.

Statuses: ok, http_<code>, timeout, connection_error, too_large, invalid_url, opted_out, local_path_refused,
not_a_file. Retried: timeouts, connection errors, HTTP 429 and 5xx. Never retried: other 4xx, too_large, opted_out,
and nothing after the deadline.
"""
from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlsplit

from realsyn_pl.construct.engine.config import DownloadConfig

RETRYABLE_HTTP = {429, 500, 502, 503, 504}
LOCAL_REFUSED = "local_path_refused"
CHUNK = 1 << 16  # bytes per body read: each read returns what one recv gives, so the cap and deadline are checked often


@dataclass
class FetchResult:
    url: str
    status: str
    data: Optional[bytes] = None
    attempts: int = 0
    seconds: float = 0.0


def local_path(path: Optional[str], root: Optional[str]) -> Optional[Path]:
    """`path` with symlinks and `..` resolved, when it lies under `root` (resolved alike); None otherwise, and always
    when no root is configured: a corpus may name local files only inside the folder the user opened to it."""
    if not path or not root:
        return None
    try:
        real, base = Path(path).resolve(), Path(root).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return None
    return real if real.is_relative_to(base) else None


def is_file(path: Path | str) -> bool:
    """A regular file (not a FIFO or device a read could block on or never finish)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _file_url_path(url: str) -> Optional[str]:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):  # file://host/...: another machine's share, never ours to read
        return None
    return urllib.request.url2pathname(parts.path)


def refusal(url: str, cfg: DownloadConfig) -> Optional[str]:
    """Why `url` is not fetched at all (invalid_url, local_path_refused), or None: http(s) with a host, or a file://
    URL under download.image_root. Both fetchers ask this before any I/O."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "invalid_url"
    if parts.scheme in ("http", "https"):
        return None if parts.netloc else "invalid_url"
    if parts.scheme == "file":
        return None if local_path(_file_url_path(url), cfg.image_root) else LOCAL_REFUSED
    return "invalid_url"


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


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed or never connected
        pass


class _Deadline:
    """Ends one URL's fetch at its deadline whatever it waits on (connect, a status line or body sent a byte at a
    time): a timer shuts its sockets down, which wakes a blocked read at once (TLS included). It holds a dup of each
    socket, closed under the same lock, so it never shuts down a descriptor the process has since reused."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock: socket.socket) -> socket.socket:
        dup = sock.dup()
        with self._lock:
            self._socks.append(dup)
            if self.expired:
                _shutdown(dup)
        return sock

    def connection(self, cls: type) -> Callable[..., http.client.HTTPConnection]:
        """An http.client connection class whose sockets this deadline watches (urllib's do_open calls it)."""
        def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            conn = cls(host, **kwargs)
            create = conn._create_connection
            conn._create_connection = lambda *a, **k: self.watch(create(*a, **k))
            return conn
        return make

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                _shutdown(s)

    def release(self) -> None:
        """After an attempt (which closed its own sockets): close the dups, so the connections really end."""
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()

    def cancel(self) -> None:
        self._timer.cancel()
        self.release()


class _OptedOut(Exception):
    pass


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Every hop is checked: an opt-out sent on a redirect response is the publisher's word on the image it leads to,
    and a redirect may lead to http(s) only (urllib alone would follow ftp://). The redirect's own body is not read:
    an endless one would otherwise be read into memory."""

    def __init__(self, cfg: DownloadConfig):
        super().__init__()
        self.cfg = cfg

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Message,
                         newurl: str) -> Optional[urllib.request.Request]:
        if opted_out(headers, self.cfg):
            fp.close()
            raise _OptedOut()
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"{msg} - Redirection to url '{newurl}' is not allowed",
                                         headers, fp)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        fp.close()  # urllib then reads b"" from it instead of the whole body
        return new


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self.deadline.connection(http.client.HTTPConnection), req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self.deadline.connection(http.client.HTTPSConnection), req, context=self._context)


def _opener(cfg: DownloadConfig, deadline: _Deadline) -> urllib.request.OpenerDirector:
    """http(s) only: no file, ftp or data handler, so nothing but the checked URL and its redirects is opened."""
    opener = urllib.request.OpenerDirector()
    for h in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _HTTP(deadline), _HTTPS(deadline),
              urllib.request.HTTPDefaultErrorHandler(), _Redirects(cfg), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(h)
    return opener


def _read_body(resp: http.client.HTTPResponse, cap: int) -> tuple[str, Optional[bytes]]:
    chunks, size = [], 0
    while True:
        chunk = resp.read1(CHUNK)  # one recv at most: a drip cannot hold a read for longer than the deadline
        if not chunk:
            break
        size += len(chunk)
        if size > cap:
            return "too_large", None
        chunks.append(chunk)
    if resp.length:  # the connection ended before Content-Length: a cut body, not an image
        return "connection_error", None
    return "ok", b"".join(chunks)


def _get_once(url: str, cfg: DownloadConfig, deadline: _Deadline) -> tuple[str, Optional[bytes]]:
    req = urllib.request.Request(url, headers={"User-Agent": user_agent(cfg)})
    try:
        with _opener(cfg, deadline).open(req, timeout=cfg.timeout_s) as resp:
            if opted_out(resp.headers, cfg):
                return "opted_out", None
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                return "too_large", None
            return _read_body(resp, cfg.max_bytes)
    except _OptedOut:
        return "opted_out", None
    except urllib.error.HTTPError as err:
        err.close()  # its body is never read
        return f"http_{err.code}", None
    except (socket.timeout, TimeoutError):
        return "timeout", None
    except urllib.error.URLError as err:
        return ("timeout" if isinstance(err.reason, (socket.timeout, TimeoutError)) else "connection_error"), None
    except (OSError, ValueError, http.client.HTTPException):  # reset mid-body, bad chunking, a bad status line, ...
        return "connection_error", None
    finally:
        deadline.release()


def _read_local(url: str, cfg: DownloadConfig) -> tuple[str, Optional[bytes]]:
    """A file:// URL that `refusal` let through (under download.image_root): a regular file, size-capped."""
    path = local_path(_file_url_path(url), cfg.image_root)
    if path is None:
        return LOCAL_REFUSED, None
    if not is_file(path):
        return "not_a_file", None
    try:
        with open(path, "rb") as fh:
            data = fh.read(cfg.max_bytes + 1)
    except OSError:
        return "not_a_file", None
    return ("too_large", None) if len(data) > cfg.max_bytes else ("ok", data)


def _retryable(status: str) -> bool:
    if status in ("timeout", "connection_error"):
        return True
    return status.startswith("http_") and int(status[5:]) in RETRYABLE_HTTP


def fetch(url: str, cfg: DownloadConfig) -> FetchResult:
    t0 = time.time()
    why = refusal(url, cfg)
    if why is not None:
        return FetchResult(url, why, None, 0, 0.0)
    if urlsplit(url).scheme == "file":
        status, data = _read_local(url, cfg)
        return FetchResult(url, status, data, 1, round(time.time() - t0, 3))
    status, data, attempt = "connection_error", None, 0
    deadline = _Deadline(cfg.deadline_s)
    try:
        for attempt in range(1, cfg.retries + 2):
            status, data = _get_once(url, cfg, deadline)
            if deadline.expired:  # whatever the read saw once its socket was shut down
                status, data = "timeout", None
                break
            if status == "ok" or not _retryable(status) or attempt == cfg.retries + 1:
                break
            wait = cfg.backoff_s * 2 ** (attempt - 1)
            if wait >= deadline.left():  # no time for another attempt: the last outcome stands
                break
            time.sleep(wait)
    finally:
        deadline.cancel()
    return FetchResult(url, status, data, attempt, round(time.time() - t0, 3))


def fetch_all(urls: Sequence[str], cfg: DownloadConfig) -> list[FetchResult]:
    """Results in the order of `urls` (whatever order the threads finish in)."""
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(cfg.threads, len(urls)))) as pool:
        return list(pool.map(lambda u: fetch(u, cfg), urls))
