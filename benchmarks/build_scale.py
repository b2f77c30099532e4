"""The global steps of a build at three pool sizes, on 1 and 2 Ray workers: time, peak memory per worker, growth
exponents.

python benchmarks/build_scale.py [--images 20000,40000,80000] [--sentences-per-image 4] [--dim 256]
Each size gets a synthetic pool in the stages' own on-disk layout (done `download`, `image_filter`, `embed_images`,
`perplexity`, `embed_sentences`, `syn_text`, `embed_syn_text` directories; fp16 arrays; small JPEGs, one copy in
`download` only), with planted exact duplicates (same bytes / same text) and near duplicates (an embedding 0.02
away in cosine distance from another item's). Then the real stages run as `python -m realsyn_pl build <stage>`
processes: dedup_images, dedup_sentences, cluster, retrieve, balance, write; each driver on its own embedded Ray
instance of 1 CPU (one worker) and of 2 CPUs (two), each in its own copy of the pool. Peak RSS per worker is the
largest VmHWM any unit's process reported in its `_done` marker (worker_peak_rss_mb); the driver's own is measured
by benchmarks/_peak.py. The fixed cost of a run (Ray's start, the imports) is measured by rerunning the completed
stage (it is skipped) and is subtracted before the growth exponent is fitted (least squares on log time vs log pool
size). Every 2-worker output file is compared with the 1-worker one, and the removed ids with the planted ones. Prints one table, a projection to
the paper's sizes, and appends both to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("dedup_images", "dedup_sentences", "cluster", "retrieve", "balance", "write")
IMAGES_PER_SHARD, SENTENCES_PER_SHARD = 2500, 10000
DUP_FRACTION = 0.05  # of each pool: planted exact duplicates, and as many near duplicates
# paper sizes (RealSyn §3 / Table 1): images into dedup, sentences into dedup, pairs into balance
PAPER = {"dedup_images": 285e6, "dedup_sentences": 1.16e9, "cluster": 0.84e9, "retrieve": 198e6, "balance": 198e6,
         "write": 15e6}


def overrides(n_img: int, n_sent: int) -> list[str]:
    """Stage settings of the run: the paper's ratios where they exist (420 sentences per text cluster, 168 pairs
    per image cluster), small images for the writer, and reducer / cluster sizes fixed per unit (not per pool), as a
    deployment sizes them, so the number of units grows with the pool and each unit's memory does not."""
    return ["progress=false", "dedup.partitions=0", "dedup.reducer_items=20000", "dedup.cluster_size=2500",
            "dedup.bucket_items=10000", "balance.reduce_items=5000", "retrieve.bucket_sentences=20000",
            "retrieve.bucket_images=5000", "cluster.assign_batch=5000", f"cluster.k={max(8, n_sent // 420)}", f"balance.k={max(8, n_img // 168)}",
            "balance.window.mode=quantile", "balance.window.q_low=0.1", "balance.window.q_high=0.9",
            "write.image_size=32", "write.samples_per_shard=1000", "write.card=false"]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def tiny_jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@dataclass
class Planted:
    """The planted duplicate groups (each: a source id and its copies) of one pool."""
    groups: list

    def score(self, removed: set) -> tuple[int, int, int]:
        """(planted groups, groups found: all members but one removed, removed ids outside any planted group)."""
        members = set().union(*self.groups) if self.groups else set()
        found = sum(len(g & removed) == len(g) - 1 for g in self.groups)
        return len(self.groups), found, len(removed - members)


def planted_groups(exact_src: np.ndarray, near_src: np.ndarray, name) -> Planted:
    """Union of the (source, copy) pairs: a source copied both exactly and nearly is one group of three."""
    by_src: dict[int, set] = {}
    for src in (exact_src, near_src):
        for g in np.flatnonzero(src >= 0):
            by_src.setdefault(int(src[g]), {int(src[g])}).add(int(g))
    return Planted([{name(x) for x in grp} for _, grp in sorted(by_src.items())])


