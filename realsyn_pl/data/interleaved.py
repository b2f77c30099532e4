"""Streaming readers for interleaved documents: OBELICS parquet, MMC4 jsonl(.gz), and a local format.

Each reader yields, for one input file, one item per document row: a `Document` or a `BadRow(reason)`. Rows are
never all in memory (parquet is read by row batches, jsonl line by line). Bad input never raises: a malformed row,
non-UTF-8 bytes, or an unreadable remainder of a truncated file become counted `BadRow`s.

Formats
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


class FormatError(ValueError):
    """Input that is not what the configured format promises; one line for the user."""


def _resolve(path: str, root: Optional[str]) -> str:
    p = Path(path)
    return str(p if p.is_absolute() or root is None else Path(root) / p)


def _text_list(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, str) or t is None for t in value):
        raise TypeError("texts must be a list of strings")
    return [t for t in value if t]


def _image_ref(value: Any, root: Optional[str]) -> Optional[ImageRef]:
    if value is None:
        return None
    if isinstance(value, str):
        return ImageRef(url=value) if "://" in value else ImageRef(path=_resolve(value, root))
    if isinstance(value, dict):
        data = value.get("bytes")
        if isinstance(data, str):
            data = base64.b64decode(data, validate=True)
        path = value.get("path")
        return ImageRef(url=value.get("url") or value.get("src"), path=_resolve(path, root) if path else None,
                        data=data or None)
    raise TypeError(f"unsupported image entry of type {type(value).__name__}")


def _obelics(row: dict[str, Any], root: Optional[str]) -> Document:
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise TypeError("texts and images must be aligned lists")
    meta = row.get("metadata")
    meta = json.loads(meta) if isinstance(meta, str) else (meta or [])
    doc = Document()
    for pos, (t, im) in enumerate(zip(texts, images)):
        if t is not None and im is not None:
            raise TypeError("a position holds both a text and an image")
        if t:
            doc.texts.append(t)
        elif im is not None:
            ref = _image_ref(im, root)
            if ref is not None and ref.url is None and pos < len(meta) and isinstance(meta[pos], dict):
                ref.url = meta[pos].get("src")
            doc.images.append(ref)
    return doc


def _mmc4(row: dict[str, Any], root: Optional[str]) -> Document:
    doc = Document(texts=_text_list(row.get("text_list")))
    for info in row.get("image_info") or []:
        if not isinstance(info, dict):
            raise TypeError("image_info entries must be objects")
        name = info.get("image_name")
        local = _resolve(name, root) if name and root else None
        if local and Path(local).is_file():
            doc.images.append(ImageRef(url=info.get("raw_url"), path=local))
        else:
            doc.images.append(ImageRef(url=info.get("raw_url")))
    return doc


def _local(row: dict[str, Any], root: Optional[str]) -> Document:
    doc = Document(texts=_text_list(row.get("texts")))
    for im in row.get("images") or []:
        ref = _image_ref(im, root)
        if ref is not None:
            doc.images.append(ref)
    return doc


PARSERS = {"obelics": _obelics, "mmc4": _mmc4, "local": _local}


def _parse(fmt: str, row: Any, root: Optional[str]) -> Item:
    if not isinstance(row, dict):
        return BadRow("malformed_row")
    try:
        doc = PARSERS[fmt](row, root)
    except (TypeError, ValueError, KeyError, binascii.Error, json.JSONDecodeError):
        return BadRow("malformed_row")
    if not doc.texts and not doc.images:
        return BadRow("empty_document")
    return doc


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
        except json.JSONDecodeError:
            # a cut-off last line is the usual way a jsonl file is truncated
            yield BadRow("malformed_row")
            continue
        yield _parse(fmt, row, root)


def _parquet(fmt: str, path: Path, root: Optional[str], batch_rows: int) -> Iterator[Item]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError):
        yield BadRow("truncated_file")
        return
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield _parse(fmt, row, root)
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
