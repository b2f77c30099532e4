"""The global stages of a paper-shaped build at three pool sizes, on 1 node and on 2 simulated nodes: time, anonymous
memory per task, bytes read and written, growth exponents, and a projection of the whole `build all` at the paper's
size. A stage whose time grows faster than N^1.15 or whose memory per task grows with N is printed as FAILS target.

python benchmarks/build_scale.py [--images 22000,44000,88000] [--sentences-per-image 4] [--dim 256]
    [--shard-scale 0.025] [--dense-groups 2] [--dense-fraction 0.03] [--dedup-cluster-size 10000] [--modes 1,2]

Pool (one per size, in the stages' own on-disk layout: done `download`, `image_filter`, `embed_images`, `perplexity`,
`embed_sentences`, `syn_text`, `embed_syn_text` directories; fp16 arrays; small JPEGs): one shard per OBELICS file, the
paper's rows per file at the dedup input (285M images and 1.16B sentences over 1,432 files: ~199k images, ~810k
sentences) times --shard-scale, so rows per shard are fixed and the shard count grows with N as the real data's
would. Planted, then spread over the shards by a random permutation: 10% exact copies (same bytes / same text), 10%
near copies (0.02 cosine distance from another item), and --dense-groups near-duplicate groups holding together
--dense-fraction of the pool (hundreds to thousands of members each, growing with N; each member 0.005-0.02 from the
group's centre, so every pair is under the 0.1 threshold and a group of m makes m^2/2 pairs); in the sentence pool
the dense groups are templated sentences (one template per group, a few words changed per member: every text and
exact key differs, the embeddings are near).
Settings as a deployment sets them: dedup.cluster_size fixed (10,000, the paper preset's), text clusters k = sentences
into cluster / 420 (paper: 2M over 0.84B), image clusters k = in-window images / 168 (paper: 1M over 168.3M), both
fitted two-level as at the paper's k, the retrieve probe through the coarse centres (the CPU path); reducer, bucket
and shard sizes fixed per unit (not per pool) so the units grow with N and a unit's memory does not.
Runs: each stage as `python -m realsyn_pl build <stage>` (through benchmarks/_peak.py, which records the driver's own
memory), joined (RAY_ADDRESS) to a Ray instance on this machine started for the pool by ray.cluster_utils: once to
one node of 1 CPU (1 node), once to a 0-CPU head and 2 nodes of 1 CPU (2 nodes); every node's address is checked to be
127.0.0.1, and Ray's start is paid once per pool and mode instead of once per stage. Each run in its own copy of the
pool, all with a copy of realsyn_pl taken at the start (the working tree may change during the run); the
two runs' output files are compared byte for byte, the removed ids scored against the planted groups. Measured per
stage: its time inside the driver (from its `_config.json` to its manifest: the fixed cost of the process, imports and
Ray's start, left out without subtracting a second, noisy measurement of it); the units' own seconds (their `_done`
markers), the reductions and fits the driver waits on (ray::run_call tasks, timed by sampling) and the rest (worker
starts, the driver's dispatch); the anonymous and file-backed peaks of each unit's process (markers:
worker_peak_anon_mb, worker_peak_file_mb) and of every Ray worker process while busy, reductions and fits included
(sampled here every 50 ms from /proc); bytes read and written per unit (markers: /proc/self/io deltas; read = rchar,
read syscalls, which misses memory-mapped arrays; written = write_bytes, page-cache bytes dirtied). Growth exponents:
least squares on log value vs log items into the stage over the three sizes. Prints the tables and the projection,
and appends them to docs/benchmarks.md (not with BENCH_DRY=1).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Ray reads it at import: every node advertises 127.0.0.1 (this process starts the simulated cluster)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

STAGES = tuple(os.environ.get("BENCH_STAGES", "dedup_images,dedup_sentences,cluster,retrieve,balance,write").split(","))
OBELICS_FILES = 1432  # OBELICS: 141M documents, 353M image URLs (~246k per file)
# the paper's items into each stage (RealSyn §3, Table 1)
PAPER = {"dedup_images": 285e6, "dedup_sentences": 1.16e9, "cluster": 0.84e9, "retrieve": 198e6,
         "balance": 198e6, "write": 15e6}
PAPER_ROWS_PER_FILE = PAPER["dedup_images"] / OBELICS_FILES  # images per shard at the dedup input (~199k)
D_PAPER, CS_PAPER = 1024, 10_000  # EVA02-CLIP E/14-plus width; the paper preset's dedup.cluster_size
SENTENCES_PER_CLUSTER, IMAGES_PER_CLUSTER = 420, 168
WINDOW = (0.075, 0.925)  # the paper's window removed 15% of the pairs (29.7M of 198M)
EXACT, NEAR, PAIR_DISTANCE, DENSE_DISTANCE = 0.10, 0.10, 0.02, (0.005, 0.02)
# per-unit sizes, fixed whatever the pool; the paper preset's values are in DEPLOYED
UNIT = {"dedup.reducer_items": 20_000, "dedup.pair_chunk": 50_000, "balance.reduce_items": 5_000,
        "retrieve.bucket_sentences": 20_000,
        "retrieve.bucket_images": 5_000, "cluster.assign_batch": 5_000, "write.samples_per_shard": 1_000}
DEPLOYED = {"dedup.reducer_items": 50_000_000, "dedup.pair_chunk": 1_000_000, "balance.reduce_items": 10_000_000,
            "retrieve.bucket_sentences": 1_000_000, "retrieve.bucket_images": 1_000_000,
            "cluster.assign_batch": 65_536, "write.samples_per_shard": 10_000}
# the stated cluster of the projection
NODES, GPUS_PER_NODE, CORES_PER_NODE, RAM_GB_PER_NODE = 16, 8, 64, 1024
TIME_TARGET, MEM_EXPONENT, MEM_RISE_MB = 1.15, 0.10, 64.0
ADJ = ("red", "old", "new", "big", "small", "blue", "green", "cheap", "rare", "fine", "dark", "light", "bright",
       "quiet", "warm", "cold", "fresh", "plain", "tall", "short")
NOUN = ("lamp", "chair", "table", "bike", "house", "boat", "coat", "watch", "phone", "clock", "desk", "door", "shoe",
        "car", "book", "ring", "vase", "bag", "hat", "sofa")
PLACE = ("paris", "berlin", "tokyo", "texas", "ohio", "kent", "lima", "oslo", "rome", "cairo", "delhi", "perth",
         "quebec", "dublin", "vienna", "madrid", "seoul", "lagos", "bern", "riga")
TEMPLATES = ("click here to see the {a} {b} from {c} for only {n} dollars today",
             "this {a} {b} was posted in {c} on day {n} of the sale",
             "share the {a} {b} of {c} with your {n} friends now")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def at_distance(src: np.ndarray, dist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at cosine distance `dist` (per row) from each unit row of `src`."""
    noise = unit(rng.normal(size=src.shape))
    noise = unit(noise - (noise * src).sum(1, keepdims=True) * src)
    c = (1.0 - np.asarray(dist, np.float64)).reshape(-1, 1)
    return unit(c * src + np.sqrt(1.0 - c ** 2) * noise)


