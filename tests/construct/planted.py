"""A planted stage-1 output for the stage-2/4 tests: done `dedup_images` and `dedup_sentences` stage directories
written through the stage framework, with embeddings made around known centres.

- C centres (random unit vectors in d dims: nearly orthogonal); each has `per_cluster` background sentences near it.
- Each image sits near one centre; for every image, `planted` sentences are made very close to the image itself
  (decreasing closeness), so its true top-k texts are exactly those, best first.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from realsyn_pl.construct.engine.arrays import write_array_shard
from realsyn_pl.construct.engine.records import write_records
from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES, PPL_SENTENCES
from realsyn_pl.construct.engine.stage import Counts, Stage
from support import write_stage


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def jpeg(colour: tuple[int, int, int], w: int = 48, h: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


@dataclass
class Planted:
    centres: np.ndarray
    image_ids: list[str]
    image_centre: dict[str, int]
    truth: dict[str, list[str]]      # image id -> planted sentence ids, best first
    texts: dict[str, str]            # sentence id -> text
    image_emb: dict[str, np.ndarray]


def _write_stage(work: Path, name: str, kind: str, schema, shards: list[list[dict]], embs: list[np.ndarray]):
    stage = Stage(work, name, {"planted": True})

    def work_fn(i: int) -> Counts:
        write_records(stage.path(kind, i), shards[i], schema)
        write_array_shard(stage.dir, "emb", i, [r["id"] for r in shards[i]], embs[i], "float16")
        c = Counts()
        c.keep(len(shards[i]))
        return c

    write_stage(stage, range(len(shards)), work_fn)


def planted_work(work: Path, n_centres: int = 8, per_cluster: int = 12, images_per_centre: int = 3,
                 planted: int = 3, d: int = 32, seed: int = 0, sentence_shards: int = 3,
                 image_shards: int = 2) -> Planted:
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_centres, d)))
    sent_rows, sent_emb, texts = [], [], {}
    image_rows, image_emb, truth, image_centre, emb_of = [], [], {}, {}, {}

    def add_sentence(vec: np.ndarray, text: str) -> str:
        sid = f"doc-{len(sent_rows) // 5:05d}-000000/s-{len(sent_rows) % 5}"
        sent_rows.append({"id": sid, "doc_id": sid.split("/")[0], "text": text, "entropy": 1.0, "ppl": 50.0})
        sent_emb.append(vec)
        texts[sid] = text
        return sid

    for c in range(n_centres):
        for m in range(per_cluster):
            add_sentence(unit(centres[c] + rng.normal(scale=0.45 / np.sqrt(d), size=d)), f"centre {c} background {m}")
        for m in range(images_per_centre):
            img = unit(centres[c] + rng.normal(scale=0.3 / np.sqrt(d), size=d))
            iid = f"doc-{90000 + len(image_rows):05d}-000000/img-0"
            ids = [add_sentence(unit(img + rng.normal(scale=s / np.sqrt(d), size=d)), f"planted {iid} rank {r}")
                   for r, s in enumerate(np.linspace(0.03, 0.12, planted))]
            # the truth order is by the cosine of the stored fp16 values
            f16 = lambda v: np.asarray(v, np.float16).astype(np.float32)  # noqa: E731
            sims = [float(f16(img) @ f16(sent_emb[-planted + r])) for r in range(planted)]
            truth[iid] = [ids[o] for o in np.argsort(-np.asarray(sims), kind="stable")]
            image_rows.append({"id": iid, "doc_id": iid.split("/")[0], "url": f"http://example.invalid/{iid}.jpg",
                               "path": None, "bytes": jpeg((40 * c % 256, 30 * m % 256, 128)),
                               "width": 48, "height": 40, "sha256": iid})
            image_emb.append(img)
            image_centre[iid] = c
            emb_of[iid] = img
    order = rng.permutation(len(sent_rows))  # shards must not be grouped by centre
    sent_rows = [sent_rows[o] for o in order]
    sent_emb = np.asarray(sent_emb)[order]
    split = np.array_split(np.arange(len(sent_rows)), sentence_shards)
    _write_stage(work, "dedup_sentences", "sentences", PPL_SENTENCES, [[sent_rows[i] for i in s] for s in split],
                 [sent_emb[s] for s in split])
    split = np.array_split(np.arange(len(image_rows)), image_shards)
    image_emb = np.asarray(image_emb)
    _write_stage(work, "dedup_images", "images", FILTERED_IMAGES, [[image_rows[i] for i in s] for s in split],
                 [image_emb[s] for s in split])
    return Planted(centres, [r["id"] for r in image_rows], image_centre, truth, texts, emb_of)


def set_dotted(cfg, over: dict) -> None:
    """Set dataclass config fields by dotted key ({"balance.k": 4}), as a key=value override would."""
    for key, value in over.items():
        *parents, leaf = key.split(".")
        obj = cfg
        for a in parents:
            obj = getattr(obj, a)
        setattr(obj, leaf, value)
