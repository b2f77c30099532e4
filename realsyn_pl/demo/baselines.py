"""The demo's comparison datasets, built from the same kept images as RealSyn so that only the texts differ:
(a) each image with the paragraph adjacent to it in its document (the naive use of interleaved data), and
(b) each image with a random sentence from the filtered sentence pool. Plus the ground-truth check used in the
report: does a text name the image's true colour and shape?
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.data.shard_writer import ShardWriter
from realsyn_pl.demo import world

_URL = re.compile(r"/doc(\d+)/(\d+)\.jpg$")


@dataclass
class KeptImage:
    id: str
    url: str
    data: bytes


def kept_images(stage_dir: Path) -> Iterator[KeptImage]:
    """Image records of a stage (e.g. dedup_images) in shard order, bytes through engine/image_source.py."""
    from realsyn_pl.construct.engine.image_source import ImageSource, record_columns

    for path in sorted(stage_dir.glob("images-?????.parquet")):
        source = ImageSource(stage_dir.parent, int(path.name[7:12]))
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=record_columns(path) + ["url"]):
            for rid, url, data in zip(batch.column("id").to_pylist(), batch.column("url").to_pylist(),
                                      source.bytes_of(batch)):
                yield KeptImage(rid, url, data)


def sentence_pool(stage_dir: Path) -> list[str]:
    return [t for path in sorted(stage_dir.glob("sentences-*.parquet"))
            for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]


class Corpus:
    """Look-ups into the generated corpus by image URL: the adjacent paragraph and the true label."""

    def __init__(self, corpus_dir: Path):
        self.docs: list[list[Optional[str]]] = []
        for path in sorted(corpus_dir.glob("docs-*.parquet")):
            self.docs.extend(pq.read_table(path, columns=["texts"]).column("texts").to_pylist())
        self.labels: dict[tuple[int, int], Optional[str]] = {}
        for line in (corpus_dir / "truth.jsonl").read_text().splitlines():
            t = json.loads(line)
            self.labels[(t["doc"], t["position"])] = t["label"]

    @staticmethod
    def locate(url: str) -> tuple[int, int]:
        m = _URL.search(url)
        if m is None:
            raise ValueError(f"not a demo corpus image URL: {url}")
        return int(m.group(1)), int(m.group(2))

    def adjacent_text(self, url: str) -> str:
        """The paragraph right after the image, else the one before it (as a page reader would pair them)."""
        doc, pos = self.locate(url)
        texts = self.docs[doc]
        for p in (pos + 1, pos - 1):
            if 0 <= p < len(texts) and texts[p]:
                return texts[p]
        return ""

    def label(self, url: str) -> Optional[str]:
        return self.labels.get(self.locate(url))


def names_label(text: str, label: Optional[str]) -> bool:
    """True when the text names the image's colour and shape and no other colour or shape."""
    if not label or not text:
        return False
    words = set(re.findall(r"[a-z]+", text.lower()))
    colour, shape = label.split()
    colours, shapes = words & set(world.COLOURS), words & set(world.SHAPES)
    return colours == {colour} and shapes == {shape}


def images_by_id(stage_dir: Path, ids: set[str]) -> dict[str, KeptImage]:
    return {img.id: img for img in kept_images(stage_dir) if img.id in ids}


def realsyn_images(realsyn_dir: Path, images_dir: Path) -> list[KeptImage]:
    """The images of the built RealSyn shards, in shard order (from the parquet index's image_id)."""
    from realsyn_pl.construct.engine.image_source import record_bytes, take_rows
    from realsyn_pl.construct.release.write import locate

    parts = [pq.read_table(p, columns=["image_id"]).column("image_id")
             for p in sorted(realsyn_dir.glob("[0-9]*.parquet"))]
    ids = pa.chunked_array([c for part in parts for c in part.chunks], pa.string()).combine_chunks()
    found: dict[int, KeptImage] = {}
    for s, ks, rows in locate(images_dir, None, ids):
        path = images_dir / f"images-{s:05d}.parquet"
        urls = take_rows(path, rows, ["url"]).column("url").to_pylist()
        for k, data in record_bytes(path, rows, images_dir.parent, s):
            found[int(ks[k])] = KeptImage(ids[int(ks[k])].as_py(), urls[k], data)
    return [found[k] for k in range(len(ids))]


def write_pairs(images: Sequence[KeptImage], texts: Sequence[dict], out_dir: Path, per_shard: int = 500) -> Path:
    """RealSyn-layout shards: texts[i] holds text1 (the .txt) and optionally text2, text3, syn_text."""
    with ShardWriter(out_dir, per_shard) as writer:
        for i, (img, t) in enumerate(zip(images, texts)):
            meta = {k: v for k, v in t.items() if k != "text1"} | {"image_id": img.id, "url": img.url}
            writer.write({"key": f"{i:08d}", "jpg": img.data, "txt": t["text1"], "json": meta})
    return out_dir


def write_pairs_once(images: Sequence[KeptImage], texts: Sequence[str], out_dir: Path) -> Path:
    """One-text shards, unless a complete set is already there (sizes.json is written last)."""
    if (out_dir / "sizes.json").is_file():
        return out_dir
    return write_pairs(images, [{"text1": t} for t in texts], out_dir)


def random_sample_shards(balance_dir: Path, images_dir: Path, n: int, seed: int, out_dir: Path) -> Path:
    """RealSyn without balance sampling: a uniform sample of n in-window pairs, with all four texts."""
    if (out_dir / "sizes.json").is_file():
        return out_dir
    rows = [r for p in sorted(balance_dir.glob("balanced-*.parquet"))
            for r in pq.read_table(p, columns=["id", "texts", "syn_text"]).to_pylist()]
    rows = random.Random(seed).sample(rows, min(n, len(rows)))
    found = images_by_id(images_dir, {r["id"] for r in rows})
    texts = []
    for r in rows:
        t = (r["texts"] or []) + ["", "", ""]
        texts.append({"text1": t[0], "text2": t[1], "text3": t[2], "syn_text": r["syn_text"] or ""})
    return write_pairs([found[r["id"]] for r in rows], texts, out_dir)


def adjacent_texts(images: Sequence[KeptImage], corpus: Corpus) -> list[str]:
    return [corpus.adjacent_text(img.url) for img in images]


def random_texts(n: int, pool: Sequence[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]
