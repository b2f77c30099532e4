"""A procedural interleaved corpus in OBELICS layout: the demo's stand-in for web documents.

Each document is a page of images from the shape world (realsyn_pl.demo.world) alternating with paragraphs. As on
the web, text and images are only loosely tied: a paragraph may describe the image beside it accurately, describe it
wrongly (another colour or shape), describe an image elsewhere, or be off-topic shop talk, boilerplate repeated across
pages, or carry URLs and emoji. Some images are re-posted (near-duplicates), undersized or broken. So pairing an
image with its adjacent text is noisy, and the RealSyn pipeline (filters, dedup, retrieval from the whole sentence
pool) has something to fix.

Output: `docs-{i:05d}.parquet` with OBELICS columns (`texts`, `images` as aligned lists with one of each position
null; images as {bytes, path} structs; `metadata` as a JSON list with a `src` per image), and `truth.jsonl`: per
image position, the object it shows — for measuring the built data, never read by the pipeline.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from realsyn_pl.data.shard_writer import encode_jpeg
from realsyn_pl.demo import world
from realsyn_pl.demo.world import Thing

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([
    ("texts", pa.list_(pa.string())),
    ("images", pa.list_(IMAGE_STRUCT)),
    ("metadata", pa.string()),
])

# Accurate descriptions: an action verb and attributes, so they can pass the CAT rule like real captions do.
TRUE_TEMPLATES = (
    "A {size} {colour} {shape} sits on a {background} background in this photo.",
    "Here you can see a {colour} {shape} standing against a plain {background} wall.",
    "We painted a {size} {colour} {shape} on a {background} board last week.",
    "The {colour} {shape} shown here is lying on a {background} surface.",
    "My daughter drew this {size} {colour} {shape} on {background} paper.",
    "Look at the {colour} {shape} floating over the {background} backdrop.",
)
# Loose or unrelated remarks, boilerplate, shop talk: what surrounds images on real pages.
OFF_TOPIC = (
    "Shipping takes three to five working days for most orders.",
    "Please read our privacy policy before you leave a comment.",
    "The weather was lovely when we opened the store this morning.",
    "Our team will answer every question within one business day.",
    "Prices include tax and may change without notice.",
    "We have been selling handmade crafts since the early nineties.",
)
BOILERPLATE = (
    "Click here to subscribe to our newsletter.",
    "All rights reserved by the owners of this site.",
    "Share this post with your friends.",
)
NOISY = (
    "Visit https://shop.example.com/deals for more pictures like this.",
    "Love this one so much 😍😍",
    "Nice.",
)


@dataclass
class CorpusConfig:
    documents: int = 400
    docs_per_file: int = 100
    seed: int = 0
    image_px: int = 112  # above the 100 px quality bar; undersized images are drawn smaller
    max_images: int = 3
    p_wrong: float = 0.3  # a description with a wrong colour or shape
    p_elsewhere: float = 0.15  # a true description of an object that is not on this page
    p_repost: float = 0.08  # the image is a re-post of an earlier one (near-duplicate)
    p_small: float = 0.05
    p_broken: float = 0.03
    # Zipf exponent over the 24 colour x shape concepts (in a seeded order): web data is long-tailed, which is
    # what semantic balance sampling is for. 0 = uniform.
    concept_skew: float = 1.0


@dataclass
class ImageTruth:
    doc: int
    position: int
    label: Optional[str]  # "colour shape"; None for a broken image
    status: str  # ok | repost | small | broken


def describe(thing: Thing, rng: random.Random) -> str:
    return rng.choice(TRUE_TEMPLATES).format(size=thing.size, colour=thing.colour, shape=thing.shape,
                                             background=thing.background)


def wrong_thing(thing: Thing, rng: random.Random) -> Thing:
    """The same object with its colour or its shape changed: plausible but false."""
    if rng.random() < 0.5:
        return Thing(rng.choice([c for c in world.COLOURS if c != thing.colour]), thing.shape, thing.size,
                     thing.background)
    return Thing(thing.colour, rng.choice([s for s in world.SHAPES if s != thing.shape]), thing.size,
                 thing.background)


def paragraph(thing: Optional[Thing], cfg: CorpusConfig, rng: random.Random) -> str:
    """Two to four sentences next to an image: maybe a (true or false) description, plus page noise."""
    sentences = []
    if thing is not None:
        roll = rng.random()
        if roll < cfg.p_wrong:
            sentences.append(describe(wrong_thing(thing, rng), rng))
        elif roll < cfg.p_wrong + cfg.p_elsewhere:
            sentences.append(describe(world.random_thing(rng), rng))
        else:
            sentences.append(describe(thing, rng))
    for _ in range(rng.randint(1, 3)):
        pool = rng.choices((OFF_TOPIC, BOILERPLATE, NOISY), weights=(5, 3, 2))[0]
        sentences.append(rng.choice(pool))
    rng.shuffle(sentences)
    return " ".join(sentences)


def _image(thing: Thing, px: int, rng: random.Random) -> bytes:
    return encode_jpeg(world.render(thing, rng, px), quality=90)


def concept_weights(cfg: CorpusConfig) -> dict[tuple[str, str], float]:
    """(colour, shape) -> probability, Zipf-distributed over a seeded order of the concepts."""
    concepts = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    random.Random(cfg.seed + 99).shuffle(concepts)
    raw = [1.0 / (rank + 1) ** cfg.concept_skew for rank in range(len(concepts))]
    return {c: w / sum(raw) for c, w in zip(concepts, raw)}


def skewed_thing(weights: dict[tuple[str, str], float], rng: random.Random) -> Thing:
    colour, shape = rng.choices(list(weights), weights=list(weights.values()))[0]
    return Thing(colour, shape, rng.choice(world.SIZES), rng.choice(list(world.BACKGROUNDS)))


def documents(cfg: CorpusConfig) -> Iterator[tuple[dict, list[ImageTruth]]]:
    """Rows in OBELICS layout, with the truth about every image position."""
    rng = random.Random(cfg.seed)
    weights = concept_weights(cfg)
    posted: list[Thing] = []
    for d in range(cfg.documents):
        texts: list[Optional[str]] = []
        images: list[Optional[dict]] = []
        meta: list[Optional[dict]] = []
        truth: list[ImageTruth] = []
        if rng.random() < 0.5:  # pages often open with text
            texts.append(paragraph(None, cfg, rng)), images.append(None), meta.append(None)
        for _ in range(rng.randint(1, cfg.max_images)):
            p_ok = 1 - cfg.p_repost - cfg.p_small - cfg.p_broken
            status = rng.choices(("ok", "repost", "small", "broken"),
                                 weights=(p_ok, cfg.p_repost, cfg.p_small, cfg.p_broken))[0]
            if status == "repost" and not posted:
                status = "ok"
            thing = rng.choice(posted) if status == "repost" else skewed_thing(weights, rng)
            px = rng.randint(40, 90) if status == "small" else cfg.image_px
            data = _image(thing, px, rng)
            if status == "broken":
                data = data[: len(data) // 3]  # a truncated download
            position = len(texts)
            texts.append(None)
            images.append({"bytes": data, "path": f"doc{d:06d}_{position}.jpg"})
            meta.append({"src": f"https://demo.invalid/doc{d:06d}/{position}.jpg"})
            truth.append(ImageTruth(d, position, None if status == "broken" else thing.label, status))
            posted.append(thing)
            texts.append(paragraph(thing, cfg, rng)), images.append(None), meta.append(None)
        yield {"texts": texts, "images": images, "metadata": json.dumps(meta)}, truth


def write_corpus(out_dir: str | Path, cfg: CorpusConfig) -> list[Path]:
    """Write the corpus (parquet files + truth.jsonl) atomically; an existing complete corpus is kept."""
    out = Path(out_dir)
    done = out / "_SUCCESS"
    files = sorted(out.glob("docs-*.parquet"))
    if done.is_file():
        return files
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    truths: list[ImageTruth] = []
    files = []

    def flush() -> None:
        path = out / f"docs-{len(files):05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
        os.replace(tmp, path)
        files.append(path)
        rows.clear()

    for row, truth in documents(cfg):
        rows.append(row)
        truths.extend(truth)
        if len(rows) == cfg.docs_per_file:
            flush()
    if rows:
        flush()
    with open(out / "truth.jsonl", "w") as fh:
        for t in truths:
            fh.write(json.dumps(t.__dict__) + "\n")
    done.write_text(json.dumps({"documents": cfg.documents, "images": len(truths), "files": len(files)}))
    return files