def tiny_jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def templated(group: int, member: int) -> str:
    """Member `member` of template group `group`: the same sentence with a few words changed (unique per member)."""
    a, b, c, n = member % 20, member // 20 % 20, member // 400 % 20, member // 8000
    return TEMPLATES[group % len(TEMPLATES)].format(a=ADJ[a], b=NOUN[b], c=PLACE[c], n=n + 2)


@dataclass
class PoolPlan:
    """One pool in position order: vectors, the position whose bytes/text each row repeats (itself unless an exact
    copy), each row's dense group and rank in it (-1 outside), and the planted groups by kind (sets of positions)."""
    x: np.ndarray
    source: np.ndarray
    dense_of: np.ndarray
    rank: np.ndarray
    groups: dict[str, list[np.ndarray]]


def plan_pool(n: int, d: int, rng: np.random.Generator, centres: np.ndarray, shift: np.ndarray, dense_groups: int,
              dense_fraction: float) -> PoolPlan:
    """Zipf topics; exact copies, near copies and dense groups of base rows; then the rows in a random order, so the
    planted rows fall in every shard as boilerplate does in every OBELICS file."""
    m = int(n * dense_fraction / dense_groups) if dense_groups else 0
    n_exact, n_near = int(n * EXACT), int(n * NEAR)
    base = n - n_exact - n_near - dense_groups * m
    w = 1.0 / np.arange(1, len(centres) + 1) ** 1.1
    topic = rng.choice(len(centres), size=base, p=w / w.sum())
    x = np.empty((n, d), np.float32)
    x[:base] = unit(centres[topic] + rng.normal(scale=1.0 / np.sqrt(d), size=(base, d)) + shift)
    src = np.arange(n)
    exact = np.arange(base, base + n_exact)
    near = np.arange(base + n_exact, base + n_exact + n_near)
    src[exact] = rng.choice(base, n_exact, replace=False)
    x[exact] = x[src[exact]]
    near_src = rng.choice(base, n_near, replace=False)
    x[near] = at_distance(x[near_src], np.full(n_near, PAIR_DISTANCE), rng)
    dense_of, rank = np.full(n, -1), np.full(n, -1)
    dense_rows = []
    for g in range(dense_groups):
        rows = np.arange(base + n_exact + n_near + g * m, base + n_exact + n_near + (g + 1) * m)
        centre = unit(rng.normal(size=(1, d)))
        x[rows] = at_distance(np.repeat(centre, m, 0), rng.uniform(*DENSE_DISTANCE, m), rng)
        dense_of[rows], rank[rows] = g, np.arange(m)
        dense_rows.append(rows)
    pos = rng.permutation(n)  # logical row l goes to position pos[l]
    out_x = np.empty_like(x)
    out_x[pos] = x
    out_src, out_dense, out_rank = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    out_src[pos], out_dense[pos], out_rank[pos] = pos[src], dense_of, rank
    by_src: dict[int, set] = {}
    for copies, sources in ((exact, src[exact]), (near, near_src)):
        for c, s in zip(copies, sources):
            by_src.setdefault(int(s), {int(pos[s])}).add(int(pos[c]))
    pairs = [np.array(sorted(g)) for _, g in sorted(by_src.items())]
    return PoolPlan(out_x, out_src, out_dense, out_rank, {"pairs": pairs, "dense": [pos[r] for r in dense_rows]})


@dataclass
class Planted:
    """The planted groups of one pool as ids, by kind."""
    groups: dict[str, list[set]]

    def score(self, removed: set) -> list[tuple[str, int, int, int]]:
        """(kind, planted groups, found: all members but one removed, removed ids outside any planted group)."""
        members = set().union(*(g for gs in self.groups.values() for g in gs))
        stray = len(removed - members)
        return [(kind, len(gs), sum(len(g & removed) == len(g) - 1 for g in gs), stray)
                for kind, gs in self.groups.items()]


