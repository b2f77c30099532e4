"""Images/s of the `download` stage: the builtin threaded fetcher vs img2dataset, same processes x threads, one run.

python benchmarks/download_throughput.py [--n 3000] [--shards 4] [--configs 1x32,2x16]
A local HTTP server on 127.0.0.1 (its own process) serves n image URLs: 80 % good (half 320x240 PNGs, half 800x600
JPEGs that img2dataset resizes to shorter side 224), 8 % 404, 5 % corrupt bytes, 5 % slow (answer after 1.5 s, under
the 5 s timeout: they cost time, not images), 2 % opted out (`X-Robots-Tag: noai`). `build extract` runs once on
generated OBELICS files; each row copies it and runs `build download`. P x T: img2dataset with download.processes=P,
download.threads=T; the builtin fetcher as P Ray workers (ray.num_cpus=P) of T threads. Seconds:
the stage's wall time on Ray (manifest this_run_seconds), so Ray's and the interpreter's start are left out. URLs/s = URLs
handled per second, kept images/s = images the stage kept per second. Prints one table and appends it to
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import append_result, scratch_dir  # noqa: E402

KINDS = ["good"] * 40 + ["big"] * 40 + ["404"] * 8 + ["corrupt"] * 5 + ["slow"] * 5 + ["optout"] * 2  # per 100


def _serve(port_q: "mp.Queue[int]") -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    def enc(w: int, h: int, fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (90, 140, 200)).save(buf, format=fmt)
        return buf.getvalue()

    good, big = enc(320, 240, "PNG"), enc(800, 600, "JPEG")

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a):
            pass

        def do_GET(self):
            kind, headers = self.path.split("/")[1], {}
            code, body = 200, good
            if kind == "big":
                body = big
            elif kind == "404":
                code, body = 404, b"not found"
            elif kind == "corrupt":
                body = b"\x89PNG\r\n\x1a\n not an image"
            elif kind == "slow":
                time.sleep(1.5)
            elif kind == "optout":
                headers["X-Robots-Tag"] = "noai"
            try:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    httpd.daemon_threads = True
    httpd.request_queue_size = 1024
    port_q.put(httpd.server_address[1])
    httpd.serve_forever()


def corpus(folder: Path, base: str, n: int, shards: int) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    urls = [f"{base}/{KINDS[(i * 37) % 100]}/{i}.img" for i in range(n)]
    paths = []
    for s in range(shards):
        part = urls[s::shards]
        t = pa.table({"texts": [[None, "A photo of a thing."] for _ in part], "images": [[u, None] for u in part],
                      "metadata": ["[]"] * len(part)})
        paths.append(folder / f"obelics-{s:03d}.parquet")
        pq.write_table(t, paths[-1])
    return paths


def build(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "realsyn_pl", "build", *args], env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"build {args[0]} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def one(work: Path, common: list[str], fetcher: str, procs: int, threads: int) -> dict:
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(work.parent / "extract_only" / "extract", work / "extract")
    over = common + [f"work_dir={work}", f"download.fetcher={fetcher}", f"download.threads={threads}"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    if fetcher == "img2dataset":  # one Ray task per shard, each asking for P CPUs (img2dataset's processes)
        build(["download", *over, f"download.processes={procs}", f"ray.num_cpus={max(procs, os.cpu_count() or 1)}"],
              env)
    else:  # P Ray workers side by side, each fetching one shard with T threads
        build(["download", *over, f"ray.num_cpus={procs}"], env)
    m = json.loads((work / "download" / "manifest.json").read_text())
    secs = m["timings"]["this_run_seconds"]  # the stage's wall time on Ray, without Ray's start
    c = m["counts"]
    return {"fetcher": fetcher, "pxt": f"{procs}x{threads}", "urls": c["n_in"], "kept": c["n_out"],
            "dropped": c["dropped"], "seconds": round(secs, 1), "ips": round(c["n_in"] / secs, 1),
            "kps": round(c["n_out"] / secs, 1)}


def render(rows: list[dict]) -> str:
    # URLs/s alone flatters the builtin fetcher, which keeps the corrupt files img2dataset drops: kept/s compares them
    lines = ["| fetcher | processes x threads | URLs | kept | dropped by reason | stage s | URLs/s | kept images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(r["dropped"].items()))
        lines.append(f"| {r['fetcher']} | {r['pxt']} | {r['urls']:,} | {r['kept']:,} | {drops} | {r['seconds']} | "
                     f"{r['ips']} | {r['kps']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--configs", default="1x32,2x16")
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args()
    load_before = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    server = ctx.Process(target=_serve, args=(q,), daemon=True)
    server.start()
    try:
        base = f"http://127.0.0.1:{q.get(timeout=60)}"
        root = scratch_dir("bench_download_")
        paths = corpus(root / "docs", base, a.n, a.shards)
        common = ["progress=false", "input.format=obelics", "input.paths=[" + ",".join(map(str, paths)) + "]",
                  "download.timeout_s=5", "download.retries=0"]
        build(["extract", *common, f"work_dir={root / 'extract_only'}"], dict(os.environ))
        rows = []
        for cfg in a.configs.split(","):
            p, t = (int(x) for x in cfg.split("x"))
            for fetcher in ("builtin", "img2dataset"):
                rows.append(one(root / f"{fetcher}_{cfg}", common, fetcher, p, t))
                print(rows[-1], flush=True)
    finally:
        server.terminate()
    load_after = os.getloadavg()[0]
    table = render(rows)
    print(table)
    notes = (f"Notes (this run): `python {shlex.join(sys.argv)}`; {a.n} URLs in {a.shards} extract shards, server "
             f"and client on the same {os.cpu_count()} cores (the server's own process competes for them), timeout "
             f"5 s, no retries. 1-min load average {load_before:.2f} before, {load_after:.2f} after"
             f"{' (machine loaded by other jobs)' if max(load_before, load_after) > 1.5 else ''}. The builtin fetcher "
             "keeps originals and, as it does not decode, the corrupt files too (kept/s counts them); img2dataset "
             "drops those (fetch_decode_error) and resizes the 800x600 JPEGs to 299x224 (its time includes decode + "
             "resize + sha256 of every image), and the opted-out share is dropped by both.")
    if not a.no_append:
        append_result("download_throughput", table, notes)


if __name__ == "__main__":
    main()
