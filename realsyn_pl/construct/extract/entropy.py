"""Stages `wordcount` (map: word counts per sentence shard) and `entropy` (reduce + filter), paper Eq. 1.

theta(x) = -sum_{i=1..n} p(x_i) log p(x_i), over the n words of the sentence (repeats count), p(w) = count(w) /
total words in the whole (quality-filtered) sentence pool. Drop theta < entropy.threshold (0.3). Choices the paper
leaves open: words as in sentence_filters.words, lower-cased (entropy.lowercase), natural log (entropy.log_base).
The un-normalised sum means short sentences and sentences made of rare words score low, as the paper's threshold
assumes. The reduce keeps the vocabulary in one dict (tens of millions of words fit in RAM at the paper's scale).
Log base: theta_b = theta_e / ln(b), so the same threshold drops more sentences in base 10 than in base e or 2.
entropy.mode=quantile drops the `quantile` lowest-theta fraction instead: the threshold is that quantile over a
seeded sample of whole shards (`quantile_sample` sentences). The vocabulary and the threshold are computed once per
worker process, identically everywhere, so no task waits for another; the manifest's `entropy_threshold` records
the value and the sample.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.config import BuildConfig, EntropyConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.mapping import map_shard
from realsyn_pl.construct.engine.memo import per_process
from realsyn_pl.construct.engine.records import iter_rows, write_table
from realsyn_pl.construct.engine.schemas import SCORED_SENTENCES
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices
from realsyn_pl.construct.extract.sentence_filters import words

COUNT_NAME, NAME, INPUT = "wordcount", "entropy", "sentence_filter"
LOGS = {"e": math.log, "2": math.log2, "10": math.log10}


def tokens(text: str, lowercase: bool) -> list[str]:
    w = words(text)
    return [x.lower() for x in w] if lowercase else w


def sentence_entropy(toks: Iterable[str], prob: Mapping[str, float], log_base: str = "e") -> float:
    log = LOGS[log_base]
    return -sum(prob[t] * log(prob[t]) for t in toks if prob.get(t, 0.0) > 0.0)


def entropy_reason(theta: float, threshold: float) -> str | None:
    """Drop theta < threshold (paper: 0.3); theta == threshold is kept."""
    return "low_entropy" if theta < threshold else None


def count_shard(in_path: Path, out_path: Path, lowercase: bool) -> Counts:
    c, counts = Counter(), Counts()
    for row in iter_rows(in_path, ["text"]):
        c.update(tokens(row["text"], lowercase))
        counts.keep()
    items = sorted(c.items())
    write_table(out_path, pa.table({"word": pa.array([w for w, _ in items], pa.string()),
                                    "count": pa.array([n for _, n in items], pa.int64())}))
    counts.produce("words", sum(c.values()))
    return counts


def corpus_probabilities(count_dir: Path, indices: Iterable[int]) -> dict[str, float]:
    total: Counter = Counter()
    for i in indices:
        t = pq.read_table(count_dir / f"counts-{i:05d}.parquet")
        total.update(dict(zip(t.column("word").to_pylist(), t.column("count").to_pylist())))
    n = sum(total.values())
    return {w: c / n for w, c in total.items()} if n else {}


def quantile_threshold(in_dir: Path, indices: list[int], prob: Mapping[str, float], e: EntropyConfig
                       ) -> dict[str, float | int]:
    """theta's `e.quantile` over whole shards taken in a seeded order until `e.quantile_sample` sentences."""
    shards = json.loads((in_dir / "manifest.json").read_text())["shards"]
    order = np.random.default_rng(e.seed).permutation(len(indices))
    thetas: list[float] = []
    used = 0
    for j in order:
        if len(thetas) >= e.quantile_sample:
            break
        i = indices[int(j)]
        if shards[f"{i:05d}"]["counts"]["n_out"] == 0:
            continue
        thetas += [sentence_entropy(tokens(r["text"], e.lowercase), prob, e.log_base)
                   for r in iter_rows(in_dir / f"sentences-{i:05d}.parquet", ["text"])]
        used += 1
    if not thetas:
        return {"threshold": 0.0, "sample": 0, "sample_shards": 0}
    t = np.sort(np.asarray(thetas, np.float64))
    # drop theta < t[floor(q m)]: the q*m lowest (fewer where values tie at the cut)
    return {"threshold": float(t[min(len(t) - 1, int(e.quantile * len(t)))]), "sample": len(t),
            "sample_shards": used, "quantile": e.quantile}


def run_wordcount(cfg: BuildConfig, ex: Executor) -> bool:
    in_dir = Path(cfg.work_dir) / INPUT
    indices = input_indices(in_dir, "sentences")
    stage = Stage(cfg.work_dir, COUNT_NAME, {"lowercase": cfg.entropy.lowercase}, [INPUT])
    return run_sharded(ex, stage, indices, lambda i: count_shard(in_dir / f"sentences-{i:05d}.parquet",
                                                                 stage.path("counts", i), cfg.entropy.lowercase),
                       cfg.force)


def run_entropy(cfg: BuildConfig, ex: Executor) -> bool:
    e: EntropyConfig = cfg.entropy
    if e.log_base not in LOGS:
        raise StageError(f"entropy.log_base must be one of {', '.join(LOGS)}, got {e.log_base!r}")
    if e.mode not in ("absolute", "quantile") or not 0.0 <= e.quantile < 1.0:
        raise StageError(f"entropy.mode must be absolute or quantile (with 0 <= entropy.quantile < 1), got "
                         f"{e.mode!r}, quantile {e.quantile}")
    in_dir, count_dir = Path(cfg.work_dir) / INPUT, Path(cfg.work_dir) / COUNT_NAME
    indices = input_indices(in_dir, "sentences")
    count_indices = input_indices(count_dir, "counts")
    own = {"threshold": e.threshold, "log_base": e.log_base, "lowercase": e.lowercase}
    if e.mode == "quantile":
        own = {**own, "mode": e.mode, "threshold": None, "quantile": e.quantile, "quantile_sample": e.quantile_sample,
               "seed": e.seed}
    stage = Stage(cfg.work_dir, NAME, own, [INPUT, COUNT_NAME])

    def prob() -> dict[str, float]:  # the reduce, once per worker process and only if it is needed
        return per_process(f"{stage.hash}/prob", lambda: corpus_probabilities(count_dir, count_indices))

    def threshold() -> dict:
        return per_process(f"{stage.hash}/threshold", lambda: quantile_threshold(in_dir, indices, prob(), e)
                           if e.mode == "quantile" else {"threshold": e.threshold})

    def work(i: int) -> Counts:
        p, t = prob(), threshold()["threshold"]

        def row_fn(r):
            theta = sentence_entropy(tokens(r["text"], e.lowercase), p, e.log_base)
            return entropy_reason(theta, t) or {**r, "entropy": theta}
        return map_shard(in_dir / f"sentences-{i:05d}.parquet", stage.path("sentences", i), SCORED_SENTENCES, row_fn)

    return run_sharded(ex, stage, indices, work, cfg.force,
                       lambda _: {"entropy_threshold": {"mode": e.mode, "log_base": e.log_base, **threshold()}})