@dataclass
class Shape:
    n_img: int
    n_sent: int
    dim: int
    img_per_shard: int
    sent_per_shard: int

    @property
    def shards(self) -> int:
        return -(-self.n_img // self.img_per_shard)


def make_pool(work: Path, s: Shape, dense_groups: int, dense_fraction: float, seed: int = 0
              ) -> tuple[dict[str, Planted], dict[str, int]]:
    """Write the pool; return the planted groups (ids) per dedup stage and the expected survivors of each dedup
    (what sets the k of the stages after it)."""
    from realsyn_pl.construct.engine.arrays import write_array_shard
    from realsyn_pl.construct.engine.image_source import DOWNLOAD_ROWS_PER_GROUP
    from realsyn_pl.construct.engine.records import ShardWriter, write_records, write_table
    from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES, IMAGES, PPL_SENTENCES
    from realsyn_pl.construct.engine.stage import Counts, Stage

    rng = np.random.default_rng(seed)
    topics = max(50, s.n_img // 200)
    centres = unit(rng.normal(size=(topics, s.dim)))
    gap = 0.8 * unit(rng.normal(size=(1, s.dim)))
    img = plan_pool(s.n_img, s.dim, rng, centres, gap, dense_groups, dense_fraction)
    sen = plan_pool(s.n_sent, s.dim, rng, centres, np.zeros((1, s.dim)), dense_groups, dense_fraction)
    # a syn_text embedding per image: the image's direction without the modality gap, so the window selects
    xsyn = unit(img.x - gap + rng.normal(scale=0.5 / np.sqrt(s.dim), size=img.x.shape))
    spi = max(1, s.n_sent // s.n_img)

    def img_id(g: int) -> str:
        return f"doc-{g // 1000:05d}-{g % 1000:06d}/img-0"

    def sent_id(g: int) -> str:
        return f"doc-{(g // spi) // 1000:05d}-{(g // spi) % 1000:06d}/s-{g % spi}"

    def text(g: int) -> str:
        if sen.dense_of[g] >= 0:
            return templated(int(sen.dense_of[g]), int(sen.rank[g]))
        return f"a photo of thing number {sen.source[g]} on the table"

    def rows(i: int, per: int, n: int) -> range:
        return range(i * per, min(n, (i + 1) * per))

    jpeg = {g: tiny_jpeg(seed * 10 ** 9 + int(img.source[g])) for g in range(s.n_img)}

    def download(st, i):
        with ShardWriter(st.path("images", i), IMAGES, DOWNLOAD_ROWS_PER_GROUP) as out:  # download's row groups
            for g in rows(i, s.img_per_shard, s.n_img):
                out.write({"id": img_id(g), "doc_id": img_id(g).split("/")[0], "url": f"http://x.invalid/{g}.jpg",
                           "path": None, "bytes": jpeg[g]})
        return len(rows(i, s.img_per_shard, s.n_img))

    def image_filter(st, i):
        out = [{"id": img_id(g), "doc_id": img_id(g).split("/")[0], "url": f"http://x.invalid/{g}.jpg", "path": None,
                "bytes": None, "width": 24, "height": 24, "sha256": hashlib.sha256(jpeg[g]).hexdigest(),
                "src_row": r}  # one copy of the bytes: a reference into download's shard
               for r, g in enumerate(rows(i, s.img_per_shard, s.n_img))]
        write_records(st.path("images", i), out, FILTERED_IMAGES)
        return len(out)

    def array(x: np.ndarray, per: int, n: int, name: Callable[[int], str]):
        def write(st, i):
            r = list(rows(i, per, n))
            write_array_shard(st.dir, "emb", i, [name(g) for g in r], x[r], "float16")
            return len(r)
        return write

    def perplexity(st, i):
        out = [{"id": sent_id(g), "doc_id": sent_id(g).split("/")[0], "text": text(g), "entropy": 1.0, "ppl": 50.0}
               for g in rows(i, s.sent_per_shard, s.n_sent)]
        write_records(st.path("sentences", i), out, PPL_SENTENCES)
        return len(out)

    def syn_text(st, i):
        import pyarrow as pa

        r = list(rows(i, s.img_per_shard, s.n_img))
        write_table(st.path("images", i), pa.table({"id": [img_id(g) for g in r],
                                                    "syn_text": [f"synthetic text {g}" for g in r]}))
        return len(r)

    for name, fn in (("download", download), ("image_filter", image_filter),
                     ("embed_images", array(img.x, s.img_per_shard, s.n_img, img_id)),
                     ("perplexity", perplexity),
                     ("embed_sentences", array(sen.x, s.sent_per_shard, s.n_sent, sent_id)),
                     ("syn_text", syn_text), ("embed_syn_text", array(xsyn, s.img_per_shard, s.n_img, img_id))):
        st = Stage(work, name, {"synthetic": True, "n_img": s.n_img, "n_sent": s.n_sent, "seed": seed})
        st.begin()
        for i in range(s.shards):
            c = Counts()
            c.keep(fn(st, i))
            st.mark_shard_done(i, c, 0.0)
        assert st.finalize(list(range(s.shards)), time.time())
    planted = {"dedup_images": Planted({k: [{img_id(g) for g in grp} for grp in v] for k, v in img.groups.items()}),
               "dedup_sentences": Planted({k: [{sent_id(g) for g in grp} for grp in v]
                                           for k, v in sen.groups.items()})}
    survivors = {k: n - sum(len(g) - 1 for gs in p.groups.values() for g in gs)
                 for (k, p), n in zip(planted.items(), (s.n_img, s.n_sent))}
    return planted, survivors


# quantile: the paper preset's fractions; the planted pool holds ~23 % copies and random vectors lie far apart, so the
# search takes every pair under max_threshold (the dense groups' all-pairs included): the mode's cost at its worst
DEDUP_MODE = "absolute"
# (one fraction for both pools: dedup_text would not carry the unit settings above, and neither fraction is reached)
DEDUP_OVERRIDES = {"absolute": [], "quantile": ["dedup.mode=quantile", "dedup.quantile=0.305",
                                                "dedup.quantile_floor=0.02"]}  # the paper preset's floor


def overrides(cs: int, survivors: dict[str, int]) -> list[str]:
    """The build's settings: k from the pool at the paper's items per cluster, dedup.cluster_size and the per-unit
    sizes fixed, two-level k-means as at the paper's k, the probe through the coarse centres (the CPU path)."""
    k_text = max(8, round(survivors["dedup_sentences"] / SENTENCES_PER_CLUSTER))
    in_window = survivors["dedup_images"] * (WINDOW[1] - WINDOW[0])
    k_img = max(8, round(in_window / IMAGES_PER_CLUSTER))
    # a pair unit holds one cluster with its guests (~2 x cluster_size rows), a larger one is tiled: the smallest pool
    # already fills its units, so a unit's memory has no room left to grow with the pool
    # dedup.accept_removal: the planted pool removes what was planted (~23 %), whatever the paper's share
    return ["progress=false", "dedup.partitions=0", f"dedup.cluster_size={cs}", f"dedup.bucket_items={2 * cs}",
            "dedup.accept_removal=true", *DEDUP_OVERRIDES[DEDUP_MODE],
            *(f"{k}={v}" for k, v in UNIT.items()), f"cluster.k={k_text}", "cluster.method=two_level",
            f"balance.k={k_img}", "balance.method=two_level", "retrieve.probe=two_level",
            "balance.window.mode=quantile", f"balance.window.q_low={WINDOW[0]}", f"balance.window.q_high={WINDOW[1]}",
            "write.image_size=32", "write.card=false"]


def status_kib(pid: int) -> Optional[tuple[str, int, int]]:
    """(process title, RssAnon KiB, RssFile KiB) of a live process, or None."""
    from realsyn_pl.construct.engine.memory import rss_kib

    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            title = fh.read().split(b"\0")[0].decode(errors="replace")
        with open(f"/proc/{pid}/status") as fh:
            anon, file = rss_kib(fh.read())
    except (OSError, ValueError):
        return None
    return title, anon, file


class TaskWatch:
    """The largest RssAnon and RssFile of any Ray worker process below this one while it runs a task (its title is
    ray::<function> rather than ray::IDLE), reductions and fits included, and the seconds during which a reduction or
    fit (ray::run_call, a task the driver waits on: nothing else runs then) was running; sampled every 50 ms."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.anon, self.file, self.calls_s = interval, 0, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        me, pids, listed, last = psutil.Process(), [], 0.0, time.time()
        while not self._stop.wait(self.interval):
            if time.time() - listed > 0.5:  # new workers appear as a step starts
                try:
                    pids = [p.pid for p in me.children(recursive=True)]
                except psutil.Error:
                    continue
                listed = time.time()
            busy = [got for got in map(status_kib, pids)
                    if got and got[0].startswith("ray::") and not got[0].startswith("ray::IDLE")]
            for _, anon, file in busy:
                self.anon, self.file = max(self.anon, anon), max(self.file, file)
            now = time.time()
            if any(title.startswith("ray::run_call") for title, _, _ in busy):
                self.calls_s += now - last
            last = now

    def __enter__(self) -> "TaskWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Mode:
    name: str
    nodes: int
    address: str = ""  # of the running instance, while it runs


@dataclass
class Run:
    wall: float
    driver: dict
    task_anon_mb: float
    task_file_mb: float
    calls_s: float


def snapshot_code(root: Path) -> Path:
    """A copy of realsyn_pl and of the driver wrapper, imported by every driver and Ray worker of the benchmark: the
    working tree may be edited while it runs, and the 1- and 2-node outputs would then differ for that alone."""
    code = root / "code"
    shutil.copytree(ROOT / "realsyn_pl", code / "realsyn_pl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(Path(__file__).with_name("_peak.py"), code / "_peak.py")
    return code


def launch(stage: str, work: Path, mode: Mode, extra: list[str]) -> Run:
    """`build <stage>` in a subprocess on `mode`'s Ray, with the code snapshot (PYTHONPATH, set by main, and the
    working directory); its wall time and memory."""
    code = Path(os.environ["PYTHONPATH"])
    env = dict(os.environ, PEAK_FILE=str(work / "_peak.json"), RAY_ADDRESS=mode.address)
    # one thread per task in both runs (ray.task_cpus=1): reductions split over threads round differently, and the
    # runs are compared byte for byte
    cmd = [sys.executable, str(code / "_peak.py"), "build", stage, f"work_dir={work}", *extra]
    log = work / f"_log-{stage}.txt"
    t0 = time.time()
    with TaskWatch() as watch, open(log, "a") as fh:
        rc = subprocess.run(cmd, env=env, cwd=code, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"{stage} on {mode.name} failed (exit {rc}):\n{log.read_text()[-3000:]}")
    driver = json.loads((work / "_peak.json").read_text())
    (work / "_peak.json").unlink()
    return Run(wall, driver, watch.anon / 1024, watch.file / 1024, watch.calls_s)


@dataclass
class Units:
    """What the `_done` markers of a stage and its steps say."""
    count: int = 0
    seconds: float = 0.0
    pair_seconds: float = 0.0  # dedup's `_pairs` step: the part that scales with dedup.cluster_size
    anon_mb: float = 0.0
    file_mb: float = 0.0
    read: int = 0
    written: int = 0
    measured: int = 0  # markers holding the per-unit fields
    anon_step: str = ""  # the step whose unit had the largest anonymous peak


def units_of(stage_dir: Path) -> Units:
    u = Units()
    for m in stage_dir.rglob("_done/*.json"):
        r = json.loads(m.read_text())
        u.count += 1
        u.seconds += r.get("seconds", 0.0)
        if "_pairs" in m.parts:
            u.pair_seconds += r.get("seconds", 0.0)
        if "worker_peak_anon_mb" in r:
            u.measured += 1
            if r["worker_peak_anon_mb"] > u.anon_mb:
                u.anon_mb = r["worker_peak_anon_mb"]
                u.anon_step = "/".join(m.relative_to(stage_dir).parts[:-2]) or "output"
            u.file_mb = max(u.file_mb, r["worker_peak_file_mb"])
            u.read += r["unit_io_bytes"].get("rchar", 0)
            u.written += r["unit_io_bytes"].get("write_bytes", 0)
    return u


def stage_seconds(stage_dir: Path) -> float:
    """The stage's time inside the driver: from its `_config.json` (written when it begins) to its manifest (written
    when it ends). Ray's start, the imports and the shutdown are outside, with none of the noise of subtracting a
    second process's start-up."""
    return (stage_dir / "manifest.json").stat().st_mtime - (stage_dir / "_config.json").stat().st_mtime


@dataclass
class Result:
    items: int
    work: float  # stage_seconds
    units: Units
    run: Run

    @property
    def overhead(self) -> float:
        """The process's wall time outside the stage: interpreter, imports, Ray's start or connect, shutdown."""
        return max(0.0, self.run.wall - self.work)

    @property
    def calls(self) -> float:
        return self.run.calls_s

    @property
    def rest(self) -> float:
        """Work seconds in neither a unit nor a reduction: worker starts, the driver's dispatch and bookkeeping."""
        return max(0.0, self.work - self.units.seconds - self.run.calls_s)

    @property
    def anon(self) -> float:
        return max(self.units.anon_mb, self.run.task_anon_mb)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every output file, without the files that record times, paths or process ids."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix != ".txt" and p.name not in ("manifest.json", "_config.json") \
                and "_done" not in p.parts and not p.name.startswith(("_log", "_peak", ".")):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def removed_ids(stage_dir: Path) -> set:
    import pyarrow.parquet as pq

    out = set()
    for f in sorted(stage_dir.glob("removed-*.parquet")):
        out.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return out


def items_in(stage_dir: Path) -> int:
    return int(json.loads((stage_dir / "manifest.json").read_text())["counts"]["n_in"])


def fit_exponent(sizes: list[float], values: list[float]) -> float:
    v = np.maximum(np.asarray(values, float), 1e-3)
    return float(np.polyfit(np.log(sizes), np.log(v), 1)[0])


@contextlib.contextmanager
def ray_instance(mode: Mode) -> Iterator[None]:
    """`mode`'s Ray instance on this machine while the block runs (ray.cluster_utils): 1 node = a head of 1 CPU; 2
    nodes = a head of 0 CPUs and 2 nodes of 1 CPU. Each stage's driver joins it (RAY_ADDRESS), so Ray's start is
    paid once per pool and mode, not per stage. Every node must advertise 127.0.0.1."""
    import ray
    from ray.cluster_utils import Cluster

    store = {"include_dashboard": False, "object_store_memory": 300 * 2 ** 20}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1 if mode.nodes == 1 else 0, **store})
    try:
        for _ in range(mode.nodes if mode.nodes > 1 else 0):
            c.add_node(num_cpus=1, object_store_memory=300 * 2 ** 20)
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="ERROR")
        addresses = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
        cpus = ray.cluster_resources().get("CPU", 0)
        ray.shutdown()
        if any(a != "127.0.0.1" for a in addresses) or cpus != mode.nodes:
            raise SystemExit(f"{mode.name}: nodes at {addresses} with {cpus} CPUs; wanted 127.0.0.1 only, "
                             f"{mode.nodes} CPUs")
        mode.address = c.address
        yield
    finally:
        mode.address = ""
        c.shutdown()


