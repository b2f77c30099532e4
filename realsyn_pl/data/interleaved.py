"""Streaming readers for interleaved documents: OBELICS parquet, MMC4 jsonl(.gz), and a local format.

Each reader yields, for one input file, one item per document row: a `Document` or a `BadRow(reason)`. Rows are
never all in memory (parquet is read by row batches, jsonl line by line). Bad input never raises: a malformed row
(invalid JSON, a field of the wrong type: a text that is not a string, an image URL, path or bytes of another type),
non-UTF-8 bytes (or text that cannot be written as UTF-8: lone surrogates from JSON escapes), or an unreadable
remainder of a truncated file become counted `BadRow`s.

Formats (an example row of each: data_build/README.md; corpus_check.py tells them apart before a build starts)
- obelics: parquet with `texts` and `images` (aligned lists; at each position one of the two is null; images are
  URLs, or {bytes, path} structs) and optional `metadata` (JSON string: per-position dicts, `src` = image URL).
- mmc4: jsonl with `text_list` (paragraphs) and `image_info` ([{raw_url, image_name, matched_text_index}]); an
  image with `image_name` present under input.image_root is read from disk, otherwise fetched from `raw_url`.
- local: jsonl or parquet rows {"texts": [str], "images": [{"path"|"url"|"bytes"}]} (jsonl bytes are base64);
  relative paths are resolved against input.image_root.
"""
from __future__ import annotations

import base64
import binascii
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class ImageRef:
    url: Optional[str] = None
    path: Optional[str] = None
    data: Optional[bytes] = None


@dataclass
class Document:
    texts: list[str] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)


@dataclass
class BadRow:
    reason: str


Item = Union[Document, BadRow]
FORMATS = ("obelics", "mmc4", "local")
# Lone UTF-16 surrogates: a JSON escape can spell one, but a string holding one cannot be written as UTF-8 (parquet)
SURROGATE_RE = re.compile("[\ud800-\udfff]")
# What a parsed row may raise on input of the wrong shape: a deeply nested JSON value raises RecursionError, an
# over-long integer literal ValueError.
ROW_ERRORS = (TypeError, ValueError, KeyError, RecursionError, binascii.Error)


class FormatError(ValueError):
    """Input that is not what the configured format promises; one line for the user."""


def _resolve(path: str, root: Optional[str]) -> str:
    p = Path(path)
    return str(p if p.is_absolute() or root is None else Path(root) / p)


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long for the file system is no file there
        return False


