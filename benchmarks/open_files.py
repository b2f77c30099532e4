"""The stages that read every shard (dedup_images, cluster, retrieve, balance) over more embedding shards than the
process may open files: 2,000 shards under soft = hard = 1,024 open files, so raising the soft limit cannot help,
every unit in one process (ray.in_process=true: the worst case, the driver maps everything). Without the bound on
open memory maps the build stops with EMFILE ("Too many open files"). The suite runs the same build scaled down
(tests/construct/test_open_files.py: 300 shards under 256 files); this is the full-size run.

python benchmarks/open_files.py [--shards 2000] [--open-files 1024]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "construct")]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _common import append_result, scratch_dir  # noqa: E402

import test_open_files as build  # noqa: E402  the pool writer and the build driver of the test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--open-files", type=int, default=1024)
    a = p.parse_args()
    work = scratch_dir("open_files_")
    t0 = time.time()
    build.many_shard_pool(work, a.shards, a.rows, build.DIM)
    made = time.time() - t0

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (a.open_files, a.open_files))

    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", build.BUILD, ",".join(build.STAGES), *build.overrides(work)],
                          cwd=ROOT, env=build._env(joined=False), capture_output=True, text=True, preexec_fn=limit)
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    emfile = "Too many open files" in log
    result = "ok" if proc.returncode == 0 and not emfile else ("EMFILE" if emfile else f"exit {proc.returncode}")
    table = "\n".join(["| shards | rows each | open files (soft = hard) | stages | result | build s | pool written s |",
                       "|---|---|---|---|---|---|---|",
                       f"| {a.shards:,} | {a.rows} | {a.open_files:,} | {', '.join(build.STAGES)} | {result} | "
                       f"{wall:.0f} | {made:.0f} |"])
    print(table)
    if result != "ok":
        print(log[-3000:], file=sys.stderr)
    append_result("A build over more shards than open files allowed (in one process)", table,
                  "Each stage runs in the same process one after another (what one stage leaves open counts against "
                  "the next). Memory maps go through an LRU of 64 per shard set; range reads open one file at a "
                  "time. Argv: " + " ".join(sys.argv[1:]))
    sys.exit(0 if result == "ok" else 1)


if __name__ == "__main__":
    main()