def cells(values: list[float], fmt: str = "{:.1f}") -> str:
    return " / ".join(fmt.format(v) for v in values)


def mem_verdict(items: list[float], anon: list[float]) -> Optional[str]:
    """Why anonymous memory per task grows with N, or None when it is flat (exponent <= MEM_EXPONENT or a rise
    under MEM_RISE_MB from the smallest to the largest pool: allocator noise)."""
    e, rise = fit_exponent(items, anon), anon[-1] - anon[0]
    if e > MEM_EXPONENT and rise > MEM_RISE_MB:
        return f"anon RSS per task grows with N (+{rise:.0f} MiB, exponent {e:.2f})"
    return None


def report(res: dict, sizes: list[int], modes: list[str], bound_mb: Optional[float]
           ) -> tuple[str, dict[str, list[str]]]:
    """The measured tables and, per stage, why it fails its targets (empty: it meets them)."""
    bound_note = "" if bound_mb is None else (
        f" A dedup pair unit's configured bound at these settings: {bound_mb:.0f} MiB of working memory above its "
        "process's baseline (semdedup.task_memory_bound).")
    fails: dict[str, list[str]] = {s: [] for s in STAGES}
    size_head = " / ".join(f"{n:,}" for n in sizes)
    t = [f"Seconds at {size_head} images: the stage inside its driver (work), the units' own (sum over units, so "
         "above work where units ran in parallel), the reductions and fits the driver waits on, the rest (worker "
         "starts, dispatch); the process's overhead outside the stage (imports, Ray's start or connect). Exponents "
         "on items into the stage.", "",
         "| stage | items in | mode | work s | in units s | in reductions and fits s | rest s | process overhead s | "
         "units | time exponent | units exponent | speed-up 2 nodes vs 1 (largest) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in STAGES:
        for mode in modes:
            r = [res[(s, n, mode)] for n in sizes]
            items = [x.items for x in r]
            e_t = fit_exponent(items, [x.work for x in r])
            e_u = fit_exponent(items, [x.units.seconds for x in r])
            speed = ""
            if mode != modes[0]:
                speed = f"{res[(s, sizes[-1], modes[0])].work / max(1e-3, r[-1].work):.2f}x"
            elif e_t > TIME_TARGET:
                fails[s].append(f"time exponent {e_t:.2f} > {TIME_TARGET}")
            t.append(f"| {s} | {cells(items, '{:,}')} | {mode} | {cells([x.work for x in r])} | "
                     f"{cells([x.units.seconds for x in r])} | {cells([x.calls for x in r])} | "
                     f"{cells([x.rest for x in r])} | {cells([x.overhead for x in r])} | "
                     f"{cells([x.units.count for x in r], '{:,}')} | {e_t:.2f} | {e_u:.2f} | {speed} |")
    m = ["", "Memory per task (MiB) at the same sizes: anonymous peak of a unit's process (markers), of any busy Ray "
         "worker process (sampled; reductions and fits included), file-backed peak apart; the driver's anonymous "
         f"peak.{bound_note}", "",
         "| stage | mode | unit anon | any task anon | unit file-backed | driver anon | verdict |",
         "|---|---|---|---|---|---|---|"]
    for s in STAGES:
        for mode in modes:
            r = [res[(s, n, mode)] for n in sizes]
            items = [x.items for x in r]
            why = [w for w in (mem_verdict(items, [x.units.anon_mb for x in r]),
                               mem_verdict(items, [x.run.task_anon_mb for x in r])) if w]
            if why and why[0] not in fails[s]:
                fails[s].append(why[0])
            m.append(f"| {s} | {mode} | {cells([x.units.anon_mb for x in r], '{:.0f}')} | "
                     f"{cells([x.run.task_anon_mb for x in r], '{:.0f}')} | "
                     f"{cells([x.units.file_mb for x in r], '{:.0f}')} | "
                     f"{cells([x.run.driver.get('anon_mb', 0.0) for x in r], '{:.0f}')} | "
                     f"{'FAILS target: ' + why[0] if why else 'flat'} |")
    io_t = ["", f"Bytes per stage ({modes[0]}; MB; read = rchar, written = write_bytes, summed over units).", "",
            "| stage | read MB | written MB | read B per item (largest) | written B per item (largest) |",
            "|---|---|---|---|---|"]
    for s in STAGES:
        r = [res[(s, n, modes[0])] for n in sizes]
        io_t.append(f"| {s} | {cells([x.units.read / 1e6 for x in r])} | {cells([x.units.written / 1e6 for x in r])}"
                    f" | {r[-1].units.read / max(1, r[-1].items):,.0f} | {r[-1].units.written / max(1, r[-1].items):,.0f}"
                    f" |")
    return "\n".join(t + m + io_t), fails


@dataclass
class Assumed:
    """A stage not run here: its items at the paper's size, a rate per resource and the reason for it."""
    stage: str
    items: float
    rate: float  # items per second per `per`
    per: str     # "A100", "core" or "node"
    why: str


ASSUMED = (
    Assumed("extract", 2.13e9, 2500, "core", "sentences split by pysbd (~2,700 sentences/s of ~20-word sentences on "
            "one core of this machine in a check during development, not measured by this script)"),
    Assumed("download", 353e6, 1350, "node", "URLs fetched by img2dataset: its own published ~1,350 images/s per "
            "machine (network-bound; docs/benchmarks.md download_throughput could not show it on 2 shared cores)"),
    Assumed("image_filter", 336e6, 500, "core", "one JPEG decode (~2 ms for a downloaded, resized image) per image"),
    Assumed("embed_images", 285e6, 55, "A100", "EVA02-CLIP E/14-plus image tower: 4.4B params x 257 tokens x 2 = "
            "2.3 TFLOP per image at 224 px, bf16 at 125 TFLOP/s (40% of the A100's 312)"),
    Assumed("sentence_filter", 2.13e9, 775, "core", "spaCy CAT parse: 1,162 sentences/s per process measured by "
            "benchmarks/cat_parse.py (docs/benchmarks.md, 8-14-word sentences), / 1.5 for OBELICS's ~20 words"),
    Assumed("wordcount", 1.82e9, 100_000, "core", "word split and count per sentence in Python (~10 us); items: the "
            "sentences into the paper's semantic step, 1.16B / (1 - 0.363)"),
    Assumed("entropy", 1.82e9, 100_000, "core", "as wordcount, plus a lookup per word"),
    Assumed("perplexity", 1.82e9, 240, "A100", "GPT-2 large, 774M params x 2 = 1.55 GFLOP per token, ~32 tokens per "
            "sentence with BOS and padding, fp32 (perplexity.precision '32') at 12 TFLOP/s (60% of the A100's 19.5); "
            "items: all sentences into entropy, an upper bound"),
    Assumed("embed_sentences", 1.16e9, 1170, "A100", "EVA02-CLIP E/14-plus text tower: 695M params x 77 tokens x 2 "
            "= 107 GFLOP per sentence, bf16 at 125 TFLOP/s"),
    Assumed("mine_tags", 0.84e9, 50_000, "core", "noun-phrase runs per sentence in Python (~20 us); its reduce (hash "
            "partitions of the phrases, mine_tags.partitions tasks) is not modelled"),
    Assumed("caption", 198e6, 280, "A100", "BLIP base, beam 3, 30 new tokens: ~30 sequential decoder steps of ~15 ms "
            "per batch of 128 images (generate() bound, not FLOP bound)"),
    Assumed("tag", 198e6, 8000, "A100", "stored image embeddings x 8,000 tag embeddings x d 1024 x 2 = 16 GFLOP per "
            "image at 125 TFLOP/s (tag reuses the embed_images embeddings)"),
    Assumed("syn_text", 198e6, 16, "A100", "LLaMA-3-8B with the hf backend (the preset's), batch 64: ~350 prompt "
            "tokens (1.8 s prefill per batch at 200 TFLOP/s) + ~60 new tokens (~35 ms per step): ~4 s per 64 "
            "records; vLLM would give ~3x"),
    Assumed("embed_syn_text", 198e6, 1170, "A100", "as embed_sentences"),
)
ORDER = ("extract", "download", "image_filter", "embed_images", "dedup_images", "sentence_filter", "wordcount",
         "entropy", "perplexity", "embed_sentences", "dedup_sentences", "cluster", "retrieve", "mine_tags", "caption",
         "tag", "syn_text", "embed_syn_text", "balance", "write")
WRITE_CODEC_S = 0.005  # assumed: decode a stored image, resize to 224 px, JPEG-encode at q95, per sample on one core


@dataclass
class Line:
    stage: str
    items: float
    hours: float      # resource-hours (core, A100 or node)
    per: str
    wall_h: float
    how: str


def project_measured(s: str, res: dict, sizes: list[int], mode: str, dim: int, cs: int) -> Line:
    """A stage measured here, at the paper's items: the units' seconds spread over the cluster's cores, the
    reductions and fits serial, the rest (worker starts, dispatch) as at the largest size."""
    r = [res[(s, n, mode)] for n in sizes]
    items = [x.items for x in r]
    ratio = PAPER[s] / items[-1]
    g = D_PAPER / dim if s != "write" else 1.0  # products and embedding bytes grow with d; write reads no embeddings
    e_u = max(1.0, fit_exponent(items, [x.units.seconds for x in r]))
    # reductions are timed by 50 ms samples: fitted only where every size has a second of them, else linear
    e_c = max(1.0, fit_exponent(items, [x.calls for x in r])) if min(x.calls for x in r) >= 1.0 else 1.0
    pairs = r[-1].units.pair_seconds
    units = (r[-1].units.seconds - pairs + pairs * CS_PAPER / cs) * ratio ** e_u * g
    calls = r[-1].calls * ratio ** e_c * g
    codec = PAPER[s] * WRITE_CODEC_S if s == "write" else 0.0
    cores = NODES * CORES_PER_NODE
    wall = (units + codec) / cores + calls + r[-1].rest
    scale = f" x ({PAPER[s]:.3g} / {items[-1]:,})"
    how = (f"measured: units {r[-1].units.seconds:.1f} s{scale}^{e_u:.2f}" + (f" x d {D_PAPER}/{dim}" if g != 1 else "")
           + (f" (pairs step x cluster_size {CS_PAPER}/{cs})" if pairs and cs != CS_PAPER else "")
           + f" / {cores} cores + reductions and fits {r[-1].calls:.1f} s{scale}^{e_c:.2f}"
           + (" x d" if g != 1 else "") + f" (serial) + rest {r[-1].rest:.1f} s"
           + (f" + {WRITE_CODEC_S * 1e3:.0f} ms codec per sample (assumed) / cores" if codec else ""))
    return Line(s, PAPER[s], (units + codec + calls + r[-1].rest) / 3600, "core", wall / 3600, how)


def project_assumed(a: Assumed) -> Line:
    count = {"A100": NODES * GPUS_PER_NODE, "core": NODES * CORES_PER_NODE, "node": NODES}[a.per]
    hours = a.items / a.rate / 3600
    return Line(a.stage, a.items, hours, a.per, hours / count,
                f"(assumed) {a.rate:,.0f} items/s per {a.per}: {a.why}")


def projection(res: dict, sizes: list[int], mode: str, dim: int, cs: int, fails: dict[str, list[str]]) -> str:
    assumed = {a.stage: a for a in ASSUMED}
    # a run of some stages (BENCH_STAGES) projects those and the assumed ones; the others are left out
    lines = [project_measured(s, res, sizes, mode, dim, cs) if s in STAGES else project_assumed(assumed[s])
             for s in ORDER if s in STAGES or s in assumed]
    out = [f"Projection: `build all` at the paper's size on {NODES} nodes x {GPUS_PER_NODE} A100-80GB, "
           f"{CORES_PER_NODE} cores and {RAM_GB_PER_NODE} GB RAM each ({NODES * CORES_PER_NODE} cores, "
           f"{NODES * GPUS_PER_NODE} GPUs), a parallel filesystem; stages one after another as the driver runs them.",
           "", "| stage | items | resource-hours | wall h | target | formula |", "|---|---|---|---|---|---|"]
    for ln in lines:
        verdict = ("FAILS target: " + "; ".join(fails[ln.stage])) if fails.get(ln.stage) else (
            "met" if ln.stage in STAGES else "-")
        out.append(f"| {ln.stage} | {ln.items:.3g} | {ln.hours:,.1f} {ln.per} | {ln.wall_h:.2f} | {verdict} | "
                   f"{ln.how} |")
    gpu_h = sum(ln.hours for ln in lines if ln.per == "A100")
    cpu_h = sum(ln.hours for ln in lines if ln.per == "core")
    total = sum(ln.wall_h for ln in lines)
    bound = pair_unit_bound_mb(200_000, DEPLOYED["dedup.pair_chunk"], D_PAPER)
    paper_bound = "" if bound is None else f": a dedup pair unit {bound / 1024:.1f} GiB (semdedup.task_memory_bound)"
    out += ["", f"**Whole build: {total:.1f} h wall** ({gpu_h:,.0f} A100-hours of inference, {cpu_h:,.0f} core-hours, "
            f"download {sum(ln.wall_h for ln in lines if ln.per == 'node'):.1f} h).",
            "", "Assumptions of the projection: items per stage from the paper (336M images downloaded of 353M URLs, "
            "2.13B sentences, 285M images / 1.16B sentences into dedup, 0.84B sentences into cluster with k=2M, 198M "
            "images into retrieve and balance, 15M written); a stage measured here scales its units' seconds by "
            "(paper items / items at the largest size)^e, e the units' fitted exponent (taken as 1 when fitted below "
            "1: every item is touched), and by d 1024 / the benchmark's d (products and embedding bytes are linear in "
            "d; bookkeeping is not, so this is pessimistic there), dedup's pair step also by the paper's "
            "cluster_size / the benchmark's (pairs per item grow with it); k grows with N at the paper's items per "
            "cluster in both, so it is inside the fitted exponent; per-item time does not depend on shard size "
            "(bigger shards only amortise per-unit overheads); units spread over every core (Ray hands them out as "
            "cores free up; every step but the reductions has far more units than cores at the paper's size); the "
            "reductions and fits the driver waits on (ray::run_call tasks, timed by sampling) scale the same way, "
            "exponent at least 1, and run serially; the rest (worker starts, the driver's dispatch and bookkeeping) is "
            "taken as at the largest size (the driver's dispatch of the paper's ~64k units is ~1 min in all: "
            "benchmarks/ray_executor.py); the CPU stages use no GPU (their products have a GPU path, not measured here); "
            "model stages take the assumed rates in their rows, on all 128 A100s with no idle time; stages do not "
            "overlap. Memory per task is not extrapolated: the tables above show whether it is flat in N at fixed "
            "per-unit settings; at the paper's per-unit settings (" + ", ".join(f"{k}={v:,}" for k, v in
                                                                              DEPLOYED.items())
            + f", dedup.bucket_items=200,000) a unit holds what those bound (config.py){paper_bound}, against "
            f"{RAM_GB_PER_NODE // CORES_PER_NODE} GB per core of the stated nodes."]
    return "\n".join(out)


def pair_unit_bound_mb(bucket_items: int, pair_chunk: int, width: int, block: int = 1024) -> Optional[float]:
    """A dedup pair unit's working memory at most (semdedup.task_memory_bound), MiB; None where realsyn_pl has none."""
    try:
        from realsyn_pl.construct.extract.semdedup import task_memory_bound
    except ImportError:
        return None
    return task_memory_bound(bucket_items, block, pair_chunk, width) / 2 ** 20


def run_size(n_img: int, a: argparse.Namespace, root: Path, modes: dict[str, Mode], res: dict, checks: list
             ) -> list[str]:
    """Both modes' runs of one pool size; returns the settings they ran with."""
    f = a.shard_scale
    per = max(1, round(PAPER_ROWS_PER_FILE * f))
    shape = Shape(n_img, n_img * a.sentences_per_image, a.dim, per, per * a.sentences_per_image)
    pool = root / f"pool-{n_img}"
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # the synthetic stages' one-line summaries
        planted, survivors = make_pool(pool, shape, a.dense_groups, a.dense_fraction)
    print(f"[bench] pool {n_img:,} images / {shape.n_sent:,} sentences in {shape.shards} shards: "
          f"{time.time() - t0:.1f} s", flush=True)
    extra = overrides(a.dedup_cluster_size, survivors)
    digests = {}
    for name, mode in modes.items():
        work = root / f"run-{n_img}-{name.replace(' ', '')}"
        shutil.copytree(pool, work)
        with ray_instance(mode):
            for stage in STAGES:
                run = launch(stage, work, mode, extra)
                r = Result(items_in(work / stage), stage_seconds(work / stage), units_of(work / stage), run)
                res[(stage, n_img, name)] = r
                if r.units.measured < r.units.count:  # a marker written outside a measured window (memory.py)
                    print(f"[bench] warning: {stage}: {r.units.count - r.units.measured} of {r.units.count} units "
                          "recorded no per-unit memory", flush=True)
                print(f"[bench] {n_img:,} images, {name}, {stage}: work {r.work:.1f} s (units "
                      f"{r.units.seconds:.1f} s), anon per task {r.anon:.0f} MiB, {r.items:,} items, "
                      f"{r.units.count} units", flush=True)
        digests[name] = {s: tree_digest(work / s) for s in STAGES}
        for kind, pl in planted.items():
            for row in pl.score(removed_ids(work / kind)):
                checks.append((f"{n_img:,}", name, kind, *row))
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work)
    names = list(modes)
    if len(names) > 1:
        for s in STAGES:
            same = digests[names[0]][s] == digests[names[1]][s]
            checks.append((f"{n_img:,}", f"{names[0]} vs {names[1]}", s, "same bytes" if same else "DIFFERENT",
                           "", "", ""))
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(pool)
    return extra


