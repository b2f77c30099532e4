"""The input of `shards` as rows (image URL, caption, more texts): a folder of image + caption files, or a table.

Local images become file:// URLs, read by the fetcher only under the image root (shards.image_root, else the input
folder or the table's folder), as the build reads a corpus's local paths. What cannot become a sample is counted by
reason with its first example, never dropped silently: no_caption, no_image, bad_caption, missing_image,
outside_image_root, invalid_url.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit
from urllib.request import url2pathname

from realsyn_pl.config import ConfigError, ShardsConfig
from realsyn_pl.construct.extract.fetch import is_file, local_path
from realsyn_pl.data.own.tables import FORMATS, read_columns, read_rows, table_format

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
# Column names tried, in order, when url_col / caption_col are not set.
URL_COLS = ("url", "path", "image", "image_path", "filepath", "file", "file_name")
CAPTION_COLS = ("caption", "text", "txt", "title")
# Fields img2dataset writes into every sample's .json: an extra column of one of these names would be lost there.
RESERVED = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width",
            "original_height", "exif", "sha256")


@dataclass
class Row:
    url: str  # http(s), or file:// for a local image
    caption: str
    extra: dict[str, Optional[str]] = field(default_factory=dict)


class Skips:
    """Counts by reason, with the first item skipped for each (what the summary names)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}
        self.outside: Optional[str] = None  # the folder holding every path refused as outside the image root

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Inputs:
    rows: list[Row]
    skips: Skips
    root: Path  # local images are read only under it
    extra_cols: list[str]


def _local(path: Path, root: Path, where: str, skips: Skips) -> Optional[str]:
    real = local_path(str(path), str(root))
    if real is None:
        skips.add("outside_image_root", where)
        folder = os.path.dirname(os.path.abspath(path))
        skips.outside = os.path.commonpath([skips.outside or folder, folder, str(root)])
        return None
    if not is_file(real):
        skips.add("missing_image", where)
        return None
    return real.as_uri()


def _source(value: str, base: Path, root: Path, skips: Skips) -> Optional[str]:
    """A table's image cell as the URL the fetcher reads: http(s) as given, a path (relative to the table's folder)
    or a file:// URL as a file:// URL under the image root."""
    try:
        parts = urlsplit(value)
    except ValueError:
        skips.add("invalid_url", value)
        return None
    if parts.scheme in ("http", "https"):
        if parts.netloc:
            return value
        skips.add("invalid_url", value)
        return None
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            skips.add("invalid_url", value)
            return None
        path = Path(url2pathname(parts.path))
    elif len(parts.scheme) > 1:  # s3://, gs://, data: ... (one letter is a Windows drive)
        skips.add("invalid_url", value)
        return None
    else:
        path = Path(value).expanduser()
    return _local(path if path.is_absolute() else base / path, root, value, skips)


def _caption_file(path: Path, skips: Skips, image: Path) -> Optional[str]:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        skips.add("bad_caption", str(path))
        return None
    if not text:
        skips.add("no_caption", str(image))
        return None
    return text


def from_folder(folder: Path, root: Path) -> Inputs:
    """Images (.jpg .jpeg .png .webp, any case, in any subfolder) with the caption file of the same stem (a.jpg +
    a.txt), in path order; hidden files and other files are left alone."""
    skips = Skips()
    stems: dict[Path, dict] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        ext = p.suffix.lower()
        if ext in IMAGE_EXTS:
            stems.setdefault(p.with_suffix(""), {"images": [], "txt": None})["images"].append(p)
        elif ext == ".txt":
            stems.setdefault(p.with_suffix(""), {"images": [], "txt": None})["txt"] = p
    rows = []
    for found in stems.values():
        if not found["images"]:
            skips.add("no_image", str(found["txt"]))
            continue
        for image in found["images"]:
            if found["txt"] is None:
                skips.add("no_caption", str(image))
                continue
            caption = _caption_file(found["txt"], skips, image)
            url = _local(image, root, str(image), skips) if caption is not None else None
            if url is not None and caption is not None:
                rows.append(Row(url, caption))
    return Inputs(rows, skips, root, [])


def _column(given: Optional[str], tried: tuple, columns: list[str], key: str, what: str, path: Path) -> str:
    if given is not None:
        if given not in columns:
            raise ConfigError(f"{key}={given!r} is not a column of {path} (its columns: {', '.join(columns)})")
        return given
    found = next((c for c in tried if c in columns), None)
    if found is None:
        raise ConfigError(f"input {path} has no {what} column ({', '.join(tried)}): set {key}=<column> "
                          f"(its columns: {', '.join(columns) or 'none'})")
    return found


def from_table(path: Path, cfg: ShardsConfig, root: Path) -> Inputs:
    columns, reader = read_columns(path)
    url_col = _column(cfg.url_col, URL_COLS, columns, "url_col", "image path or URL", path)
    caption_col = _column(cfg.caption_col, CAPTION_COLS, columns, "caption_col", "caption", path)
    extras = list(cfg.extra_cols)
    unknown = [c for c in extras if c not in columns]
    if unknown:
        raise ConfigError(f"extra_cols: {', '.join(map(repr, unknown))} not a column of {path} "
                          f"(its columns: {', '.join(columns)})")
    clash = [c for c in extras if c in RESERVED]
    if clash:
        raise ConfigError(f"extra_cols: {clash[0]!r} is a field img2dataset writes in every sample's .json; "
                          "rename that column")
    skips, rows = Skips(), []
    for n, r in enumerate(read_rows(path, [url_col, caption_col, *extras], reader), 1):
        where = r[url_col] or f"{path.name} row {n}"
        if r[url_col] is None:
            skips.add("no_image", where)
            continue
        if r[caption_col] is None:
            skips.add("no_caption", where)
            continue
        url = _source(r[url_col], path.parent, root, skips)
        if url is not None:
            rows.append(Row(url, r[caption_col], {c: r[c] for c in extras}))
    return Inputs(rows, skips, root, extras)


def read_inputs(cfg: ShardsConfig) -> Inputs:
    src = Path(cfg.input).expanduser()
    if not src.exists():
        raise ConfigError(f"input {src}: no such file or folder")
    if src.is_dir():
        given = [k for k in ("url_col", "caption_col") if getattr(cfg, k) is not None]
        given += ["extra_cols"] if cfg.extra_cols else []
        if given:
            raise ConfigError(f"{', '.join(given)} name table columns, but input {src} is a folder (a.jpg + a.txt "
                              "pairs); give a table (.csv, .tsv, .parquet, .jsonl) or drop them")
    elif table_format(src) is None:
        raise ConfigError(f"input {src}: neither a folder nor a table ({', '.join(FORMATS)})")
    root = Path(cfg.image_root).expanduser() if cfg.image_root else (src if src.is_dir() else src.parent)
    if not root.is_dir():
        raise ConfigError(f"image_root {root}: no such folder")
    root = root.resolve()
    return from_folder(src, root) if src.is_dir() else from_table(src, cfg, root)