def _pool(n: int, d: int, topics: int, rng: np.random.Generator, shift: np.ndarray, centres: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors around Zipf topics; the last 2 * DUP_FRACTION of rows copy earlier rows (exact, then near).
    Returns (x, source row of each exact copy or -1, source row of each near copy or -1)."""
    w = 1.0 / np.arange(1, topics + 1) ** 1.1
    topic = rng.choice(topics, size=n, p=w / w.sum())
    x = unit(centres[topic] + rng.normal(scale=1.0 / np.sqrt(d), size=(n, d)) + shift)
    n_dup = int(n * DUP_FRACTION)
    exact_src, near_src = np.full(n, -1), np.full(n, -1)
    base = n - 2 * n_dup
    exact_rows, near_rows = np.arange(base, base + n_dup), np.arange(base + n_dup, n)
    exact_src[exact_rows] = rng.choice(base, n_dup, replace=False)
    near_src[near_rows] = rng.choice(base, n_dup, replace=False)
    x[exact_rows] = x[exact_src[exact_rows]]
    # 0.02 cosine distance: well inside the 0.1 threshold, far outside the distance between unrelated items
    noise = unit(rng.normal(size=(n_dup, d)))
    src = x[near_src[near_rows]]
    noise -= (noise * src).sum(1, keepdims=True) * src
    x[near_rows] = unit(0.98 * src + np.sqrt(1 - 0.98 ** 2) * unit(noise))
    return x, exact_src, near_src


def make_pool(work: Path, n_img: int, n_sent: int, d: int, seed: int = 0) -> dict[str, Planted]:
    from realsyn_pl.construct.engine.arrays import write_array_shard
    from realsyn_pl.construct.engine.image_source import DOWNLOAD_ROWS_PER_GROUP
    from realsyn_pl.construct.engine.records import ShardWriter, write_records
    from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES, IMAGES, PPL_SENTENCES
    from realsyn_pl.construct.engine.stage import Counts, Stage

    rng = np.random.default_rng(seed)
    topics = max(50, n_img // 200)
    centres = unit(rng.normal(size=(topics, d)))
    gap = 0.8 * unit(rng.normal(size=(1, d)))
    ximg, img_exact, img_near = _pool(n_img, d, topics, rng, gap, centres)
    xsen, sen_exact, sen_near = _pool(n_sent, d, topics, rng, 0.0, centres)
    # a syn_text embedding per image: the image's topic direction, so the window has something to select
    xsyn = unit(ximg - gap + rng.normal(scale=0.5 / np.sqrt(d), size=ximg.shape))
    image_bytes = [None] * n_img

    def img_id(g: int) -> str:
        return f"doc-{g // 1000:05d}-{g % 1000:06d}/img-0"

    def sent_id(g: int) -> str:
        return f"doc-{(g // 4) // 1000:05d}-{(g // 4) % 1000:06d}/s-{g % 4}"

    def done(name: str, shards: int, write_shard) -> None:
        st = Stage(work, name, {"synthetic": True, "n_img": n_img, "n_sent": n_sent, "seed": seed})
        st.begin()
        for i in range(shards):
            c = Counts()
            c.keep(write_shard(st, i))
            st.mark_shard_done(i, c, 0.0)
        assert st.finalize(list(range(shards)), time.time())

    n_img_shards = -(-n_img // IMAGES_PER_SHARD)
    n_sent_shards = -(-n_sent // SENTENCES_PER_SHARD)

    def img_rows(i: int) -> range:
        return range(i * IMAGES_PER_SHARD, min(n_img, (i + 1) * IMAGES_PER_SHARD))

    def download(st, i):
        rows = []
        for g in img_rows(i):
            src = img_exact[g] if img_exact[g] >= 0 else g
            image_bytes[g] = tiny_jpeg(seed * 10 ** 9 + int(src))
            rows.append({"id": img_id(g), "doc_id": img_id(g).split("/")[0], "url": f"http://x.invalid/{g}.jpg",
                         "path": None, "bytes": image_bytes[g]})
        with ShardWriter(st.path("images", i), IMAGES, DOWNLOAD_ROWS_PER_GROUP) as out:  # download's row groups
            for r in rows:
                out.write(r)
        return len(rows)

    def image_filter(st, i):
        rows = []
        for r, g in enumerate(img_rows(i)):
            row = {"id": img_id(g), "doc_id": img_id(g).split("/")[0], "url": f"http://x.invalid/{g}.jpg",
                   "path": None, "bytes": None, "width": 24, "height": 24,
                   "sha256": hashlib.sha256(image_bytes[g]).hexdigest()}
            row["src_row"] = r  # one copy of the bytes: a reference into download's shard
            rows.append(row)
        write_records(st.path("images", i), rows, FILTERED_IMAGES)
        return len(rows)

    def embed_images(st, i):
        rows = list(img_rows(i))
        write_array_shard(st.dir, "emb", i, [img_id(g) for g in rows], ximg[rows], "float16")
        return len(rows)

    def sent_rows(i: int) -> range:
        return range(i * SENTENCES_PER_SHARD, min(n_sent, (i + 1) * SENTENCES_PER_SHARD))

    def text(g: int) -> str:
        src = sen_exact[g] if sen_exact[g] >= 0 else g
        return f"a photo of thing number {src} on the table"

    def perplexity(st, i):
        rows = [{"id": sent_id(g), "doc_id": sent_id(g).split("/")[0], "text": text(g), "entropy": 1.0, "ppl": 50.0}
                for g in sent_rows(i)]
        write_records(st.path("sentences", i), rows, PPL_SENTENCES)
        return len(rows)

    def embed_sentences(st, i):
        rows = list(sent_rows(i))
        write_array_shard(st.dir, "emb", i, [sent_id(g) for g in rows], xsen[rows], "float16")
        return len(rows)

    def syn_text(st, i):
        import pyarrow as pa

        from realsyn_pl.construct.engine.records import write_table

        rows = list(img_rows(i))
        write_table(st.path("images", i), pa.table({"id": [img_id(g) for g in rows],
                                                    "syn_text": [f"synthetic text {g}" for g in rows]}))
        return len(rows)

    def embed_syn_text(st, i):
        rows = list(img_rows(i))
        write_array_shard(st.dir, "emb", i, [img_id(g) for g in rows], xsyn[rows], "float16")
        return len(rows)

    for name, shards, fn in (("download", n_img_shards, download), ("image_filter", n_img_shards, image_filter),
                             ("embed_images", n_img_shards, embed_images),
                             ("perplexity", n_sent_shards, perplexity),
                             ("embed_sentences", n_sent_shards, embed_sentences),
                             ("syn_text", n_img_shards, syn_text), ("embed_syn_text", n_img_shards, embed_syn_text)):
        done(name, shards, fn)
    return {"dedup_images": planted_groups(img_exact, img_near, img_id),
            "dedup_sentences": planted_groups(sen_exact, sen_near, sent_id)}


def launch(stage: str, work: Path, world: int, extra: list[str]) -> tuple[float, list[int]]:
    """Run `build <stage>` on an embedded Ray instance of `world` CPUs; (wall seconds, [peak RSS bytes of the
    busiest worker, of the driver])."""
    # one thread per task in both runs (ray.task_cpus=1): faiss/BLAS reductions in another thread count round
    # differently, and the 1-worker and 2-worker outputs are compared byte for byte
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PEAK_FILE=str(work / f"_peak-{world}"))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(Path(__file__).with_name("_peak.py")), "build", stage, f"work_dir={work}",
           f"ray.num_cpus={world}", "ray.object_store_gb=1", *extra]
    t0 = time.time()
    with open(work / f"_log-{stage}-{world}.txt", "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = (work / f"_log-{stage}-{world}.txt").read_text()[-2000:]
        raise SystemExit(f"{stage} on {world} worker(s) failed:\n{tail}")
    wall = time.time() - t0
    peak_file = work / f"_peak-{world}"
    driver = int(peak_file.read_text())
    peak_file.unlink()
    workers = [json.loads(m.read_text()).get("worker_peak_rss_mb", 0.0)
               for m in (work / stage).rglob("_done/*.json")]
    return wall, [int(max(workers, default=0.0) * 2**20), driver]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every output file, without the files that record times, paths or process ids."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix != ".txt" and p.name not in ("manifest.json", "_config.json") \
                and "_done" not in p.parts and not p.name.startswith("_log") and not p.name.startswith("."):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def removed_ids(stage_dir: Path) -> set:
    import pyarrow.parquet as pq

    out = set()
    for f in sorted(stage_dir.glob("removed-*.parquet")):
        out.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return out


def fit_exponent(sizes: list[float], values: list[float]) -> float:
    v = np.maximum(np.asarray(values, float), 1e-3)
    return float(np.polyfit(np.log(sizes), np.log(v), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="20000,40000,80000")
    ap.add_argument("--sentences-per-image", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--workers", default="1,2")
    a = ap.parse_args()
    from _common import append_result, scratch_dir

    sizes = [int(s) for s in a.images.split(",")]
    worlds = [int(w) for w in a.workers.split(",")]
    root = scratch_dir("bench-build-scale-")
    load_before = os.getloadavg()[0]
    started = time.time()
    res: dict[tuple[str, int, int], dict] = {}
    fixed_cost: dict[str, tuple[float, list[int]]] = {}
    checks = []
    for n_img in sizes:
        n_sent = n_img * a.sentences_per_image
        pool = root / f"pool-{n_img}"
        planted = make_pool(pool, n_img, n_sent, a.dim)
        digests = {}
        for world in worlds:
            work = root / f"run-{n_img}-{world}"
            shutil.copytree(pool, work)
            for stage in STAGES:
                wall, peaks = launch(stage, work, world, overrides(n_img, n_sent))
                if stage not in fixed_cost:  # a process that finds the stage complete: imports + manifests
                    fixed_cost[stage] = launch(stage, work, 1, overrides(n_img, n_sent))
                fixed, base = fixed_cost[stage]
                items = PAPER_ITEMS(stage, work)
                res[(stage, n_img, world)] = {"wall": wall, "fixed": fixed, "peak": max(peaks),
                                              "base": max(base), "items": items}
                print(f"[bench] {n_img} images, {world} worker(s), {stage}: {wall:.1f} s, peak RSS "
                      f"{max(peaks) / 2**20:.0f} MiB, {items} items", flush=True)
            digests[world] = {s: tree_digest(work / s) for s in STAGES}
            for kind, pl in planted.items():
                checks.append((n_img, world, kind, *pl.score(removed_ids(work / kind))))
        if len(worlds) > 1:
            for s in STAGES:
                same = digests[worlds[0]][s] == digests[worlds[1]][s]
                checks.append((n_img, "1 vs 2", s, "same bytes" if same else "DIFFERENT", "", ""))
        shutil.rmtree(pool)
    total = time.time() - started
    table, exps = report_table(res, sizes, worlds)
    checks_md = "\n".join(["| pool | workers | stage | planted groups | found | other ids removed |", "|---|---|---|---|---|---|"]
                          + [f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} | {c[4]} | {c[5]} |" for c in checks])
    proj = projection(res, sizes, a.dim)
    load_after = os.getloadavg()[0]
    notes = (f"Pools: {', '.join(f'{n:,}' for n in sizes)} images with {a.sentences_per_image}x as many sentences, "
             f"d={a.dim}, {IMAGES_PER_SHARD} images / {SENTENCES_PER_SHARD} sentences per shard (shard count grows "
             f"with the pool, as at scale), {DUP_FRACTION:.0%} planted exact and {DUP_FRACTION:.0%} near duplicates "
             f"per pool. Settings: {' '.join(overrides(sizes[-1], sizes[-1] * a.sentences_per_image))} (k values "
             f"at the largest size). Work seconds = wall minus the fixed cost of a process that finds the stage "
             f"complete (imports, reading manifests); exponents are fitted on work seconds and on peak RSS above that "
             f"process's. Bytes/item = (peak RSS - fixed process RSS) / items in. Whole benchmark {total / 60:.1f} "
             f"min; load average {load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} cores).")
    print(table, "\n\n", checks_md, "\n\n", proj, "\n\n", notes)
    if not os.environ.get("BENCH_DRY"):
        append_result("Build global steps at three sizes, 1 and 2 Ray workers (dedup, cluster, retrieve, balance, write)",
                      table + "\n\n" + checks_md + "\n\n" + proj, notes)


def PAPER_ITEMS(stage: str, work: Path) -> int:  # noqa: N802
    """Items into the stage (its manifest's n_in; cluster: sentences)."""
    m = json.loads((work / stage / "manifest.json").read_text())
    return int(m["counts"]["n_in"])


def report_table(res: dict, sizes: list[int], worlds: list[int]) -> tuple[str, dict]:
    head = ["| stage | workers | " + " | ".join(f"{n:,}: work s / peak MiB / B per item" for n in sizes)
            + " | time exponent | RSS growth exponent |", "|---|---|" + "---|" * len(sizes) + "---|---|"]
    exps = {}
    for s in STAGES:
        for w in worlds:
            cells, items, work_s, extra_rss = [], [], [], []
            for n in sizes:
                r = res[(s, n, w)]
                ws = max(0.0, r["wall"] - r["fixed"])
                er = max(0, r["peak"] - r["base"])
                items.append(r["items"])
                work_s.append(ws)
                extra_rss.append(er)
                cells.append(f"{ws:.1f} / {r['peak'] / 2**20:.0f} / {er / max(1, r['items']):.0f}")
            e_t, e_m = fit_exponent(items, work_s), fit_exponent(items, extra_rss)
            exps[(s, w)] = (e_t, e_m)
            head.append(f"| {s} | {w} | " + " | ".join(cells) + f" | {e_t:.2f} | {e_m:.2f} |")
    return "\n".join(head), exps


def projection(res: dict, sizes: list[int], dim: int) -> str:
    """Hours and memory per worker at the paper's sizes, from the measured per-item costs (the assumptions are
    printed with the table)."""
    workers, d_paper = 128, 1024
    small, large = sizes[0], sizes[-1]
    lines = ["| stage | items (paper) | work us per item here (1 worker) | hours on 128 workers | peak RSS per worker "
             "here (2 workers, largest) | projected RSS per worker |", "|---|---|---|---|---|---|"]
    for s in STAGES:
        r1 = res[(s, large, 1)]
        per_item = max(0.0, r1["wall"] - r1["fixed"]) / max(1, r1["items"])
        hours = per_item * d_paper / dim * PAPER[s] / workers / 3600
        two = [res.get((s, n, 2), res[(s, n, 1)]) for n in (small, large)]
        # per-worker RSS growth per item a worker holds, fitted between the smallest and the largest pool
        d_items = (two[1]["items"] - two[0]["items"]) / 2
        slope = max(0.0, (two[1]["peak"] - two[0]["peak"]) / max(1.0, d_items))
        grow = slope * max(0.0, PAPER[s] / workers - two[1]["items"] / 2) * d_paper / dim
        lines.append(f"| {s} | {PAPER[s]:.3g} | {per_item * 1e6:.0f} | {hours:.2f} | "
                     f"{two[1]['peak'] / 2**30:.2f} GiB | {(two[1]['peak'] + grow) / 2**30:.1f} GiB |")
    return "\n".join(lines) + (
        "\n\nProjection assumptions: the paper's item counts per stage (images 285M into dedup, sentences 1.16B into "
        "dedup and 0.84B into cluster, 198M pairs into retrieve and balance, 15M samples written); 16 nodes x 8 "
        "workers = 128 Ray workers, each as fast as one core of this machine (no GPU speed-up assumed, although dedup, "
        "cluster, retrieve and the balance assignment are matrix products a GPU runs ~100x faster); the whole "
        "per-item cost scaled by d 1024/" + str(dim) + " (pessimistic for bookkeeping); per-worker RSS extrapolated "
        "linearly from its growth between the smallest and the largest pool (2 workers), scaled by d; work spread "
        "evenly over workers (Ray hands units out as workers free up).")


if __name__ == "__main__":
    main()
