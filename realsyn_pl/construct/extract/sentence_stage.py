"""Stage `sentence_filter`: the quality filter on extracted sentences (emoji, URL, 3..81 words, CAT rule).

Drops (first failing rule): emoji, url, too_long (over max_chars), too_few_words, too_many_words, cat_rule. The
cheap rules run per row (sentence_filters.py); with cat_rule=parser the survivors stream through spaCy's `nlp.pipe` in
batches (`cat_batch_size`, `cat_processes` worker processes per task), one shard at a time, so memory is one batch
per process whatever the shard size. cat_rule=approximate is the word-list approximation (cat_rule.py).
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

from realsyn_pl.construct.engine.config import BuildConfig, SentenceFilterConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.mapping import write_results
from realsyn_pl.construct.engine.memo import per_process
from realsyn_pl.construct.engine.records import read_batches
from realsyn_pl.construct.engine.schemas import SENTENCES
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices
from realsyn_pl.construct.extract.sentence_filters import CAT_RULES, quality_reason

NAME, INPUT = "sentence_filter", "extract"


def judged(rows: Iterator[dict[str, Any]], f: SentenceFilterConfig, nlp: Any) -> Iterator[dict[str, Any] | str]:
    """Each row (kept) or its drop reason, in input order; the parser sees only rows the cheap rules kept."""
    from realsyn_pl.construct.extract.cat_parse import judge_stream

    fifo: deque[tuple[dict[str, Any], str | None]] = deque()

    def texts() -> Iterator[str | None]:
        for row in rows:
            reason = quality_reason(row["text"], f)
            fifo.append((row, reason))
            yield None if reason else row["text"]

    for cat in judge_stream(nlp, texts(), f.cat_batch_size, f.cat_processes):
        row, reason = fifo.popleft()
        if reason is None and not cat.passes(f.cat_min_complexity, f.cat_require_action):
            reason = "cat_rule"
        yield reason or row


def filter_shard(in_path: Path, out_path: Path, f: SentenceFilterConfig, nlp: Any) -> Counts:
    rows = (r for batch in read_batches(in_path, None, 1024) for r in batch.to_pylist())
    results = judged(rows, f, nlp) if nlp is not None else (quality_reason(r["text"], f) or r for r in rows)
    return write_results(out_path, SENTENCES, results)


def run(cfg: BuildConfig, ex: Executor) -> bool:
    f = cfg.sentence_filter
    if f.cat_rule not in CAT_RULES:
        raise StageError(f"sentence_filter.cat_rule must be one of {', '.join(CAT_RULES)}, got {f.cat_rule!r}")
    in_dir = Path(cfg.work_dir) / INPUT
    indices = input_indices(in_dir, "sentences")
    stage = Stage(cfg.work_dir, NAME, asdict(f), [INPUT])

    def parser() -> Any:  # loaded once per worker process, and only where a shard is pending
        from realsyn_pl.construct.extract.cat_parse import load_pipeline

        return per_process(f"spacy:{f.cat_model}", lambda: load_pipeline(f.cat_model))

    def work(i: int) -> Counts:
        return filter_shard(in_dir / f"sentences-{i:05d}.parquet", stage.path("sentences", i), f,
                            parser() if f.cat_rule == "parser" else None)

    def extra(_: Stage) -> dict[str, Any]:
        if f.cat_rule != "parser":
            return {}
        from realsyn_pl.construct.extract.cat_parse import pipeline_info

        return {"cat_parser": pipeline_info(parser())}

    res = ex.resources(NAME)  # spaCy's nlp.pipe starts cat_processes processes inside the task
    res = replace(res, cpus=max(res.cpus, f.cat_processes if f.cat_rule == "parser" else 1))
    return run_sharded(ex, stage, indices, work, cfg.force, extra, resources=res)
