"""Image fetching against hostile corpora and servers, for both fetchers (builtin and img2dataset's route):
local files are read only under the configured image root (a corpus naming /some/secret publishes nothing), a server
dripping a byte a second or sending an endless body is cut at download.deadline_s / download.max_bytes, and an
X-Robots-Tag opt-out sent on a redirect counts like one on the image."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from realsyn_pl.cli import main
from realsyn_pl.construct.engine.config import DownloadConfig
from realsyn_pl.construct.engine.records import iter_rows, write_records
from realsyn_pl.construct.engine.schemas import IMAGES
from realsyn_pl.construct.engine.stage import Counts, Stage
from realsyn_pl.construct.extract import img2dataset_run as i2d
from realsyn_pl.construct.extract.fetch import fetch, fetch_all, local_path
from support import IN_PROCESS, build_overrides, png, write_stage

MARKER = b"SECRET-KEY-0123456789"
SECRET = png(150, 120) + MARKER  # a decodable image (it would pass image_filter), with a marker to look for
IMAGE = png(150, 120, (10, 200, 10))
DEADLINE = 2.0
CAP = 200_000


class _Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.split("?")[0].strip("/")
        t0, sent = time.monotonic(), 0
        try:
            if name == "good":
                self._head(200, {"Content-Length": str(len(IMAGE))})
                self.wfile.write(IMAGE)
            elif name == "drip":  # headers at once, then one byte a second of a body that would take an hour
                self._head(200, {"Content-Length": "3600"})
                while sent < 3600:
                    self.wfile.write(IMAGE[sent % len(IMAGE):][:1])
                    self.wfile.flush()
                    sent += 1
                    time.sleep(1.0)
            elif name == "drip_status":  # even the status line a byte a second
                for b in b"HTTP/1.1 200 OK\r\n" * 200:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    sent += 1
                    time.sleep(1.0)
            elif name == "endless":  # no length: a body that never ends
                self._head(200, {"Connection": "close"})
                chunk = b"\0" * 65536
                while True:
                    self.wfile.write(chunk)
                    sent += len(chunk)
            elif name == "redirect_optout":  # the opt-out is on the redirect, not on the image it leads to
                self._head(302, {"Location": "/good", "X-Robots-Tag": "noai", "Content-Length": "0"})
            elif name == "redirect_file":
                self._head(302, {"Location": "file:///etc/passwd", "Content-Length": "0"})
            elif name == "redirect_ftp":
                self._head(302, {"Location": "ftp://127.0.0.1/x.png", "Content-Length": "0"})
            else:
                self._head(404, {"Content-Length": "0"})
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: when, and after how many bytes
            self.server.ended[name] = (time.monotonic() - t0, sent)

    def _head(self, code, headers):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()


@pytest.fixture
def hostile():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    httpd.daemon_threads = True
    httpd.ended = {}
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd, lambda name: f"{base}/{name}"
    httpd.shutdown()
    httpd.server_close()


def _wait_ended(httpd, names, seconds=5.0):
    """The server notices a closed connection at its next write (within a second for the drip)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not all(n in httpd.ended for n in names):
        time.sleep(0.05)
    return httpd.ended


# ---------------------------------------------------------------- builtin fetcher, per URL


def test_drip_and_endless_bodies_end_at_the_deadline_and_the_cap(hostile):
    httpd, url = hostile
    cfg = DownloadConfig(timeout_s=3, retries=2, backoff_s=0.01, deadline_s=DEADLINE, max_bytes=CAP)
    t0 = time.monotonic()
    res = fetch_all([url("drip"), url("drip_status"), url("endless"), url("good")], cfg)
    took = time.monotonic() - t0
    assert [r.status for r in res] == ["timeout", "timeout", "too_large", "ok"]
    assert res[3].data == IMAGE and all(r.data is None for r in res[:3])
    # each ends at its deadline, not after timeout_s x attempts per byte; no retry once the deadline is spent
    assert res[0].seconds < DEADLINE + 1.5 and res[1].seconds < DEADLINE + 1.5 and took < DEADLINE + 2.5
    assert res[0].attempts == 1 and res[2].attempts == 1
    ended = _wait_ended(httpd, ["drip", "drip_status", "endless"])
    assert ended["drip"][0] < DEADLINE + 3 and ended["drip"][1] <= DEADLINE + 3  # bytes it got to send
    assert ended["endless"][1] < CAP + 32 * 2**20  # the cap plus what socket buffers held, not an endless read


