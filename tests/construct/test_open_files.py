"""A build over more embedding shards than its process may open files: the stages that read every shard (dedup,
cluster, retrieve, balance) keep a bounded number of memory maps open, each of which holds a file descriptor. The
build runs in a process whose soft and hard limits on open files are equal, so raising the soft limit (what the
driver does first) cannot help, with ray.in_process=true: the driver runs every unit itself."""
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from generate_support import ROOT, _env
from planted import unit
from realsyn_pl.construct.engine.arrays import write_array_shard
from realsyn_pl.construct.engine.records import write_records
from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES, PPL_SENTENCES
from realsyn_pl.construct.engine.stage import Counts, Stage
from support import IN_PROCESS, write_stage

# More shards than the process may open files: without a bound on the maps open at once a stage fails with EMFILE.
# Scaled down from 2,000 shards under 1,024 files (same failure, same fix) to keep the suite short:
# benchmarks/open_files.py runs that size (about 5 minutes in one process).
SHARDS, ROWS, DIM = 300, 2, 32
OPEN_FILES = 256
# every stage that maps every shard of its input; dedup_sentences runs the same code as dedup_images
STAGES = ("dedup_images", "cluster", "retrieve", "balance")


def _kept(n: int) -> Counts:
    c = Counts()
    c.keep(n)
    return c


def many_shard_pool(work: Path, shards: int, rows: int, d: int, seed: int = 0) -> None:
    """`shards` shards of `rows` items each (random unit embeddings, distinct image digests and texts): done
    image_filter and embed_images stages (dedup_images' inputs) and a done dedup_sentences stage (cluster's)."""
    rng = np.random.default_rng(seed)
    img, sent = unit(rng.normal(size=(shards, rows, d))), unit(rng.normal(size=(shards, rows, d)))

    def doc(i: int, r: int) -> str:
        return f"doc-{i:05d}-{r:06d}"

    def images(st: Stage, i: int) -> Counts:
        recs = [{"id": f"{doc(i, r)}/img-0", "doc_id": doc(i, r), "url": f"http://x.invalid/{i}/{r}.jpg",
                 "width": 24, "height": 24, "sha256": hashlib.sha256(f"{i}/{r}".encode()).hexdigest()}
                for r in range(rows)]
        write_records(st.path("images", i), recs, FILTERED_IMAGES)
        return _kept(rows)

    def image_embeddings(st: Stage, i: int) -> Counts:
        write_array_shard(st.dir, "emb", i, [f"{doc(i, r)}/img-0" for r in range(rows)], img[i])
        return _kept(rows)

    def sentences(st: Stage, i: int) -> Counts:
        recs = [{"id": f"{doc(i, r)}/s-0", "doc_id": doc(i, r), "text": f"sentence {r} of shard {i}",
                 "entropy": 1.0, "ppl": 50.0} for r in range(rows)]
        write_records(st.path("sentences", i), recs, PPL_SENTENCES)
        # float32: the dtype in which a view of a map, not a converted copy, is what np.asarray gives
        write_array_shard(st.dir, "emb", i, [rec["id"] for rec in recs], sent[i], "float32")
        return _kept(rows)

    for name, work_fn in (("image_filter", images), ("embed_images", image_embeddings),
                          ("dedup_sentences", sentences)):
        st = Stage(work, name, {"synthetic": True, "shards": shards, "rows": rows})
        write_stage(st, range(shards), lambda i, st=st, fn=work_fn: fn(st, i))


def overrides(work: Path) -> list[str]:
    # dedup.accept_removal: a random pool has no near duplicates, far below the paper's removal
    items = {"work_dir": str(work), "progress": "false", **IN_PROCESS, "dedup.partitions": 0, "cluster.k": 8,
             "dedup.accept_removal": "true",
             "cluster.method": "two_level", "cluster.init": "kmeans++", "cluster.train_sample": 10_000, "balance.similarity_text": "text1", "balance.k": 4, "balance.init": "kmeans++",
             "balance.train_sample": 10_000, "balance.window.mode": "quantile", "balance.caps": "[2,4]"}
    return [f"{k}={v}" for k, v in items.items()]


def limit_open_files() -> None:
    """preexec_fn: soft and hard limit both OPEN_FILES, so the build cannot raise its own."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


# the CLI's own entry, once per stage in one process: whatever a stage leaves open counts against the next ones
BUILD = ("import sys\nfrom realsyn_pl.cli import main\nfor stage in sys.argv[1].split(','):\n"
         "    if main(['build', stage, *sys.argv[2:]]):\n        sys.exit(1)\n")


@pytest.mark.slow
def test_build_over_more_shards_than_open_files_allowed(tmp_path):
    many_shard_pool(tmp_path, SHARDS, ROWS, DIM)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", BUILD, ",".join(STAGES), *overrides(tmp_path)], cwd=ROOT,
                          env=_env(joined=False), capture_output=True, text=True, timeout=900, preexec_fn=limit_open_files)
    log = proc.stdout + proc.stderr
    print(f"build of {', '.join(STAGES)} over {SHARDS} shards: {time.time() - t0:.1f} s")
    assert "Too many open files" not in log, log[-3000:]
    assert proc.returncode == 0, log[-3000:]
    assert "soft limit raised" not in log  # soft == hard: nothing to raise
    for stage in STAGES:
        m = json.loads((tmp_path / stage / "manifest.json").read_text())
        assert m["done"] and m["counts"]["n_in"] > 0, stage
    dedup = json.loads((tmp_path / "dedup_images" / "manifest.json").read_text())
    assert dedup["counts"]["n_in"] == SHARDS * ROWS
    retrieved = json.loads((tmp_path / "retrieve" / "manifest.json").read_text())
    assert retrieved["counts"]["n_in"] == dedup["counts"]["n_out"]
    balance = json.loads((tmp_path / "balance" / "manifest.json").read_text())
    assert balance["counts"]["n_in"] == retrieved["counts"]["n_out"] and balance["counts"]["n_out"] > 0
