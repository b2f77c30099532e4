"""Stages `wordcount` (map: word counts per sentence shard) and `entropy` (reduce + filter), paper Eq. 1.

theta(x) = -sum_{i=1..n} p(x_i) log p(x_i), over the n words of the sentence (repeats count), p(w) = count(w) /
total words in the whole (quality-filtered) sentence pool. Drop theta < entropy.threshold (0.3). Choices the paper
leaves open: words as in sentence_filters.words, lower-cased (entropy.lowercase), natural log (entropy.log_base).
The un-normalised sum means short sentences and sentences made of rare words score low, as the paper's threshold
assumes. The vocabulary (tens of millions of words at the paper's scale) is never one dict: `wordcount` writes each
shard's (word, count, key = hash64(word)) sorted by key; `entropy/_vocab/` reduces entropy.partitions key ranges
(one task each, the files' other row groups skipped by their statistics) into (key, count) arrays sorted by key;
a worker looks up only its shard's distinct words there (a binary search on memory maps). Two words sharing a
64-bit key (about 1 in 10^5 for 5e7 words) would share a count.
Log base: theta_b = theta_e / ln(b), so the same threshold drops more sentences in base 10 than in base e or 2.
entropy.mode=quantile drops the `quantile` lowest-theta fraction instead: the threshold is that quantile over a
seeded sample of whole shards (`quantile_sample` sentences), computed once per worker process, identically
everywhere, so no task waits for another; the manifest's `entropy_threshold` records the value and the sample.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.arrays import save_npy
from realsyn_pl.construct.engine.config import BuildConfig, EntropyConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.mapping import map_shard
from realsyn_pl.construct.engine.memo import per_process
from realsyn_pl.construct.engine.partition import hash64, key_range
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


VOCAB = np.dtype([("key", "<u8"), ("count", "<i8")])


def count_shard(in_path: Path, out_path: Path, lowercase: bool) -> Counts:
    c, counts = Counter(), Counts()
    for row in iter_rows(in_path, ["text"]):
        c.update(tokens(row["text"], lowercase))
        counts.keep()
    words_ = list(c)
    key = hash64(w.encode() for w in words_)
    order = np.argsort(key, kind="stable")
    table = pa.table({"word": pa.array([words_[j] for j in order], pa.string()),
                      "count": pa.array([c[words_[j]] for j in order], pa.int64()),
                      "key": pa.array(key[order], pa.uint64())})
    write_table(out_path, table, row_group_size=max(1024, len(words_) // 64))  # row groups for the key ranges
    counts.produce("words", sum(c.values()))
    return counts


def reduce_vocab(count_paths: Iterable[Path], p: int, parts: int, out: Path) -> int:
    """Partition p's words (keys in its range) summed over every shard -> (key, count) sorted by key. Returns how
    many distinct words."""
    lo, hi = key_range(p, parts)
    key_ = pc.field("key")
    filters = key_ >= pa.scalar(lo, pa.uint64())  # as uint64 scalars: a key above 2^63 is no int64
    if hi is not None:
        filters = filters & (key_ < pa.scalar(hi, pa.uint64()))
    keys, counts = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
    for path in count_paths:
        t = pq.read_table(path, columns=["key", "count"], filters=filters)
        keys.append(t.column("key").to_numpy())
        counts.append(t.column("count").to_numpy())
    uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
    rec = np.zeros(len(uniq), VOCAB)
    rec["key"], rec["count"] = uniq, np.bincount(inv, weights=np.concatenate(counts), minlength=len(uniq))
    save_npy(out, rec)
    return len(rec)


def shard_probabilities(vocab_paths: list[Path], parts: int, total: int, words_: Iterable[str]) -> dict[str, float]:
    """p(w) = count(w) / total for the given words, read from the partitions' sorted (key, count) arrays."""
    uniq = sorted(set(words_))
    if not uniq or not total:
        return {}
    key = hash64(w.encode() for w in uniq)
    starts = np.array([key_range(p, parts)[0] for p in range(parts)], np.uint64)
    part = np.searchsorted(starts, key, "right") - 1
    count = np.zeros(len(uniq), np.int64)
    for p in np.unique(part).tolist():
        arr = np.load(vocab_paths[p], mmap_mode="r", allow_pickle=False)
        sel = np.flatnonzero(part == p)
        at = np.minimum(np.searchsorted(arr["key"], key[sel]), max(0, len(arr) - 1))
        hit = (np.asarray(arr["key"][at]) == key[sel]) if len(arr) else np.zeros(len(sel), bool)
        count[sel[hit]] = arr["count"][at[hit]]
        del arr
    return {w: c / total for w, c in zip(uniq, count.tolist()) if c}