def test_an_opt_out_on_a_redirect_hop_is_honoured(hostile):
    _, url = hostile
    cfg = DownloadConfig(timeout_s=3, retries=0, deadline_s=5)
    opted = fetch(url("redirect_optout"), cfg)
    assert (opted.status, opted.data) == ("opted_out", None)
    kept = fetch(url("redirect_optout"), DownloadConfig(timeout_s=3, retries=0, disallowed_header_directives=[]))
    assert (kept.status, kept.data) == ("ok", IMAGE)  # the check off: the redirect is followed to the image
    # a redirect leaves http(s) never (urllib alone follows ftp://; file:// it refuses too)
    assert [fetch(url(n), cfg).status for n in ("redirect_file", "redirect_ftp")] == ["http_302", "http_302"]


def test_local_path_resolves_symlinks_and_dots_before_the_root_check(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (outside / "key.png").write_bytes(SECRET)
    (root / "ok.png").write_bytes(IMAGE)
    (root / "link.png").symlink_to(outside / "key.png")
    assert local_path(str(root / "ok.png"), str(root)) == (root / "ok.png").resolve()
    assert local_path(str(root / "ok.png"), None) is None  # no root configured: nothing local is read
    for bad in (outside / "key.png", root / "link.png", root / ".." / "secret" / "key.png", "/etc/passwd"):
        assert local_path(str(bad), str(root)) is None, bad
    cfg = DownloadConfig(image_root=str(root))
    got = [fetch(u, cfg) for u in (f"file://{root}/ok.png", f"file://{outside}/key.png", f"file://{root}/link.png",
                                   f"file://{root}/missing.png", f"file://otherhost{root}/ok.png")]
    assert [r.status for r in got] == ["ok", "local_path_refused", "local_path_refused", "not_a_file",
                                       "local_path_refused"]
    assert got[0].data == IMAGE and all(r.data is None for r in got[1:])


# ---------------------------------------------------------------- the download stage, both fetchers


def _extract_stage(work, images):
    """A completed `extract` stage whose image records are `images` ({path} / {url} dicts), one shard."""
    stage = Stage(work, "extract", {"test": "hostile"})

    def shard(i):
        rows = [{"id": f"doc-00000-{j:06d}/i-0", "doc_id": f"doc-00000-{j:06d}", "url": im.get("url"),
                 "path": im.get("path"), "bytes": None} for j, im in enumerate(images)]
        write_records(stage.path("images", i), rows, IMAGES)
        c = Counts()
        c.keep(len(rows))
        return c

    write_stage(stage, [0], shard)


def _local_images(tmp_path):
    """Image records as extract writes them from a corpus (relative paths joined to input.image_root), naming a
    secret outside the root by absolute path, by `..`, by a symlink inside the root and by file:// URL, and two
    images inside the root (a path and a file:// URL)."""
    root, outside = tmp_path / "images", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    secret = outside / "id_rsa.png"
    secret.write_bytes(SECRET)
    (root / "a.png").write_bytes(IMAGE)
    (root / "b.png").write_bytes(png(160, 120, (0, 0, 200)))
    (root / "link.png").symlink_to(secret)
    images = [{"path": str(secret)}, {"path": f"{root}/../private/id_rsa.png"}, {"path": str(root / "link.png")},
              {"url": secret.as_uri()}, {"path": str(root / "a.png")}, {"url": (root / "b.png").as_uri()}]
    return images, root


def _leaked(work):
    """Whether MARKER is in any file under `work`: raw bytes, and every value of every parquet file decoded (a
    compressed column need not show it raw)."""
    for p in work.rglob("*"):
        if p.is_file() and MARKER in p.read_bytes():
            return True
        if p.is_file() and p.suffix == ".parquet":
            for col in pq.read_table(p).columns:
                if any(MARKER in (v if isinstance(v, bytes) else v.encode())
                       for v in col.to_pylist() if isinstance(v, (bytes, str))):
                    return True
    return False


def _statuses(work):
    return {r["url"].rsplit("/", 1)[1]: (r["status"], r["error_message"])
            for r in iter_rows(work / "download" / "fetch-00000.parquet")}


def test_a_corpus_cannot_publish_local_files_outside_the_image_root(tmp_path):
    images, root = _local_images(tmp_path)
    work = tmp_path / "work"
    _extract_stage(work, images)
    ov = build_overrides(work, [], **{"input.image_root": str(root), "download.fetcher": "builtin", **IN_PROCESS})
    for st in ("download", "image_filter"):
        assert main(["build", st] + ov) == 0, st
    c = json.loads((work / "download" / "manifest.json").read_text())["counts"]
    # absolute, `..` and symlinked paths out of the root, and a file:// URL to the secret: dropped by name
    assert c["dropped"] == {"local_path_refused": 3, "fetch_local_path_refused": 1} and c["n_out"] == 2
    assert _statuses(work) == {"id_rsa.png": ("local_path_refused", None), "b.png": ("ok", None)}
    kept = list(iter_rows(work / "download" / "images-00000.parquet"))
    assert [(r["path"], r["bytes"]) for r in kept] == [(str((root / "a.png").resolve()), None),
                                                       (None, (root / "b.png").read_bytes())]
    assert not _leaked(work)  # in no output, fetch log or manifest
    f = json.loads((work / "image_filter" / "manifest.json").read_text())["counts"]
    assert (f["n_in"], f["n_out"]) == (2, 2)

    # the same records with the secret's folder opened as the image root: every one is read
    work2 = tmp_path / "work2"
    _extract_stage(work2, images)
    ov2 = build_overrides(work2, [], **{"input.image_root": str(root), "download.image_root": str(tmp_path),
                                        "download.fetcher": "builtin", **IN_PROCESS})
    assert main(["build", "download"] + ov2) == 0
    c2 = json.loads((work2 / "download" / "manifest.json").read_text())["counts"]
    assert (c2["n_out"], c2["dropped"]) == (6, {})
    assert _leaked(work2 / "download")  # the file:// URL's bytes, fetched


def test_img2dataset_route_bounds_hostile_urls_and_local_files(tmp_path, hostile):
    """One img2dataset run (its processes are slow to start): local files refused before it is handed the URLs,
    a file:// URL under the root read, and the drip, endless and redirect-opt-out servers bounded inside it."""
    pytest.importorskip("img2dataset")
    httpd, url = hostile
    images, root = _local_images(tmp_path)
    names = ["drip", "endless", "redirect_optout", "good"]
    work = tmp_path / "work"
    _extract_stage(work, images + [{"url": url(n)} for n in names])
    ov = build_overrides(work, [], **{"input.image_root": str(root), "download.fetcher": "img2dataset",
                                      "download.timeout_s": 3, "download.retries": 1, "download.threads": 8,
                                      "download.deadline_s": DEADLINE, "download.max_bytes": CAP,
                                      "download.processes": 1, **IN_PROCESS})
    t0 = time.monotonic()
    assert main(["build", "download"] + ov) == 0
    took = time.monotonic() - t0
    m = json.loads((work / "download" / "manifest.json").read_text())
    assert m["fetch_stats"]["fetcher"] == "img2dataset"
    assert m["counts"]["dropped"] == {"local_path_refused": 3, "fetch_local_path_refused": 1, "fetch_timeout": 1,
                                      "fetch_too_large": 1, "fetch_opted_out": 1}
    assert m["counts"]["n_out"] == 3  # a.png (path), b.png (file:// under the root, through img2dataset), good
    status = _statuses(work)
    assert status["id_rsa.png"][0] == "local_path_refused" and status["b.png"][0] == "ok"
    assert status["drip"] == ("timeout", "fetch failed: timeout")
    assert status["endless"] == ("too_large", "fetch failed: too_large")
    assert status["redirect_optout"] == ("opted_out", i2d.OPTED_OUT) and status["good"][0] == "ok"
    assert not _leaked(work)
    ended = _wait_ended(httpd, ["drip", "endless"])
    assert ended["drip"][0] < DEADLINE + 3 and ended["endless"][1] < CAP + 32 * 2**20
    assert took < 90  # img2dataset's process start included; unbounded, the drip alone would take an hour


def test_img2dataset_error_messages_map_back_to_statuses_and_bounds_are_checked():
    from realsyn_pl.construct.engine.stage import StageError

    assert i2d.reason("failed_to_download", "fetch failed: local_path_refused") == "local_path_refused"
    assert i2d.reason("failed_to_download", "fetch failed: http_404") == "http_404"
    assert i2d.reason("failed_to_download", i2d.OPTED_OUT) == "opted_out"
    for bad, msg in ((DownloadConfig(deadline_s=0), "download.deadline_s must be > 0, got 0"),
                     (DownloadConfig(max_bytes=0), "download.max_bytes must be >= 1, got 0")):
        with pytest.raises(StageError, match=msg):
            i2d.check(bad)
