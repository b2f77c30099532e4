"""Stage `caption` (predict): one concise caption per image with a transformers image-to-text model.

Input: `{caption.image_stage}/{image_kind}-i.parquet` (stage 1's deduplicated images; their bytes through
engine/image_source.py: inline, the download shard's row src_row, or the local path).
Output: `caption/captions-i.parquet` {id, caption}. Drops: no_image_data, decode_error, empty_caption.
"""
from __future__ import annotations

import io
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import torch
from PIL import Image

from realsyn_pl.construct.engine.actors import run_predict_task
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor
from realsyn_pl.construct.engine.image_source import RECORD_COLUMNS, ImageSource, record_columns
from realsyn_pl.construct.engine.predict import PredictJob, PredictTask, SkipRow
from realsyn_pl.construct.engine.records import write_records
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError
from realsyn_pl.data.writers import ShardResult

NAME = "caption"
CAPTIONS = pa.schema([("id", pa.string()), ("caption", pa.string())])


def load_rgb(row: dict[str, Any], images: Optional[ImageSource]) -> Image.Image:
    """The row's image as RGB, or SkipRow with the reason (shared by caption and tag); `images`: the source of the
    row's shard (set in begin_shard)."""
    if images is None:
        raise RuntimeError("load_rgb before begin_shard")
    data = images.row(row)
    if data is None:
        raise SkipRow("no_image_data")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception:  # PIL raises many types for a bad file
        raise SkipRow("decode_error") from None


class CaptionTask(PredictTask):
    name = NAME
    columns = list(RECORD_COLUMNS)
    images: Optional[ImageSource] = None

    def __init__(self, cfg: BuildConfig):
        from realsyn_pl.models.captioner import load_captioner

        c = cfg.caption
        self.cfg, self.batch_size, self.workers = cfg, c.batch_size, c.workers
        self.input_stage, self.input_kind = c.image_stage, c.image_kind
        torch.manual_seed(cfg.seed)  # a random-init model (tests) must be the same in every process
        try:
            self.bundle = load_captioner(c.model)
        except (OSError, ValueError, KeyError) as err:
            raise StageError(f"caption.model={c.model!r} cannot be loaded: {str(err).splitlines()[0]}") from None

    @staticmethod
    def config_of(cfg: BuildConfig) -> dict[str, Any]:
        return asdict(cfg.caption) | {"batch_size": None, "workers": None, "seed": cfg.seed}

    def stage_config(self) -> dict[str, Any]:
        return self.config_of(self.cfg)

    @classmethod
    def job(cls, cfg: BuildConfig) -> PredictJob:
        c = cfg.caption
        return PredictJob(NAME, c.image_stage, c.image_kind, cls.config_of(cfg), [c.image_stage], partial(cls, cfg))

    def begin_shard(self, index: int, path: Path) -> None:
        self.columns = record_columns(path)
        self.images = ImageSource(Path(self.cfg.work_dir), index)

    def load(self, row: dict[str, Any]) -> torch.Tensor:
        im = load_rgb(row, self.images)
        return self.bundle.image_processor(images=im, return_tensors="pt")["pixel_values"][0]

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items)

    def build_module(self):
        from realsyn_pl.models.captioner import Captioner, generation_kwargs

        pad = self.bundle.tokenizer.pad_token_id
        if pad is None:
            pad = self.bundle.tokenizer.eos_token_id
        return Captioner(self.bundle, generation_kwargs(self.cfg.caption, pad), self.cfg.caption.prompt)

    def write(self, stage: Stage, input_path: Path, result: ShardResult) -> Counts:
        c, rows = result.skip_counts(), []
        for i, cap in zip(result.ids, result.outputs.get("caption", [])):
            if cap.strip():
                c.keep()
                rows.append({"id": i, "caption": cap})
            else:
                c.drop("empty_caption")
        write_records(stage.path("captions", result.index), rows, CAPTIONS)
        return c


def run(cfg: BuildConfig, ex: Executor) -> bool:
    if not cfg.caption.enabled:
        print(f"[build] {NAME}: disabled (caption.enabled=false), the rewriter gets no captions", flush=True)
        return True
    return run_predict_task(CaptionTask.job(cfg), ex, cfg.work_dir, cfg.trainer, cfg.force)
