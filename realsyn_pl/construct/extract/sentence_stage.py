"""Stage `sentence_filter`: the quality filter on extracted sentences (emoji, URL, 3..81 words, CAT rule).

Drops (first failing rule): emoji, url, too_few_words, too_many_words, cat_rule. See sentence_filters.py/cat_rule.py.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.mapping import map_shard
from realsyn_pl.construct.engine.schemas import SENTENCES
from realsyn_pl.construct.engine.stage import Stage, StageError, input_indices, run_sharded
from realsyn_pl.construct.extract.sentence_filters import quality_reason

NAME, INPUT = "sentence_filter", "extract"


def run(cfg: BuildConfig) -> bool:
    f = cfg.sentence_filter
    if f.cat_rule not in ("heuristic", "off"):
        raise StageError(f"sentence_filter.cat_rule must be 'heuristic' or 'off', got {f.cat_rule!r}")
    in_dir = Path(cfg.work_dir) / INPUT
    indices = input_indices(in_dir, "sentences")
    stage = Stage(cfg.work_dir, NAME, asdict(f), [INPUT])
    return run_sharded(stage, indices, lambda i: map_shard(in_dir / f"sentences-{i:05d}.parquet",
                                                           stage.path("sentences", i), SENTENCES,
                                                           lambda r: quality_reason(r["text"], f) or r),
                       cfg.progress, cfg.force)
