"""Checks of corpus files before any work: does each file open as what its name says, and does the first one hold
documents of the configured layout (interleaved.py reads them)?

Mistakes caught here would otherwise surface stages later: a text file named `.parquet` read as one truncated_file,
or an MMC4 corpus read with input.format=local, whose every row is an empty_document, so the build runs download,
filters and model stages on nothing and stops at `cluster`. A file that opens but holds some bad rows is not an error
here: those rows are counted by `extract` (malformed_row, not_utf8, truncated_file for an unreadable rest).
"""
from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.data.interleaved import FORMATS, Document, FormatError, parse_row

# The top-level keys each layout needs (data_build/README.md shows a row of each); obelics and local share theirs
# and are told apart by their shape (obelics: aligned lists, one of text / image null at each position).
LAYOUT_KEYS = {"obelics": ("texts", "images"), "mmc4": ("text_list", "image_info"), "local": ("texts", "images")}
SNIFF_ROWS = 32  # rows of the first file the layout is judged on
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
CHECK_THREADS = 16  # files opened at once: a corpus on a network file system has thousands of them


def kind_of(path: Path) -> str:
    """"parquet" or "jsonl" from the file name; any other name is a one-line error."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise FormatError(f"{path}: expected a .parquet or .jsonl[.gz] file")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _jsonl_head(path: Path, n: int) -> list[bytes]:
    """The first `n` non-empty lines (fewer where a gzip stream is cut off after some); FormatError when not even the
    first line can be read (not gzip at all, unreadable)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lines: list[bytes] = []
    try:
        with opener(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    lines.append(line)
                    if len(lines) >= n:
                        break
    except (OSError, EOFError) as err:
        if not lines:
            raise FormatError(f"{path}: cannot be read as JSON lines{' (gzip)' if opener is gzip.open else ''}: "
                              f"{_first_line(err)}") from None
    return lines


def _json_rows(path: Path, lines: list[bytes]) -> list[Any]:
    """The lines that parse as JSON; FormatError when fewer than half of them do (a CSV, a pretty-printed JSON
    document, a binary file named .jsonl), where a JSON lines file with a few bad rows has most lines whole."""
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            continue
    if 2 * len(rows) < len(lines):
        shown = lines[0][:60].decode("utf-8", "replace").strip()
        raise FormatError(f"{path}: not JSON lines (one JSON object per line); its first line reads {shown!r}")
    return rows


def sample_rows(path: Path, n: int = SNIFF_ROWS) -> list[Any]:
    """Up to `n` rows from the start of `path`, as Python values; FormatError (one line naming the file) when it
    cannot be opened as what its name says."""
    if kind_of(path) == "jsonl":
        return _json_rows(path, _jsonl_head(path, n))
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise FormatError(f"{path}: not a readable parquet file ({_first_line(err)})") from None
    if pf.metadata.num_rows == 0:
        return []
    try:
        return next(pf.iter_batches(batch_size=n)).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError, StopIteration):
        return []  # the first row group is damaged: extract counts it (truncated_file, not_utf8)


def check_opens(path: Path) -> None:
    """FormatError unless `path` opens as its format: a parquet footer that reads, or JSON on its first lines."""
    if kind_of(path) == "parquet":
        try:
            pq.read_metadata(path)
        except (pa.ArrowException, OSError) as err:
            raise FormatError(f"{path}: not a readable parquet file ({_first_line(err)})") from None
    else:
        _json_rows(path, _jsonl_head(path, SNIFF_ROWS))


def check_files(files: Sequence[Path]) -> None:
    """Every file opens as its format, else one line naming the first that does not (in file order) and how many
    more do not."""
    def problem(path: Path) -> Optional[str]:
        try:
            check_opens(path)
        except FormatError as err:
            return str(err)
        return None

    with ThreadPoolExecutor(min(CHECK_THREADS, max(1, len(files)))) as pool:
        bad = [p for p in pool.map(problem, files) if p is not None]
    if bad:
        more = f" ({len(bad) - 1} more input file(s) cannot be read either)" if len(bad) > 1 else ""
        raise FormatError(bad[0] + more)


def _fits(fmt: str, rows: list[Any], root: Optional[str]) -> bool:
    return any(isinstance(parse_row(fmt, r, root), Document) for r in rows)


def layout_mismatch(fmt: str, path: Path, root: Optional[str]) -> Optional[str]:
    """The one line to stop on when the first rows of `path` hold no document in layout `fmt` but do in another;
    None when they fit `fmt`, fit nothing (extract will count why), or the file has no rows."""
    rows = sample_rows(path)
    if not rows or _fits(fmt, rows, root):
        return None
    other = next((f for f in FORMATS if f != fmt and _fits(f, rows, root)), None)
    if other is None:
        return None
    keys = [k for k in LAYOUT_KEYS[other] if any(isinstance(r, dict) and k in r for r in rows)]
    return (f"input.format={fmt} but {path} looks like {other} (keys {', '.join(keys)}); set input.format={other} "
            "(the layouts: data_build/README.md)")
