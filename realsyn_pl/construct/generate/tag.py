"""Stage `tag` (predict): open-set tags per image, scored with the CLIP teacher (`embed.model`).

Input: `{tag.image_stage}/{image_kind}-i.parquet`. Vocabulary: the files in `tag.vocab` (default: the general list
shipped with realsyn_pl) plus, with tag.use_mined=true, the tags the `mine_tags` stage found in the sentence pool.
Output: `tag/tags-i.parquet` {id, tags (best first), tag_scores (cosine)}. Drops: no_image_data, decode_error.
An image with no tag above the threshold is kept with an empty list (counted as produced "no_tags").
Which tags: tag.select=top_n (the paper's RAM++ use, the default): every tag >= tag.threshold, best first, at most
tag.top_n. tag.select=margin: only tags the teacher separates from the rest -- the best tags down to the first drop
of at least tag.margin in similarity to the next-ranked tag (each >= threshold, at most top_n); an image whose top
top_n + 1 scores have no such drop gets none, because then no tag stands out from the vocabulary (counted as
produced "no_confident_tags").
Image embeddings: the tagging model is `embed.model`, so when the stored L2-normalised embeddings of the input images
were made with that same model config (image_stage dedup_images: its emb-i, aligned with images-i; image_filter:
embed_images/emb-i), they are read (joined by id within the shard; an image without one is dropped as
`no_embedding`) and only the tag texts are encoded. Otherwise (tag.reuse_embeddings=false, another image stage, no
such embeddings, a planted model) every image is encoded, its bytes through engine/image_source.py. The
manifest's config `image_embeddings` says which path ran.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

from realsyn_pl.construct.engine.actors import run_predict_task
from realsyn_pl.construct.engine.arrays import array_path, read_array_shard
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor
from realsyn_pl.construct.engine.image_source import RECORD_COLUMNS, ImageSource, record_columns
from realsyn_pl.construct.engine.predict import PredictJob, PredictTask, SkipRow
from realsyn_pl.construct.engine.records import write_records
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError, input_indices
from realsyn_pl.construct.generate.caption import load_rgb
from realsyn_pl.data.writers import ShardResult

NAME = "tag"
TAGS = pa.schema([("id", pa.string()), ("tags", pa.list_(pa.string())), ("tag_scores", pa.list_(pa.float32()))])
# tag.image_stage -> the stage whose `emb-i` arrays hold the embeddings of its images-i (same shard index, by id);
# both are made by embed_images with embed.model
STORED_EMBEDDINGS = {"dedup_images": "dedup_images", "image_filter": "embed_images"}
EMBED_STAGE = "embed_images"


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def image_embeddings(cfg: BuildConfig) -> dict[str, Any]:
    """Which image embeddings the tag stage uses: {"path": "stored", "source": "<stage>/emb", "dtype"} when the
    stored embeddings of tag.image_stage were made by embed_images with this embed.model (and seed), else
    {"path": "encoded", "reason": ...}."""
    from realsyn_pl.construct.extract.model_stages import EmbedTask

    t, work = cfg.tag, Path(cfg.work_dir)

    def encoded(reason: str) -> dict[str, Any]:
        return {"path": "encoded", "reason": reason}

    if not t.reuse_embeddings:
        return encoded("tag.reuse_embeddings=false")
    if t.image_kind != "images" or t.image_stage not in STORED_EMBEDDINGS:
        return encoded(f"no stored embeddings for tag.image_stage={t.image_stage} (image_kind={t.image_kind})")
    emb = Stage(work, EMBED_STAGE, {}).manifest() or {}
    if not emb.get("done"):
        return encoded(f"{EMBED_STAGE} is not complete")
    want = EmbedTask.config_of(cfg)
    if not (_same(emb["config"].get("model"), want["model"]) and _same(emb["config"].get("seed"), want["seed"])):
        return encoded(f"{EMBED_STAGE} was built with another model than embed.model")
    source = work / STORED_EMBEDDINGS[t.image_stage]
    try:
        indices = input_indices(work / t.image_stage, t.image_kind)
    except StageError:
        return encoded(f"{t.image_stage} is not complete")
    if not (Stage(work, source.name, {}).manifest() or {}).get("done") or not all(
            array_path(source, "emb", i).is_file() for i in indices):
        return encoded(f"{source.name} has no emb array for every shard")
    return {"path": "stored", "source": f"{source.name}/emb", "dtype": emb["config"].get("dtype")}


def vocabulary(cfg: BuildConfig) -> list[str]:
    """The tag vocabulary this build uses (general list(s) first, then mined tags), without repeats."""
    from realsyn_pl.construct.generate.mine_tags import NAME as MINE
    from realsyn_pl.construct.generate.mine_tags import mined_tags_path
    from realsyn_pl.models.tagger import merge_vocab, read_vocab

    lists = []
    for path in cfg.tag.vocab:
        try:
            lists.append(read_vocab(path))
        except FileNotFoundError as err:
            raise StageError(str(err)) from None
    if cfg.tag.use_mined:
        mined = mined_tags_path(cfg.work_dir)
        if not (Stage(cfg.work_dir, MINE, {}).manifest() or {}).get("done") or not mined.is_file():
            raise StageError(f"tag.use_mined=true but the {MINE} stage is not complete in {cfg.work_dir}: "
                             f"run `build {MINE}` first, or set tag.use_mined=false")
        lists.append(read_vocab(mined))
    tags = merge_vocab(lists)
    if not tags:
        raise StageError("the tag vocabulary is empty (tag.vocab)")
    return tags


SELECT_MODES = ("top_n", "margin")


def check_select(cfg: BuildConfig) -> None:
    if cfg.tag.select not in SELECT_MODES:
        raise StageError(f"tag.select must be one of {', '.join(SELECT_MODES)}, got {cfg.tag.select!r}")


def confident_tags(tags: list[str], scores: list[float], threshold: float, margin: float, top_n: int
                   ) -> tuple[list[str], list[float]]:
    """tag.select=margin on one image's ranked tags (best first, one more than top_n when the vocabulary has it):
    the tags above the first drop of >= margin to the next-ranked score, if that drop comes within the first top_n;
    then only those >= threshold. Without such a drop no tag stands out from the vocabulary, so none is kept rather
    than a guess (a wrong tag is what the paper's LLM rewriter is told to weigh; a template merge passes it on)."""
    for j in range(min(top_n, len(scores) - 1)):
        if scores[j] - scores[j + 1] >= margin:
            keep = [k for k in range(j + 1) if scores[k] >= threshold]
            return [tags[k] for k in keep], [scores[k] for k in keep]
    return [], []


class TagTask(PredictTask):
    name = NAME
    columns = list(RECORD_COLUMNS)
    images: Optional[ImageSource] = None

    def __init__(self, cfg: BuildConfig, bundle: Optional[Any] = None, tags: Optional[list[str]] = None):
        """`bundle` (model, tokenizer, preprocess_val) replaces the teacher built from embed.model (tests plant a
        model with known geometry); `tags` replaces the configured vocabulary."""
        t = cfg.tag
        check_select(cfg)
        self.cfg, self.batch_size, self.workers = cfg, t.batch_size, t.workers
        self.input_stage, self.input_kind = t.image_stage, t.image_kind
        self.tags = tags if tags is not None else vocabulary(cfg)
        self.source = image_embeddings(cfg) if bundle is None else {"path": "encoded", "reason": "a model was given"}
        self.stored = self.source["path"] == "stored"
        if self.stored:  # only the ids are read; the embeddings come from the source stage's arrays
            self.columns = ["id"]
            self.emb_dir = Path(cfg.work_dir) / self.source["source"].split("/")[0]
        self.emb_row: dict[str, int] = {}
        self.emb: Optional[np.ndarray] = None
        if bundle is None:
            from realsyn_pl.models.factory import create_clip

            torch.manual_seed(cfg.seed)
            bundle = create_clip(cfg.embed.model)
        self.bundle = bundle

    @staticmethod
    def config_of(cfg: BuildConfig, tags: list[str], source: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        m = cfg.embed.model
        vocab_hash = hashlib.sha256("\n".join(tags).encode()).hexdigest()[:16]
        return (asdict(cfg.tag) | {"batch_size": None, "workers": None, "text_batch_size": None}
                | {"teacher": {"name": m.name, "pretrained": m.pretrained, "custom": m.custom}, "seed": cfg.seed,
                   "vocab_size": len(tags), "vocab_sha256": vocab_hash,
                   "image_embeddings": source if source is not None else image_embeddings(cfg)})

    def stage_config(self) -> dict[str, Any]:
        return self.config_of(self.cfg, self.tags, self.source)

    @staticmethod
    def inputs_of(cfg: BuildConfig, source: Optional[dict[str, Any]] = None) -> list[str]:
        """The stage directories tag reads: the images, the stage of the stored embeddings when they are used, and
        mine_tags with tag.use_mined=true (their fingerprints are part of the stage's hash)."""
        from realsyn_pl.construct.generate.mine_tags import NAME as MINE

        source = source if source is not None else image_embeddings(cfg)
        stored = [source["source"].split("/")[0]] if source["path"] == "stored" else []
        return list(dict.fromkeys([cfg.tag.image_stage, *stored, *([MINE] if cfg.tag.use_mined else [])]))

    def stage_inputs(self) -> list[str]:
        return self.inputs_of(self.cfg, self.source)

    @classmethod
    def job(cls, cfg: BuildConfig, tags: list[str], source: dict[str, Any]) -> PredictJob:
        t = cfg.tag
        return PredictJob(NAME, t.image_stage, t.image_kind, cls.config_of(cfg, tags, source),
                          cls.inputs_of(cfg, source), partial(cls, cfg, tags=tags))

    def begin_shard(self, index: int, path: Path) -> None:
        if self.stored:
            ids, self.emb = read_array_shard(self.emb_dir, "emb", index, mmap=True)
            self.emb_row = {i: j for j, i in enumerate(ids)}
        else:  # encoded: the bytes come through image_source (inline, download row src_row, or path)
            self.columns = record_columns(path)
            self.images = ImageSource(Path(self.cfg.work_dir), index)

    def load(self, row: dict[str, Any]) -> torch.Tensor:
        if self.stored:
            j = self.emb_row.get(row["id"])
            if j is None:
                raise SkipRow("no_embedding")
            return torch.from_numpy(np.asarray(self.emb[j], dtype=np.float32))
        return self.bundle.preprocess_val(load_rgb(row, self.images))

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items)

    def build_module(self):
        from realsyn_pl.models.tagger import Tagger

        t = self.cfg.tag
        threshold, top_n = t.threshold, t.top_n
        if t.select == "margin":  # the drop after the last kept tag needs the next one's score, whatever it is
            threshold, top_n = float("-inf"), t.top_n + 1
        return Tagger(self.bundle.model, self.bundle.tokenizer, self.tags, t.templates, threshold, top_n,
                      t.text_batch_size, stored_embeddings=self.stored)

    def write(self, stage: Stage, input_path: Path, result: ShardResult) -> Counts:
        t = self.cfg.tag
        c, rows = result.skip_counts(), []
        for i, tags, scores in zip(result.ids, result.outputs.get("tags", []), result.outputs.get("tag_scores", [])):
            c.keep()
            if t.select == "margin":
                ranked = len(tags)
                tags, scores = confident_tags(list(tags), list(scores), t.threshold, t.margin, t.top_n)
                if not tags and ranked:
                    c.produce("no_confident_tags")
            if not tags:
                c.produce("no_tags")
            rows.append({"id": i, "tags": list(tags), "tag_scores": [float(s) for s in scores]})
        write_records(stage.path("tags", result.index), rows, TAGS)
        return c


def run(cfg: BuildConfig, ex: Executor) -> bool:
    check_select(cfg)
    tags = vocabulary(cfg)
    source = image_embeddings(cfg)
    job = TagTask.job(cfg, tags, source)
    if job.stage(cfg.work_dir, cfg.trainer.precision).skip_complete(cfg.force):
        return True
    how = (f"stored {source['source']} ({source['dtype']})" if source["path"] == "stored"
           else f"encoded ({source['reason']})")
    print(f"[build] {NAME}: image embeddings {how}", flush=True)
    return run_predict_task(job, ex, cfg.work_dir, cfg.trainer, cfg.force)
