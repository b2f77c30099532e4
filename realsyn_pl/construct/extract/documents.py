"""Stage `extract`: interleaved documents -> image records and sentence records (one output shard per input file).

Counts are per document: kept = documents with at least one image or sentence; dropped = malformed_row,
empty_document, not_utf8, truncated_file (one count for the unreadable rest of a file). `produced` counts the
images and sentences made. Ids: doc-SSSSS-RRRRRR (file index, row), .../img-P and .../s-K (engine/records.py).
"""
from __future__ import annotations

from pathlib import Path

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.records import doc_id, image_id, sentence_id, write_records
from realsyn_pl.construct.engine.schemas import IMAGES, SENTENCES
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, expand_paths
from realsyn_pl.construct.extract.sentence_filters import split_sentences
from realsyn_pl.data.interleaved import BadRow, read_documents

NAME = "extract"


def extract_file(cfg: BuildConfig, stage: Stage, index: int, path: Path) -> Counts:
    counts = Counts()
    images, sentences = [], []
    for row, item in enumerate(read_documents(cfg.input.format, path, cfg.input.image_root, cfg.input.batch_rows)):
        if isinstance(item, BadRow):
            counts.drop(item.reason)
            continue
        d = doc_id(index, row)
        k = 0
        for text in item.texts:
            for s in split_sentences(text, cfg.sentence_filter.language, cfg.sentence_filter.split_chars):
                sentences.append({"id": sentence_id(d, k), "doc_id": d, "text": s})
                k += 1
        for pos, im in enumerate(item.images):
            images.append({"id": image_id(d, pos), "doc_id": d, "url": im.url, "path": im.path, "bytes": im.data})
        if k == 0 and not item.images:
            counts.drop("empty_document")  # only whitespace text
        else:
            counts.keep()
    write_records(stage.path("images", index), images, IMAGES)
    write_records(stage.path("sentences", index), sentences, SENTENCES)
    counts.produce("images", len(images))
    counts.produce("sentences", len(sentences))
    return counts


def run(cfg: BuildConfig, ex: Executor) -> bool:
    files = expand_paths(cfg.input.paths, "input.paths")
    if not files:
        raise StageError("input.paths is empty: give the corpus files (parquet or jsonl)")
    if cfg.sentence_filter.split_chars < 1:
        raise StageError(f"sentence_filter.split_chars must be at least 1, got {cfg.sentence_filter.split_chars}")
    stage = Stage(cfg.work_dir, NAME, {"input": {"format": cfg.input.format, "files": [str(f) for f in files],
                                                 "image_root": cfg.input.image_root},
                                       "language": cfg.sentence_filter.language,
                                       "split_chars": cfg.sentence_filter.split_chars})
    return run_sharded(ex, stage, range(len(files)), lambda i: extract_file(cfg, stage, i, files[i]), cfg.force,
                       extra={"input_files": [str(f) for f in files]})
