"""Stage `tag` (predict): open-set tags per image, scored with the CLIP teacher (`embed.model`).

Input: `{tag.image_stage}/{image_kind}-i.parquet`. Vocabulary: the files in `tag.vocab` (default: the general list
shipped with realsyn_pl) plus, with tag.use_mined=true, the tags the `mine_tags` stage found in the sentence pool.
Output: `tag/tags-i.parquet` {id, tags (best first), tag_scores (cosine)}. Drops: no_image_data, decode_error.
An image with no tag above the threshold is kept with an empty list (counted as produced "no_tags").
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import torch

from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.predict import PredictTask, run_predict_task
from realsyn_pl.construct.engine.records import write_records
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError
from realsyn_pl.construct.generate.caption import load_rgb
from realsyn_pl.data.writers import ShardResult

NAME = "tag"
TAGS = pa.schema([("id", pa.string()), ("tags", pa.list_(pa.string())), ("tag_scores", pa.list_(pa.float32()))])


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


class TagTask(PredictTask):
    name = NAME
    columns = ["id", "bytes", "path"]

    def __init__(self, cfg: BuildConfig, bundle: Optional[Any] = None, tags: Optional[list[str]] = None):
        """`bundle` (model, tokenizer, preprocess_val) replaces the teacher built from embed.model (tests plant a
        model with known geometry); `tags` replaces the configured vocabulary."""
        t = cfg.tag
        self.cfg, self.batch_size, self.workers = cfg, t.batch_size, t.workers
        self.input_stage, self.input_kind = t.image_stage, t.image_kind
        self.tags = tags if tags is not None else vocabulary(cfg)
        if bundle is None:
            from realsyn_pl.models.factory import create_clip

            torch.manual_seed(cfg.seed)
            bundle = create_clip(cfg.embed.model)
        self.bundle = bundle

    @staticmethod
    def config_of(cfg: BuildConfig, tags: list[str]) -> dict[str, Any]:
        m = cfg.embed.model
        vocab_hash = hashlib.sha256("\n".join(tags).encode()).hexdigest()[:16]
        return (asdict(cfg.tag) | {"batch_size": None, "workers": None, "text_batch_size": None}
                | {"teacher": {"name": m.name, "pretrained": m.pretrained, "custom": m.custom}, "seed": cfg.seed,
                   "vocab_size": len(tags), "vocab_sha256": vocab_hash})

    def stage_config(self) -> dict[str, Any]:
        return self.config_of(self.cfg, self.tags)

    def load(self, row: dict[str, Any]) -> torch.Tensor:
        return self.bundle.preprocess_val(load_rgb(row))

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items)

    def build_module(self):
        from realsyn_pl.models.tagger import Tagger

        t = self.cfg.tag
        return Tagger(self.bundle.model, self.bundle.tokenizer, self.tags, t.templates, t.threshold, t.top_n,
                      t.text_batch_size)

    def write(self, stage: Stage, input_path: Path, result: ShardResult) -> Counts:
        c, rows = result.skip_counts(), []
        for i, tags, scores in zip(result.ids, result.outputs.get("tags", []), result.outputs.get("tag_scores", [])):
            c.keep()
            if not tags:
                c.produce("no_tags")
            rows.append({"id": i, "tags": list(tags), "tag_scores": [float(s) for s in scores]})
        write_records(stage.path("tags", result.index), rows, TAGS)
        return c


def run(cfg: BuildConfig) -> bool:
    tags = vocabulary(cfg)
    if Stage(cfg.work_dir, NAME, TagTask.config_of(cfg, tags), [cfg.tag.image_stage]).skip_complete(cfg.force):
        return True
    return run_predict_task(TagTask(cfg, tags=tags), cfg.work_dir, cfg.trainer, cfg.progress, cfg.force)
