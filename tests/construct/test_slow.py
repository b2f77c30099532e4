"""Builds on Ray across processes: one worker (one task at a time) and several write the same bytes; a driver
killed with -9 mid-stage, then rerun, writes the bytes of a clean run and does not redo a finished unit."""
import base64
import json
from pathlib import Path

import numpy as np
import pytest

from generate_support import cli
from realsyn_pl.cli import main
from realsyn_pl.construct.engine.arrays import write_array_shard
from realsyn_pl.construct.engine.records import write_records
from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES
from realsyn_pl.construct.engine.stage import Counts, Stage
from support import IN_PROCESS as IN_PROCESS_KEYS
from support import build_overrides, kill_when, png, write_stage

IN_PROCESS = [f"{k}={v}" for k, v in IN_PROCESS_KEYS.items()]


def image_corpus(folder: Path, files: int, per_file: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        rows = [{"texts": [], "images": [{"bytes": base64.b64encode(png(100 + 3 * i, 110, (20 * f % 255, 9 * i, 90))
                                                                    ).decode()}]} for i in range(per_file)]
        p = folder / f"{f:03d}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths


def prepared(tmp_path, name, corpus, **extra):
    work = tmp_path / name
    ov = build_overrides(work, corpus, **{"embed.dtype": "float32", **extra})
    for st in ["extract", "download", "image_filter"]:  # the input of what is under test, built in this process
        assert main(["build", st] + ov + IN_PROCESS) == 0
    return work, ov


# Tasks ask for both CPUs of this process's 2-CPU instance, so one runs at a time (with 2 threads where the
# several-worker runs use 1: plain stages must not depend on it); one model actor with the default CPU. A CPU model
# forward rounds by its thread count, so that stays what the golden hashes were recorded with.
ONE_WORKER = ["ray.task_cpus=2", "ray.max_actors=1"]


def one_worker(args) -> None:
    """`build` with every unit after the other on this process's 2-CPU Ray instance."""
    assert main(args + ONE_WORKER) == 0


def finished(folder: Path) -> dict:
    """The `_done` markers of a stage (or step) with their files' modification times: what a rerun must not redo."""
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "_done").glob("*.json"))}


def _tree_bytes(folder: Path) -> dict:
    skip = {"manifest.json"}  # timings differ; its counts are compared separately
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip and "_done" not in p.parts and "_pairs" not in p.parts}


@pytest.mark.slow
def test_kill_during_embedding_then_rerun_equals_clean_run(tmp_path):
    corpus = image_corpus(tmp_path / "corpus", files=12, per_file=4)
    clean, ov_clean = prepared(tmp_path, "clean", corpus, **{"embed.batch_size": 1})
    assert main(["predict", "embed_images"] + ov_clean + IN_PROCESS) == 0  # the clean run, in this process
    work, ov = prepared(tmp_path, "killed", corpus, **{"embed.batch_size": 1})
    proc = cli(["predict", "embed_images"] + ov, joined=False)  # its own embedded instance, as on one machine
    kill_when(proc, lambda: len(list((work / "embed_images" / "_done").glob("*.json"))) >= 2)
    before = finished(work / "embed_images")
    assert 2 <= len(before) < 12 and not (work / "embed_images" / "manifest.json").exists()
    assert main(["predict", "embed_images"] + ov) == 0
    after = finished(work / "embed_images")
    assert {k: after[k] for k in before} == before  # the shards finished before the kill were not redone
    assert _tree_bytes(work / "embed_images") == _tree_bytes(clean / "embed_images")
    m = [json.loads((w / "embed_images" / "manifest.json").read_text())["counts"] for w in (clean, work)]
    assert m[0] == m[1]