def _list(value: Any, name: str) -> list[Any]:
    """A list field that may be missing; a string or an object there would be iterated as its characters or keys."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"{name} must be a list")
    return value


def _opt_str(value: Any, name: str) -> Optional[str]:
    """A string field that may be missing (None or "")."""
    if value is None or isinstance(value, str):
        return value or None
    raise TypeError(f"{name} must be a string")


def _text_list(value: Any) -> list[str]:
    return [t for t in (_opt_str(t, "texts[]") for t in _list(value, "texts")) if t]


def _image_ref(value: Any, root: Optional[str]) -> Optional[ImageRef]:
    if value is None:
        return None
    if isinstance(value, str):
        return ImageRef(url=value) if "://" in value else ImageRef(path=_resolve(value, root))
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, str):
            data = base64.b64decode(data, validate=True)
        elif data is not None and not isinstance(data, bytes):
            raise TypeError("image bytes must be bytes or base64 text")
        path = _opt_str(value.get("path"), "image path")
        return ImageRef(url=_opt_str(value.get("url"), "image url") or _opt_str(value.get("src"), "image src"),
                        path=_resolve(path, root) if path else None, data=data or None)
    raise TypeError(f"unsupported image entry of type {type(value).__name__}")


def _obelics(row: dict[str, Any], root: Optional[str]) -> Document:
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise TypeError("texts and images must be aligned lists")
    meta = row.get("metadata")
    meta = _list(json.loads(meta) if isinstance(meta, str) else meta, "metadata")
    doc = Document()
    for pos, (t, im) in enumerate(zip(texts, images)):
        if t is not None and im is not None:
            raise TypeError("a position holds both a text and an image")
        if t is not None:
            t = _opt_str(t, "texts[]")
            if t:
                doc.texts.append(t)
        elif im is not None:
            ref = _image_ref(im, root)
            if ref is not None and ref.url is None and pos < len(meta) and isinstance(meta[pos], dict):
                ref.url = _opt_str(meta[pos].get("src"), "metadata src")
            doc.images.append(ref)
    return doc


def _mmc4(row: dict[str, Any], root: Optional[str]) -> Document:
    doc = Document(texts=_text_list(row.get("text_list")))
    for info in _list(row.get("image_info"), "image_info"):
        if not isinstance(info, dict):
            raise TypeError("image_info entries must be objects")
        name, url = _opt_str(info.get("image_name"), "image_name"), _opt_str(info.get("raw_url"), "raw_url")
        local = _resolve(name, root) if name and root else None
        doc.images.append(ImageRef(url=url, path=local) if local and _is_file(local) else ImageRef(url=url))
    return doc


def _local(row: dict[str, Any], root: Optional[str]) -> Document:
    doc = Document(texts=_text_list(row.get("texts")))
    for im in _list(row.get("images"), "images"):
        ref = _image_ref(im, root)
        if ref is not None:
            doc.images.append(ref)
    return doc


PARSERS = {"obelics": _obelics, "mmc4": _mmc4, "local": _local}


def parse_row(fmt: str, row: Any, root: Optional[str]) -> Item:
    """One parsed row (a dict, or whatever JSON or parquet gave) as a Document, or the BadRow saying why not."""
    if not isinstance(row, dict):
        return BadRow("malformed_row")
    try:
        doc = PARSERS[fmt](row, root)
    except ROW_ERRORS:
        return BadRow("malformed_row")
    if not _utf8_writable(doc):
        return BadRow("not_utf8")
    if not doc.texts and not doc.images:
        return BadRow("empty_document")
    return doc


def _utf8_writable(doc: Document) -> bool:
    """Whether every string of `doc` can be written out: extract writes them to parquet, which encodes UTF-8."""
    strings = [*doc.texts, *(s for im in doc.images for s in (im.url, im.path) if s)]
    return not any(SURROGATE_RE.search(s) for s in strings)


def _jsonl_lines(path: Path) -> Iterator[Union[bytes, BadRow]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield line
    except (OSError, EOFError):  # truncated gzip stream
        yield BadRow("truncated_file")


def _jsonl(fmt: str, path: Path, root: Optional[str]) -> Iterator[Item]:
    for line in _jsonl_lines(path):
        if isinstance(line, BadRow):
            yield line
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield BadRow("not_utf8")
            continue
        try:
            row = json.loads(text)
        except (ValueError, RecursionError):
            # a cut-off last line is the usual way a jsonl file is truncated
            yield BadRow("malformed_row")
            continue
        yield parse_row(fmt, row, root)


def _batch_rows(batch: pa.RecordBatch) -> list[Any]:
    """The batch's rows as dicts, a row holding a string that is not valid UTF-8 as BadRow("not_utf8"): arrow does not
    validate strings it reads, the conversion to Python does, and it fails for the whole batch."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        out: list[Any] = []
        for i in range(batch.num_rows):
            try:
                out.extend(batch.slice(i, 1).to_pylist())
            except UnicodeDecodeError:
                out.append(BadRow("not_utf8"))
        return out


def _parquet(fmt: str, path: Path, root: Optional[str], batch_rows: int) -> Iterator[Item]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError):
        yield BadRow("truncated_file")
        return
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            for row in _batch_rows(batch):
                yield row if isinstance(row, BadRow) else parse_row(fmt, row, root)
    except (pa.ArrowException, OSError):  # corrupt row group: the rest of the file is unreadable
        yield BadRow("truncated_file")


def read_documents(fmt: str, path: str | Path, image_root: Optional[str] = None,
                   batch_rows: int = 256) -> Iterator[Item]:
    """One item per row of `path`, in file order."""
    if fmt not in FORMATS:
        raise FormatError(f"input.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _parquet(fmt, path, image_root, batch_rows)
    elif name.endswith((".jsonl", ".jsonl.gz", ".json")):
        yield from _jsonl(fmt, path, image_root)
    else:
        raise FormatError(f"{path}: expected a .parquet or .jsonl[.gz] file")