K_KEYS = ("cluster.k=", "balance.k=")


def k_per_size(settings: list[list[str]]) -> str:
    """'cluster.k = a / b / c, balance.k = ...': the settings that differ between the pools."""
    return ", ".join(f"{key[:-1]} = " + " / ".join(f"{int(o[len(key):]):,}" for run in settings for o in run
                                                     if o.startswith(key)) for key in K_KEYS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="22000,44000,88000",
                    help="three pool sizes; the defaults put 0.9 N exact survivors just under a multiple of "
                         "dedup.cluster_size, so every dedup cluster is ~cluster_size at every size")
    ap.add_argument("--sentences-per-image", type=int, default=4)  # paper at the dedup input: 1.16B / 285M = 4.07
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--shard-scale", type=float, default=0.025,
                    help="rows per shard = the paper's per OBELICS file at the dedup input x this")
    ap.add_argument("--dense-groups", type=int, default=2)
    ap.add_argument("--dense-fraction", type=float, default=0.03)
    ap.add_argument("--dedup-cluster-size", type=int, default=CS_PAPER)
    ap.add_argument("--modes", default="1,2", help="simulated nodes of 1 CPU each, per run (1 and 2)")
    ap.add_argument("--dedup-mode", default="absolute", choices=("absolute", "quantile"),
                    help="quantile: as the paper preset runs it (the threshold found for a removal fraction, every "
                         "pair under dedup.max_threshold folded by distance); absolute: a fixed distance")
    a = ap.parse_args()
    global DEDUP_MODE
    DEDUP_MODE = a.dedup_mode
    from _common import append_result, scratch_dir

    sizes = [int(s) for s in a.images.split(",")]
    root = scratch_dir("bench-build-scale-")
    code = snapshot_code(root)
    # before the simulated cluster starts: its raylets, hence its workers, inherit it
    os.environ["PYTHONPATH"] = str(code)
    sys.path.insert(0, str(code))
    load_before, started = os.getloadavg()[0], time.time()
    modes = {f"{m} node{'s' if m > 1 else ''}": Mode(f"{m} node{'s' if m > 1 else ''}", m)
             for m in (int(x) for x in a.modes.split(","))}
    res: dict = {}
    checks: list = []
    settings: list[list[str]] = []
    for n_img in sizes:
        settings.append(run_size(n_img, a, root, modes, res, checks))
    total = time.time() - started
    names = list(modes)
    bound = pair_unit_bound_mb(2 * a.dedup_cluster_size, UNIT["dedup.pair_chunk"], a.dim)
    table, fails = report(res, sizes, names, bound)
    checks_md = "\n".join(["| pool | mode | stage | planted kind / bytes | planted groups | found | other ids removed |",
                           "|---|---|---|---|---|---|---|"] + [f"| {' | '.join(str(c) for c in row)} |"
                                                               for row in checks])
    proj = projection(res, sizes, names[0], a.dim, a.dedup_cluster_size, fails)
    failing = [f"{s}: {'; '.join(w)}" for s, w in fails.items() if w]
    verdict = ("FAILS target: " + " | ".join(failing)) if failing else (
        f"every stage meets its targets (time exponent <= {TIME_TARGET}, anonymous memory per task flat in N)")
    per = max(1, round(PAPER_ROWS_PER_FILE * a.shard_scale))
    notes = (f"Pools: {', '.join(f'{n:,}' for n in sizes)} images with {a.sentences_per_image}x as many sentences, "
             f"d={a.dim}; {per:,} images / {per * a.sentences_per_image:,} sentences per shard (the paper's "
             f"~{PAPER_ROWS_PER_FILE:,.0f} images per OBELICS file at the dedup input x {a.shard_scale}: rows per "
             f"shard fixed, shard count growing with N as the real data's does at a fixed factor); planted "
             f"{EXACT:.0%} exact and {NEAR:.0%} near copies, {a.dense_groups} dense groups holding "
             f"{a.dense_fraction:.0%} of each pool (templated sentences in the sentence pool). Settings: "
             f"{' '.join(o for o in settings[-1] if not o.startswith(K_KEYS))}; {k_per_size(settings)} (k: "
             f"expected sentences into cluster / {SENTENCES_PER_CLUSTER}, expected in-window images / "
             f"{IMAGES_PER_CLUSTER}). Time "
             f"target: exponent <= {TIME_TARGET} (1 node); memory target: anonymous peak per task flat in N (grows = "
             f"fitted exponent > {MEM_EXPONENT} and more than {MEM_RISE_MB:.0f} MiB from the smallest to the largest "
             f"pool). Verdict: {verdict}. Whole benchmark {total / 60:.1f} min; load average {load_before:.1f} "
             f"before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} cores).")
    print(table, "\n\n", checks_md, "\n\n", proj, "\n\n", notes, flush=True)
    if not os.environ.get("BENCH_DRY"):
        mode = "" if DEDUP_MODE == "absolute" else f" (dedup.mode={DEDUP_MODE}; stages {', '.join(STAGES)})"
        append_result("build_scale: the paper-shaped build at three sizes, 1 node vs 2 simulated nodes, projected to "
                      f"the paper{mode}", table + "\n\n" + checks_md + "\n\n" + proj, notes)


if __name__ == "__main__":
    main()
