"""What the build's Ray driver costs per unit, at three unit counts, and what that is at the paper's unit counts.

python benchmarks/ray_executor.py [--units 500,2000,8000] [--cpus 2]
One embedded Ray instance (`--cpus` CPUs, bound to 127.0.0.1) runs `Executor.map` over N units whose work is
nothing but a unit's bookkeeping (Counts and its `_done` marker, written by the task as in every stage): the time is
the engine's own, task submission, scheduling, `ray.wait`, markers. Per N: wall seconds, units/s, the driver's CPU
seconds per unit (the one process that could become the bottleneck: it must stay flat as N grows), and the growth
exponent of wall time in N (least squares on log-log; 1.0 = linear; a driver that rescanned every unit per
completion would show 2). Then the start of a model stage (Ray actors: a process with torch and Lightning, and a
tiny model) and a projection: the paper's build has ~60k units (counted below from its sizes and the configs'
defaults), so driver time there = units x the largest driver CPU per unit measured. Appends one table to
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# units of each step at the paper's size with the defaults of configs/build/paper_obelics.yaml: 1,432 OBELICS files
# (one shard each, every per-shard step), 336M images / 1.16B sentences into dedup (10k per semantic cluster,
# buckets of 200k members + guests, 50M keys per exact reducer), two-level text k-means at k = 2M (1,414 coarse
# cells), retrieval buckets of 16,384 clusters, balance ranking at 10M pairs per reducer, 15M pairs in tars of 10k
SHARDS = 1432
PAPER_UNITS = {
    "extract, download, image_filter, sentence_filter, wordcount, entropy": 6 * SHARDS,
    "embed_images, perplexity, embed_sentences, caption, tag, syn_text, embed_syn_text (actor calls)": 7 * SHARDS,
    "dedup_images (keys, exact, assign, pairs, keepers, removed, kept, output)": 5 * SHARDS + 2 * 14 + 3_400,
    "dedup_sentences (the same)": 5 * SHARDS + 2 * 47 + 11_600,
    "cluster (sample, sub-clusterings, assignment)": 2 * SHARDS + 1_414,
    "retrieve (probe, buckets, merge)": 2 * SHARDS + 123,
    "mine_tags, balance (sims, assign, ranking, output), write": 5 * SHARDS + 20 + 1_500,
}


def noop(stage):
    from realsyn_pl.construct.engine.stage import Counts

    def work(i: int) -> "Counts":
        c = Counts()
        c.keep(1)
        return c
    return work


def one(ex, root: Path, n: int) -> dict:
    from realsyn_pl.construct.engine.stage import Stage

    st = Stage(root, f"noop-{n}", {"n": n})
    st.begin()
    cpu0, t0 = time.process_time(), time.time()
    ex.map(st, range(n), noop(st))
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    assert st.pending(range(n)) == []
    return {"n": n, "wall": wall, "ups": n / wall, "driver_ms": 1000 * cpu / n}


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def actor_start(ex, root: Path, shards: int = 4, per: int = 64) -> float:
    """Seconds of an `embed_sentences` stage over `shards` x `per` short sentences with a tiny random CLIP: mostly
    the start of its actors (a process importing torch, Lightning and open_clip, building the model)."""
    from realsyn_pl.construct.engine.actors import run_predict_task
    from realsyn_pl.construct.engine.config import BuildConfig
    from realsyn_pl.construct.engine.records import write_records
    from realsyn_pl.construct.engine.schemas import PPL_SENTENCES
    from realsyn_pl.construct.engine.stage import Counts, Stage
    from realsyn_pl.construct.extract.model_stages import EmbedTask

    st = Stage(root, "perplexity", {"bench": True})
    st.begin()
    for i in range(shards):
        rows = [{"id": f"doc-{i:05d}-{j:06d}/s-0", "doc_id": f"doc-{i:05d}-{j:06d}", "text": f"a red ball number {j}",
                 "entropy": 1.0, "ppl": 50.0} for j in range(per)]
        write_records(st.path("sentences", i), rows, PPL_SENTENCES)
        c = Counts()
        c.keep(per)
        st.mark_shard_done(i, c, 0.0)
    st.finalize(list(range(shards)), time.time())
    cfg = BuildConfig(work_dir=str(root))
    cfg.embed.model.name, cfg.embed.model.pretrained, cfg.embed.model.custom = "bench-tiny", None, TINY_CLIP
    cfg.embed.workers, cfg.trainer.accelerator = 0, "cpu"
    t0 = time.time()
    assert run_predict_task(EmbedTask.job(cfg, "embed_sentences"), ex, root, cfg.trainer)
    ex.release_actors()
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", default="500,2000,8000")
    ap.add_argument("--cpus", type=int, default=2)
    a = ap.parse_args()
    from _common import append_result, scratch_dir

    from realsyn_pl.construct.engine.config import RayConfig
    from realsyn_pl.construct.engine.executor import Executor

    root = scratch_dir("bench-ray-")
    t0 = time.time()
    ex = Executor(RayConfig(num_cpus=a.cpus, object_store_gb=1), progress=False)
    start = time.time() - t0
    sizes = [int(x) for x in a.units.split(",")]
    one(ex, root, 64)  # the workers' first start and imports, outside the measured runs
    rows = [one(ex, root, n) for n in sizes]
    actors = actor_start(ex, root / "predict")
    ex.close()
    slope = float(np.polyfit(np.log([r["n"] for r in rows]), np.log([r["wall"] for r in rows]), 1)[0])
    per_unit_ms = max(r["driver_ms"] for r in rows)
    total = sum(PAPER_UNITS.values())
    lines = ["| units | wall s | units/s | driver CPU ms per unit |", "|---|---|---|---|"]
    lines += [f"| {r['n']:,} | {r['wall']:.1f} | {r['ups']:.0f} | {r['driver_ms']:.2f} |" for r in rows]
    lines += ["", f"Growth exponent of wall time in units: **{slope:.2f}** (1.0 = linear). Embedded instance start: "
              f"{start:.1f} s; a model stage (embed_sentences, 4 x 64 sentences, a tiny random CLIP) from its start "
              f"to its last shard: {actors:.1f} s, mostly its actors' start (torch, Lightning, open_clip imports, "
              f"the model).", "",
              "| paper build step | units |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in PAPER_UNITS.items()]
    lines += [f"| **all** | **{total:,}** |", "",
              f"Driver time at the paper's size: {total:,} units x {per_unit_ms:.2f} ms = "
              f"**{total * per_unit_ms / 1000 / 60:.1f} min** of driver CPU over the whole build, spread over the days "
              "the units take; the units' own work is measured per stage by the other benchmarks."]
    table = "\n".join(lines)
    print(table)
    append_result(f"The build's Ray driver: cost per unit at three unit counts ({a.cpus} CPUs, embedded)", table,
                  "Assumptions: the driver's CPU per unit stays at the largest value measured here (the exponent "
                  "says whether it grows); units at the paper's size counted from its sizes and the paper preset's "
                  "defaults (comment in benchmarks/ray_executor.py); a cluster adds network latency per task "
                  "(hundreds of microseconds), not driver CPU. The no-op units write real `_done` markers, so "
                  "the wall time includes a file write per unit. Argv: " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
