"""Reading a table of (image path or URL, caption, more text columns): CSV, TSV, parquet or JSON lines.

Only the named columns are kept, every value as a string (or None when empty), so a numeric caption column or a
parquet integer column reads the same as its CSV. An unreadable file is one ConfigError line naming it.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from realsyn_pl.config import ConfigError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# A caption longer than csv's default field limit (128 KiB) is a real caption in some corpora, not a broken file.
CSV_FIELD_LIMIT = 1 << 24


def table_format(path: Path) -> Optional[str]:
    return FORMATS.get(path.suffix.lower())


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


Reader = Callable[[list[str]], Iterable[dict[str, Any]]]  # the columns to read -> the rows


def _csv(path: Path, delimiter: str) -> tuple[list[str], Reader]:
    csv.field_size_limit(CSV_FIELD_LIMIT)

    def open_csv() -> Any:
        return open(path, newline="", encoding="utf-8-sig")  # -sig: a spreadsheet's BOM is not part of a column name

    with open_csv() as fh:
        columns = next(csv.reader(fh, delimiter=delimiter), [])

    def rows(_: list[str]) -> Iterator[dict[str, Any]]:
        with open_csv() as fh:
            yield from csv.DictReader(fh, delimiter=delimiter)
    return columns, rows


def _jsonl(path: Path) -> tuple[list[str], Reader]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"line {number}: {err}") from None
            if not isinstance(record, dict):
                raise ValueError(f"line {number} is not a JSON object")
            records.append(record)
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    return list(columns), lambda _: records


def _parquet(path: Path) -> tuple[list[str], Reader]:
    import pyarrow.parquet as pq

    # only the columns used are read: a wide parquet file may carry embeddings or image bytes beside them
    return pq.read_schema(path).names, lambda cols: pq.read_table(path, columns=cols).to_pylist()


def read_columns(path: Path) -> tuple[list[str], Reader]:
    """The table's column names, and the reader of its rows in the columns asked for."""
    fmt = table_format(path)
    try:
        if fmt == "parquet":
            return _parquet(path)
        if fmt == "jsonl":
            return _jsonl(path)
        return _csv(path, "\t" if fmt == "tsv" else ",")
    except (OSError, ValueError, csv.Error) as err:  # pyarrow's errors are OSError / ValueError subclasses
        raise ConfigError(f"input {path}: cannot read it as {fmt} ({str(err).splitlines()[0][:200]})") from None


def read_rows(path: Path, columns: Sequence[str], reader: Reader) -> list[dict[str, Optional[str]]]:
    """The table's rows in `columns`, each value a string as written (None for an empty or missing cell)."""
    try:
        return [{c: _text(row.get(c)) for c in columns} for row in reader(list(columns))]
    except (OSError, ValueError, csv.Error) as err:  # a bad byte or quote further down the file
        raise ConfigError(f"input {path}: cannot read it as {table_format(path)} "
                          f"({str(err).splitlines()[0][:200]})") from None
