"""Stage `mine_tags`: frequent nouns and noun phrases of the sentence pool become extra tags (the paper added 4,000
tags "derived from real-world sentences" to RAM++'s list; how they were mined is not said).

Map (per input shard, resumable): count candidate phrases -> `mine_tags/counts-i.parquet` {part, phrase, count}
sorted by (part, phrase), where part = a hash of the phrase's fold key (`fold_key`: a plural and its singular share
one) over mine_tags.partitions.
Reduce (per partition, resumable; `_parts/`): the partition's rows of every count file (row groups outside it are
skipped by their statistics), summed; plurals folded into singulars; count >= min_count; tags of the general list
dropped (exclude_general); its top_k -> `_parts/top-p.parquet`. A partition holds ~1/partitions of the distinct
phrases (tens of millions at the paper's 0.84B sentences, so not one process's few GB). Then one small merge
(partitions x top_k rows) writes the top_k to `mine_tags/tags.txt` (most frequent first), then the manifest.

Candidates without a POS tagger (none installs offline): the noun-phrase runs of extract/cat_rule.py (maximal runs
of content words that are not actions) that open with a determiner, number or preposition ("a red bike", "on the
street"); the head is the run's last word, phrases are its last 1..max_words words.
Heads that are adjectives, adverbs (-ly), numbers or very short words are skipped. Known gap: a verb the lists do
not know right after a noun phrase ("the window glows") is read as the phrase's head; frequency filtering and
min_count keep such noise low.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded, write_manifest
from realsyn_pl.construct.engine.partition import hash64
from realsyn_pl.construct.engine.records import iter_rows, tmp_name, write_records, write_table
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices
from realsyn_pl.construct.extract.cat_rule import ACTION_FORMS, DETERMINERS, FUNCTION_WORDS, PREPOSITIONS
from realsyn_pl.construct.extract.sentence_filters import words

NAME = "mine_tags"
PHRASE_COUNTS = pa.schema([("part", pa.int32()), ("phrase", pa.string()), ("count", pa.int64())])
PART_TOP = pa.schema([("part", pa.int32()), ("phrase", pa.string()), ("count", pa.int64()),
                      ("candidates", pa.int64())])

# Frequent adjectives / vague nouns that make poor visual tags on their own.
NOT_HEADS = set("""
new old good great best better big small large little long short high low full many much more most other same own
first last next top free real right left main nice beautiful different important available several various
time year years day days way thing things lot part kind type number people person one ones place area part
""".split())


def mined_tags_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / NAME / "tags.txt"


def phrases(text: str, max_words: int = 2) -> list[str]:
    """Candidate noun phrases of one sentence (lower-cased)."""
    toks = [t.lower() for t in words(text)]
    out: list[str] = []
    run: list[str] = []
    opener = False  # the run follows a determiner, number or preposition: a noun phrase, not a verb ("we like it")
    prev = ""
    for t in toks + [""]:  # the sentinel closes the last run
        content = t and t not in FUNCTION_WORDS and t not in ACTION_FORMS and t.isalpha()
        if content:
            if not run:
                opener = prev in DETERMINERS or prev in PREPOSITIONS or prev.isdigit()
            run.append(t)
            prev = t
            continue
        prev = t
        if run and opener:
            head = run[-1]
            if len(head) >= 3 and head not in NOT_HEADS and not head.endswith("ly"):
                for n in range(1, min(max_words, len(run)) + 1):
                    phrase = run[-n:]
                    if n == 1 or phrase[0] not in NOT_HEADS:
                        out.append(" ".join(phrase))
        run = []
    return out


def count_shard(path: Path, max_words: int) -> tuple[Counter, int]:
    counts: Counter = Counter()
    n = 0
    for row in iter_rows(path, ["text"]):
        n += 1
        counts.update(set(phrases(row["text"] or "", max_words)))  # sentence frequency: one count per sentence
    return counts, n


def fold_plurals(counts: dict[str, int]) -> dict[str, int]:
    """'dogs' joins 'dog' (and 'boxes' joins 'box') when the singular is a candidate too."""
    out = dict(counts)
    for p in sorted(counts):
        for sing in (p[:-1] if p.endswith("s") else None, p[:-2] if p.endswith("es") else None):
            if sing and sing in out and not p.endswith("ss"):
                out[sing] += out.pop(p)
                break
    return out


def select(counts: dict[str, int], top_k: int, min_count: int, exclude: Iterable[str] = ()) -> list[str]:
    skip = {" ".join(e.lower().split()) for e in exclude}
    kept = [(c, p) for p, c in counts.items() if c >= min_count and p not in skip]
    kept.sort(key=lambda cp: (-cp[0], cp[1]))
    return [p for _, p in kept[:top_k]]


def fold_key(phrase: str) -> str:
    """What a phrase shares with the singular fold_plurals may fold it into (its last 1-2 letters dropped): the
    phrase up to the first 3 letters of its last word (a head has at least 3)."""
    head_at = phrase.rfind(" ") + 1
    return phrase[:head_at + 3]


def partition_of(phrases_: list[str], parts: int) -> np.ndarray:
    return (hash64(k.encode() for k in map(fold_key, phrases_)) % np.uint64(parts)).astype(np.int32)


def partition_top(paths: list[Path], p: int, top_k: int, min_count: int, exclude: Iterable[str]) -> list[dict]:
    """The top_k tags of partition p (count, then phrase), from its rows of every shard's count file."""
    total: Counter = Counter()
    for path in paths:
        t = pq.read_table(path, columns=["phrase", "count"], filters=[("part", "=", p)])
        for phrase, c in zip(t.column("phrase").to_pylist(), t.column("count").to_pylist()):
            total[phrase] += c
    folded = fold_plurals(total)
    tags = select(folded, top_k, min_count, exclude)
    return [{"part": p, "phrase": t, "count": folded[t], "candidates": len(total)} for t in tags] or [
        {"part": p, "phrase": None, "count": 0, "candidates": len(total)}]  # an empty part still says its size