@pytest.mark.slow
def test_ctrl_c_stops_the_build_in_one_line_and_keeps_the_finished_units(tmp_path):
    import signal
    import time

    # enough shards that the stage cannot end between the first marker and the signal, even on a loaded machine
    corpus = image_corpus(tmp_path / "corpus", files=24, per_file=4)
    work, ov = prepared(tmp_path, "w", corpus, **{"embed.batch_size": 1})
    # as from a terminal: a test worker process may ignore SIGINT, and a child would inherit that
    proc = cli(["predict", "embed_images"] + ov, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not list((work / "embed_images" / "_done").glob("*.json")):
        assert proc.poll() is None and time.time() - t0 < 300, proc.stdout.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "[build] interrupted in embed_images: the units that finished are kept; rerun the same command" in out
    assert "Traceback" not in out
    assert not (work / "embed_images" / "manifest.json").exists()


def _dedup_input(work: Path, n: int = 60000, d: int = 64, shards: int = 6):
    """image_filter records + embed_images arrays written directly (a large pool makes the search take seconds)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[n // 2: n // 2 + 500] = x[:500] + rng.normal(scale=0.02, size=(500, d))  # planted near-duplicates
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    per = n // shards
    recs, emb = Stage(work, "image_filter", {}), Stage(work, "embed_images", {})

    def rec_shard(i):
        rows = [{"id": f"doc-{i:05d}-{j:06d}/img-0", "sha256": f"h{i}-{j}" if j % 1000 else "same"}
                for j in range(per)]
        write_records(recs.path("images", i), rows, FILTERED_IMAGES)
        c = Counts()
        c.keep(per)
        return c

    def emb_shard(i):
        write_array_shard(emb.dir, "emb", i, [f"doc-{i:05d}-{j:06d}/img-0" for j in range(per)],
                          x[i * per:(i + 1) * per], "float16")
        c = Counts()
        c.keep(per)
        return c
    write_stage(recs, range(shards), rec_shard)
    write_stage(emb, range(shards), emb_shard)


def _stage_bytes(folder: Path) -> dict:
    """Every file of a stage and its sub-steps but manifests, done markers and temp files a kill left behind."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and "_done" not in p.parts and not p.name.startswith(".")}


@pytest.mark.slow
def test_kill_during_dedup_then_rerun_equals_clean_run(tmp_path):
    """dedup on one worker writes the bytes several workers write, and a driver killed with -9 in the middle (after
    the assign step started) then rerun writes them too, without redoing a finished step; 6 clusters, 8 key-range
    reducers."""
    # 500 planted copies in 60,000 (~1 %, far below the paper's 30.5 %): the removal is accepted
    args = ["build", "dedup_images", "progress=false", "dedup.cluster_size=10000", "dedup.partitions=8",
            "dedup.accept_removal=true"]
    for name in ("clean", "one", "killed"):
        _dedup_input(tmp_path / name)
    assert main(args + [f"work_dir={tmp_path / 'clean'}"]) == 0
    one_worker(args + [f"work_dir={tmp_path / 'one'}"])
    work = tmp_path / "killed"
    proc = cli(args + [f"work_dir={work}"])
    kill_when(proc, lambda: len(list((work / "dedup_images" / "_assign" / "_done").glob("*.json"))) >= 2)
    assert not (work / "dedup_images" / "manifest.json").exists()
    before = {step: finished(work / "dedup_images" / step) for step in ("_keys", "_exact", "_assign")}
    assert len(before["_keys"]) == 6 and len(before["_assign"]) >= 2
    assert main(args + [f"work_dir={work}"]) == 0
    for step, marks in before.items():
        after = finished(work / "dedup_images" / step)
        assert {k: after[k] for k in marks} == marks, step  # nothing finished before the kill ran again
    clean = _stage_bytes(tmp_path / "clean" / "dedup_images")
    assert "_groups.npy" in clean and "_pairs/forest-00000.npy" in clean
    assert _stage_bytes(tmp_path / "one" / "dedup_images") == clean
    assert _stage_bytes(work / "dedup_images") == clean
    ms = [json.loads((tmp_path / n / "dedup_images" / "manifest.json").read_text()) for n in ("clean", "one", "killed")]
    assert ms[0]["counts"] == ms[1]["counts"] == ms[2]["counts"]
    m = ms[0]
    assert m["clusters"] == 6
    assert m["removed_per_step"]["exact_duplicate"] == 59  # 60 rows share the hash "same"
    assert m["removed_per_step"]["near_duplicate"] >= 490


def _planted_pair(tmp_path, names, **kw):
    from planted import planted_work

    for name in names:
        planted_work(tmp_path / name, **kw)


@pytest.mark.slow
def test_two_level_cluster_and_retrieve_on_one_worker_equal_several(tmp_path):
    _planted_pair(tmp_path, ("one", "two"), n_centres=32, per_cluster=40, sentence_shards=5, image_shards=3)
    common = ["progress=false", "cluster.k=32", "cluster.method=two_level", "cluster.coarse_k=4",
              "retrieve.bucket_sentences=300", "retrieve.nprobe=2"]
    for st in ("cluster", "retrieve"):
        one_worker(["build", st, f"work_dir={tmp_path / 'one'}"] + common)
        assert main(["build", st, f"work_dir={tmp_path / 'two'}"] + common) == 0
    for st in ("cluster", "retrieve"):
        assert _tree_bytes(tmp_path / "two" / st) == _tree_bytes(tmp_path / "one" / st)
        m = [json.loads((tmp_path / w / st / "manifest.json").read_text())["counts"] for w in ("one", "two")]
        assert m[0] == m[1]
    m = json.loads((tmp_path / "two" / "cluster" / "manifest.json").read_text())["kmeans"]
    assert m["method"] == "two_level" and m["k"] == 32 and m["assign_agreement_top1"] >= 0.95
    assert len(list((tmp_path / "two" / "retrieve" / "_buckets").glob("cand-*.parquet"))) > 1


@pytest.mark.slow
def test_kill_during_two_level_kmeans_then_rerun_equals_clean_run(tmp_path):
    _planted_pair(tmp_path, ("clean", "killed"), n_centres=64, per_cluster=300, images_per_centre=1, d=32)
    args = ["build", "cluster", "progress=false", "cluster.k=2048", "cluster.method=two_level", "cluster.coarse_k=64",
            "cluster.niter=100"]
    assert main(args + [f"work_dir={tmp_path / 'clean'}"] + IN_PROCESS) == 0  # the clean run, in this process
    work = tmp_path / "killed"
    proc = cli(args + [f"work_dir={work}"])
    kill_when(proc, lambda: len(list((work / "cluster" / "_kmeans" / "_sub" / "_done").glob("*.json"))) >= 3)
    before = finished(work / "cluster" / "_kmeans" / "_sub")
    assert len(before) < 64 and not (work / "cluster" / "centroids.npy").exists()
    assert main(args + [f"work_dir={work}"]) == 0
    after = finished(work / "cluster" / "_kmeans" / "_sub")
    assert {k: after[k] for k in before} == before  # the finished sub-clusterings were not redone
    assert _tree_bytes(work / "cluster") == _tree_bytes(tmp_path / "clean" / "cluster")


def _balance_input(work: Path, shards: int = 16, per: int = 1500, d: int = 32, centres: int = 40):
    """done dedup_images (embeddings around `centres` directions) + retrieve (text1 similarity uniform in
    [0.2, 0.9]) stages written directly, text1 mode: no model needed."""
    import pyarrow as pa

    from realsyn_pl.construct.engine.records import write_table
    from realsyn_pl.construct.engine.schemas import RETRIEVED

    rng = np.random.default_rng(3)
    c = rng.normal(size=(centres, d))
    imgs, ret = Stage(work, "dedup_images", {}), Stage(work, "retrieve", {})

    def shard(i):
        x = c[rng.integers(0, centres, per)] + rng.normal(scale=0.3, size=(per, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"doc-{i:05d}-{j:06d}/img-0" for j in range(per)]
        write_array_shard(imgs.dir, "emb", i, ids, x, "float16")
        sims = rng.uniform(0.2, 0.9, per).astype(np.float32)
        keep = rng.permutation(per)[: per - per // 10]  # retrieve keeps 90%, in another order
        cols = {"id": [ids[j] for j in keep], "doc_id": [ids[j][:16] for j in keep],
                "url": [f"http://x.invalid/{ids[j]}" for j in keep], "texts": [["t"] for _ in keep],
                "sentence_ids": [["s"] for _ in keep], "sims": [[float(sims[j])] for j in keep],
                "clusters": [[0] for _ in keep], "probe_cluster": [0] * len(keep), "probe_sim": [0.5] * len(keep)}
        write_table(ret.path("retrieved", i), pa.Table.from_pydict(cols, schema=RETRIEVED))
        cnt = Counts()
        cnt.keep(per)
        return cnt
    write_stage(imgs, range(shards), shard)
    kept = Counts()
    kept.keep(per - per // 10)
    write_stage(ret, range(shards), lambda i: kept)


@pytest.mark.slow
def test_balance_on_one_worker_equals_several_and_a_killed_balance_too(tmp_path):
    """balance as map-reduce tasks: one worker writes the bytes several write; kill -9 of the driver inside the
    assign step, then a rerun, writes them too (quantile window, two-level image k-means, 2 ranking partitions)."""
    args = ["build", "balance", "progress=false", "balance.similarity_text=text1", "balance.window.mode=quantile",
            "balance.k=64", "balance.method=two_level", "balance.coarse_k=8", "balance.init=kmeans++",
            "balance.reduce_items=12000"]
    for name in ("one", "two", "killed"):
        _balance_input(tmp_path / name)
    one_worker(args + [f"work_dir={tmp_path / 'one'}"])
    assert main(args + [f"work_dir={tmp_path / 'two'}"]) == 0
    work = tmp_path / "killed"
    proc = cli(args + [f"work_dir={work}"])
    kill_when(proc, lambda: len(list((work / "balance" / "_assign" / "_done").glob("*.json"))) >= 3)
    before = finished(work / "balance" / "_assign")
    assert len(before) < 16
    assert not (work / "balance" / "manifest.json").exists()
    assert main(args + [f"work_dir={work}"]) == 0
    after = finished(work / "balance" / "_assign")
    assert {k: after[k] for k in before} == before  # the assignments finished before the kill were not redone
    ref = _tree_bytes(tmp_path / "one" / "balance")
    assert len([n for n in ref if n.startswith("balanced-")]) == 16 and "_rank-2/ranked-00001.npy" in ref
    for name in ("two", "killed"):
        assert _tree_bytes(tmp_path / name / "balance") == ref
        m = [json.loads((tmp_path / w / "balance" / "manifest.json").read_text()) for w in ("one", name)]
        assert all(m[0][k] == m[1][k] for k in ("counts", "window", "kmeans", "caps", "image_clusters"))
    assert m[0]["window"]["removed_fraction"] == pytest.approx(0.15, abs=0.01)