def corpus_probabilities(count_dir: Path, indices: Iterable[int]) -> dict[str, float]:
    """Every word's probability in one dict: for small pools and tests (the stage looks words up per shard)."""
    total: Counter = Counter()
    for i in indices:
        t = pq.read_table(count_dir / f"counts-{i:05d}.parquet")
        total.update(dict(zip(t.column("word").to_pylist(), t.column("count").to_pylist())))
    n = sum(total.values())
    return {w: c / n for w, c in total.items()} if n else {}


def quantile_threshold(in_dir: Path, indices: list[int], prob_of: Callable[[Iterable[str]], Mapping[str, float]],
                       e: EntropyConfig) -> dict[str, float | int]:
    """theta's `e.quantile` over whole shards taken in a seeded order until `e.quantile_sample` sentences;
    `prob_of(words)`: the probabilities of a shard's words."""
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
        toks = [tokens(r["text"], e.lowercase) for r in iter_rows(in_dir / f"sentences-{i:05d}.parquet", ["text"])]
        prob = prob_of(w for t in toks for w in t)
        thetas += [sentence_entropy(t, prob, e.log_base) for t in toks]
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
    if e.partitions < 1:
        raise StageError(f"entropy.partitions must be >= 1, got {e.partitions}")
    if stage.skip_complete(cfg.force):
        return True
    stage.begin(cfg.force)
    parts = e.partitions
    vocab_st = stage.sub("_vocab", {"partitions": parts, "of": stage.hash})
    count_paths = [count_dir / f"counts-{i:05d}.parquet" for i in count_indices]

    def vocab(p: int) -> Counts:
        c = Counts()
        c.produce("words", reduce_vocab(count_paths, p, parts, vocab_st.path("vocab", p, "npy")))
        return c

    run_sharded(ex, vocab_st, range(parts), vocab)
    vocab_paths = [vocab_st.path("vocab", p, "npy") for p in range(parts)]
    total = int(json.loads((count_dir / "manifest.json").read_text())["counts"]["produced"].get("words", 0))

    def prob_of(words_: Iterable[str]) -> dict[str, float]:
        return shard_probabilities(vocab_paths, parts, total, words_)

    def threshold() -> dict:
        return per_process(f"{stage.hash}/threshold", lambda: quantile_threshold(in_dir, indices, prob_of, e)
                           if e.mode == "quantile" else {"threshold": e.threshold})

    def work(i: int) -> Counts:
        path = in_dir / f"sentences-{i:05d}.parquet"
        t = threshold()["threshold"]
        p = prob_of(w for r in iter_rows(path, ["text"]) for w in tokens(r["text"], e.lowercase))

        def row_fn(r):
            theta = sentence_entropy(tokens(r["text"], e.lowercase), p, e.log_base)
            return entropy_reason(theta, t) or {**r, "entropy": theta}
        return map_shard(path, stage.path("sentences", i), SCORED_SENTENCES, row_fn)

    return run_sharded(ex, stage, indices, work,  # begun above: force must not wipe _vocab again
                       extra=lambda _: {"entropy_threshold": {"mode": e.mode, "log_base": e.log_base, **threshold()}})
