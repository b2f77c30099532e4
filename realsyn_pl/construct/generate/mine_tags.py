"""Stage `mine_tags`: frequent nouns and noun phrases of the sentence pool become extra tags (the paper added 4,000
tags "derived from real-world sentences" to RAM++'s list; how they were mined is not said).

Map (per input shard, resumable): count candidate phrases -> `mine_tags/counts-i.parquet` {phrase, count}.
Reduce (one task once every shard is done; holds every distinct candidate in memory -- tens of millions of phrases at the
paper's 0.84B sentences, a few GB): sum, fold plurals into singulars, keep count >= min_count, drop tags the general
list has (exclude_general), write the top_k to `mine_tags/tags.txt` (most frequent first), then the manifest.

Candidates without a POS tagger (none installs offline): the noun-phrase runs of extract/cat_rule.py (maximal runs
of content words that are not actions) that open with a determiner, number or preposition ("a red bike", "on the
street"); the head is the run's last word, phrases are its last 1..max_words words.
Heads that are adjectives, adverbs (-ly), numbers or very short words are skipped. Known gap: a verb the lists do
not know right after a noun phrase ("the window glows") is read as the phrase's head; frequency filtering and
min_count keep such noise low.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.records import iter_rows, tmp_name, write_records
from realsyn_pl.construct.engine.stage import Counts, Stage, input_indices
from realsyn_pl.construct.extract.cat_rule import ACTION_FORMS, DETERMINERS, FUNCTION_WORDS, PREPOSITIONS
from realsyn_pl.construct.extract.sentence_filters import words

NAME = "mine_tags"
PHRASE_COUNTS = pa.schema([("phrase", pa.string()), ("count", pa.int64())])

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


def run(cfg: BuildConfig, ex: Executor) -> bool:
    from realsyn_pl.models.tagger import merge_vocab, read_vocab

    m = cfg.mine_tags
    in_dir = Path(cfg.work_dir) / m.sentence_stage
    indices = input_indices(in_dir, m.sentence_kind)
    stage = Stage(cfg.work_dir, NAME, asdict(m) | {"general": cfg.tag.vocab}, [m.sentence_stage])

    def work(i: int) -> Counts:
        counts, n = count_shard(in_dir / f"{m.sentence_kind}-{i:05d}.parquet", m.max_words)
        write_records(stage.path("counts", i), [{"phrase": p, "count": c} for p, c in sorted(counts.items())],
                      PHRASE_COUNTS)
        c = Counts()
        c.keep(n)
        c.produce("phrases", len(counts))
        return c

    def reduce(st: Stage) -> dict[str, Any]:
        total: Counter = Counter()
        for i in indices:
            for row in iter_rows(st.path("counts", i)):
                total[row["phrase"]] += row["count"]
        general = merge_vocab([read_vocab(v) for v in cfg.tag.vocab]) if m.exclude_general else []
        tags = select(fold_plurals(total), m.top_k, m.min_count, general)
        out = mined_tags_path(cfg.work_dir)
        tmp = tmp_name(out)
        tmp.write_text("# tags mined from the sentence pool by realsyn_pl build mine_tags (most frequent first)\n"
                       + "".join(t + "\n" for t in tags), encoding="utf-8")
        os.replace(tmp, out)
        print(f"[build] {NAME}: {len(tags)} tags from {len(total)} candidate phrases", flush=True)
        return {"num_tags": len(tags), "num_candidates": len(total), "tags_file": str(out)}

    return run_sharded(ex, stage, indices, work, cfg.force, extra=reduce)