def run(cfg: BuildConfig, ex: Executor) -> bool:
    from realsyn_pl.models.tagger import merge_vocab, read_vocab

    m = cfg.mine_tags
    in_dir = Path(cfg.work_dir) / m.sentence_stage
    indices = input_indices(in_dir, m.sentence_kind)
    stage = Stage(cfg.work_dir, NAME, asdict(m) | {"general": cfg.tag.vocab}, [m.sentence_stage])

    if m.partitions < 1:
        raise StageError(f"mine_tags.partitions must be >= 1, got {m.partitions}")
    started = time.time()
    if stage.skip_complete(cfg.force):
        return True
    stage.begin(cfg.force)

    def work(i: int) -> Counts:
        counts, n = count_shard(in_dir / f"{m.sentence_kind}-{i:05d}.parquet", m.max_words)
        phrases_ = sorted(counts)
        part = partition_of(phrases_, m.partitions)
        order = np.argsort(part, kind="stable")  # (part, phrase): the phrases are sorted already
        table = pa.table({"part": pa.array(part[order], pa.int32()),
                          "phrase": pa.array([phrases_[j] for j in order], pa.string()),
                          "count": pa.array([counts[phrases_[j]] for j in order], pa.int64())}, schema=PHRASE_COUNTS)
        # about one row group per partition: a partition's reader skips the others by their statistics
        write_table(stage.path("counts", i), table, row_group_size=max(1024, len(order) // m.partitions))
        c = Counts()
        c.keep(n)
        c.produce("phrases", len(counts))
        return c

    ex.map(stage, list(indices), work, None)
    general = merge_vocab([read_vocab(v) for v in cfg.tag.vocab]) if m.exclude_general else []
    parts_st = stage.sub("_parts", {"partitions": m.partitions, "of": stage.hash})
    paths = [stage.path("counts", i) for i in indices]

    def part(p: int) -> Counts:
        rows = partition_top(paths, p, m.top_k, m.min_count, general)
        write_records(parts_st.path("top", p), rows, PART_TOP)
        c = Counts()
        c.produce("candidates", rows[0]["candidates"])
        return c

    run_sharded(ex, parts_st, range(m.partitions), part)

    def merge(st: Stage) -> dict[str, Any]:
        top = [r for p in range(m.partitions) for r in iter_rows(parts_st.path("top", p)) if r["phrase"] is not None]
        top.sort(key=lambda r: (-r["count"], r["phrase"]))
        tags = [r["phrase"] for r in top[:m.top_k]]
        n_cand = sum(parts_st.shard_counts(p).produced.get("candidates", 0) for p in range(m.partitions))
        out = mined_tags_path(cfg.work_dir)
        tmp = tmp_name(out)
        tmp.write_text("# tags mined from the sentence pool by realsyn_pl build mine_tags (most frequent first)\n"
                       + "".join(t + "\n" for t in tags), encoding="utf-8")
        os.replace(tmp, out)
        print(f"[build] {NAME}: {len(tags)} tags from {n_cand} candidate phrases", flush=True)
        return {"num_tags": len(tags), "num_candidates": n_cand, "tags_file": str(out)}

    return write_manifest(ex, stage, indices, started, merge)
