"""Stage `extract`: interleaved documents -> image records and sentence records (one output shard per input file).

Counts are per document: kept = documents with at least one image or sentence; dropped = malformed_row,
empty_document, not_utf8, truncated_file (one count for the unreadable rest of a file). `produced` counts the
images and sentences made. Ids: doc-SSSSS-RRRRRR (file index, row), .../img-P and .../s-K (engine/records.py).

Before any work (`check_input`, also run by `build` before Ray starts): every input file must open as what its name
says, and the first file's first rows must not fit another layout better than input.format (data/corpus_check.py);
each is one line naming the file. After the stage: keeping no document at all stops the build in one line naming the
top drop reasons, instead of running every later stage on nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor, run_sharded
from realsyn_pl.construct.engine.records import doc_id, image_id, sentence_id, write_records
from realsyn_pl.construct.engine.schemas import IMAGES, SENTENCES
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, expand_paths
from realsyn_pl.construct.extract.sentence_filters import split_sentences
from realsyn_pl.data.corpus_check import check_files, layout_mismatch
from realsyn_pl.data.interleaved import FORMATS, BadRow, read_documents

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


def check_input(cfg: BuildConfig) -> list[Path]:
    """The input files, once each opens as its format and the first one is in the configured layout; else a one-line
    FormatError or StageError naming the file."""
    if cfg.input.format not in FORMATS:
        raise StageError(f"input.format must be one of {', '.join(FORMATS)}, got {cfg.input.format!r}")
    files = expand_paths(cfg.input.paths, "input.paths")
    if not files:
        raise StageError("input.paths is empty: give the corpus files (parquet or jsonl)")
    check_files(files)
    why = layout_mismatch(cfg.input.format, files[0], cfg.input.image_root)
    if why is not None:
        raise StageError(why)
    return files


def check_kept(cfg: BuildConfig, manifest: dict[str, Any]) -> None:
    """Stop when the stage kept no document: every later stage would run on nothing (and `cluster` fail for it)."""
    c = manifest.get("counts")
    if not c or c["n_out"]:
        return
    if not c["n_in"]:
        raise StageError(f"extract found no document in the {len(manifest['config']['input']['files'])} input "
                         "file(s): they hold no rows")
    top = sorted(c["dropped"].items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    reasons = ", ".join(f"{k} {v}" for k, v in top)
    raise StageError(f"extract kept no document of the {c['n_in']} read (dropped: {reasons}); check input.format="
                     f"{cfg.input.format} against the layouts in data_build/README.md, then rerun with force=extract")


def run(cfg: BuildConfig, ex: Executor) -> bool:
    if cfg.sentence_filter.split_chars < 1:
        raise StageError(f"sentence_filter.split_chars must be at least 1, got {cfg.sentence_filter.split_chars}")
    files = check_input(cfg)
    stage = Stage(cfg.work_dir, NAME, {"input": {"format": cfg.input.format, "files": [str(f) for f in files],
                                                 "image_root": cfg.input.image_root},
                                       "language": cfg.sentence_filter.language,
                                       "split_chars": cfg.sentence_filter.split_chars})
    done = run_sharded(ex, stage, range(len(files)), lambda i: extract_file(cfg, stage, i, files[i]), cfg.force,
                       extra={"input_files": [str(f) for f in files]})
    if done:
        check_kept(cfg, stage.manifest() or {})
    return done
