"""The stage-1 model stages as PredictTasks: `embed_images`, `embed_sentences` (open_clip) and `perplexity` (LM).

embed_*: output `emb-i.npy` (embed.dtype, L2-normalised) + `emb-i.ids.parquet`, aligned with the input shard's
loadable rows. Drops: decode_error / no_image_data (images), empty_text (sentences). Image bytes come through
engine/image_source.py (inline, the download shard's row src_row, or the local path).
perplexity: output `sentences-i.parquet` with a `ppl` column, keeping perplexity.min_ppl <= PPL <= max_ppl;
drops ppl_low, ppl_high. Computed in perplexity.precision (default fp32), not trainer.precision.
Fingerprints (engine/predict.py adds the weights' content and the precision each runs in): embed_* = the model (name,
weights, custom config: its preprocessing and context length come with it), embed.dtype, seed (random-init weights);
perplexity = every perplexity.* setting but batch_size and workers (padding is masked: a row's PPL does not depend
on the rows batched with it).
"""
from __future__ import annotations

import io
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from PIL import Image

from realsyn_pl.construct.engine.arrays import DTYPES, write_array_shard
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.image_source import RECORD_COLUMNS, ImageSource, record_columns
from realsyn_pl.construct.engine.order import EMBED_INPUTS, PPL_INPUT
from realsyn_pl.construct.engine.predict import PredictJob, PredictTask, SkipRow
from realsyn_pl.construct.engine.records import iter_rows, write_records
from realsyn_pl.construct.engine.schemas import PPL_SENTENCES
from realsyn_pl.construct.engine.stage import Counts, Stage, StageError
from realsyn_pl.data.writers import ShardResult
from realsyn_pl.models.perplexity import FP32_LOGITS, trainer_precision

if TYPE_CHECKING:
    from realsyn_pl.construct.engine.executor import Executor



class EmbedTask(PredictTask):
    def __init__(self, cfg: BuildConfig, name: str, source: Optional[tuple[str, str]] = None,
                 modality: Optional[str] = None, text_column: str = "text"):
        """source: (input stage, file kind), default EMBED_INPUTS[name]; modality: images | sentences, default the
        file kind; text_column: the column sentences are read from."""
        from realsyn_pl.models.factory import create_clip

        if cfg.embed.dtype not in DTYPES:
            raise StageError(f"embed.dtype must be one of {', '.join(DTYPES)}, got {cfg.embed.dtype!r}")
        self.cfg, self.name = cfg, name
        self.input_stage, self.input_kind = source or EMBED_INPUTS[name]
        self.modality = modality or self.input_kind
        self.text_column = text_column
        self.columns = list(RECORD_COLUMNS) if self.modality == "images" else ["id", text_column]
        self.images: Optional[ImageSource] = None
        self.batch_size, self.workers = cfg.embed.batch_size, cfg.embed.workers
        torch.manual_seed(cfg.seed)  # weights not loaded from a file must be the same in every process
        self.bundle = create_clip(cfg.embed.model)

    @staticmethod
    def config_of(cfg: BuildConfig) -> dict[str, Any]:
        m = cfg.embed.model
        return {"model": {"name": m.name, "pretrained": m.pretrained, "custom": m.custom}, "dtype": cfg.embed.dtype,
                "seed": cfg.seed}

    def stage_config(self) -> dict[str, Any]:
        return self.config_of(self.cfg)

    @property
    def output_dtypes(self) -> dict[str, Any]:
        """The writer spills the embeddings batch by batch in the dtype they are stored in."""
        return {"embedding": DTYPES[self.cfg.embed.dtype]}

    @classmethod
    def job(cls, cfg: BuildConfig, name: str) -> PredictJob:
        stage, kind = EMBED_INPUTS[name]
        return PredictJob(name, stage, kind, cls.config_of(cfg), [stage], partial(cls, cfg, name))

    def begin_shard(self, index: int, path: Path) -> None:
        if self.modality == "images":  # shard i's bytes live in download shard i; older shards lack src_row
            self.columns = record_columns(path)
            self.images = ImageSource(Path(self.cfg.work_dir), index)

    def load(self, row: dict[str, Any]) -> torch.Tensor:
        if self.modality == "sentences":
            text = row.get(self.text_column)
            if not text or not text.strip():
                raise SkipRow("empty_text")
            return self.bundle.tokenizer([text])[0]
        if self.images is None:
            raise RuntimeError("EmbedTask.load on an image row before begin_shard")
        data = self.images.row(row)
        if data is None:
            raise SkipRow("no_image_data")
        try:
            with Image.open(io.BytesIO(data)) as im:
                return self.bundle.preprocess_val(im.convert("RGB"))
        except Exception:  # PIL's many error types for a bad file
            raise SkipRow("decode_error") from None

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items)

    def build_module(self):
        from realsyn_pl.models.embedder import Embedder

        return Embedder(self.bundle.model, self.modality)

    def write(self, stage: Stage, input_path: Path, result: ShardResult) -> Counts:
        emb = result.outputs.get("embedding")
        if emb is None:
            emb = np.zeros((0, 0), np.float32)
        write_array_shard(stage.dir, "emb", result.index, result.ids, emb, self.cfg.embed.dtype)
        c = result.skip_counts()
        c.keep(len(result.ids))
        return c


class PerplexityTask(PredictTask):
    name, input_stage, input_kind = "perplexity", PPL_INPUT, "sentences"
    columns = ["id", "text"]

    def __init__(self, cfg: BuildConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from realsyn_pl.models.hf_compat import dtype_kwargs

        p = cfg.perplexity
        self.cfg, self.batch_size, self.workers = cfg, p.batch_size, p.workers
        # perplexity.precision, not trainer.precision: PPL is a hard filter and bf16 moves it by several percent
        self.fp32_logits = str(p.precision) == FP32_LOGITS
        self.precision = trainer_precision(str(p.precision))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(p.model)
            torch.manual_seed(cfg.seed)
            # fp32 weights whatever the checkpoint's dtype ("*-true" precisions convert them in the Trainer)
            self.lm = AutoModelForCausalLM.from_pretrained(p.model, **dtype_kwargs(torch.float32))
        except (OSError, ValueError) as err:
            raise StageError(f"perplexity.model={p.model!r} cannot be loaded: {str(err).splitlines()[0]}") from None
        self.bos = self.tokenizer.bos_token_id
        if self.bos is None:
            raise StageError(f"perplexity.model={p.model!r}: its tokenizer has no BOS token")
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.bos

    @staticmethod
    def config_of(cfg: BuildConfig) -> dict[str, Any]:
        return asdict(cfg.perplexity) | {"workers": None, "batch_size": None}  # these do not change the output

    def stage_config(self) -> dict[str, Any]:
        return self.config_of(self.cfg)

    @classmethod
    def job(cls, cfg: BuildConfig) -> PredictJob:
        return PredictJob(cls.name, PPL_INPUT, "sentences", cls.config_of(cfg), [PPL_INPUT], partial(cls, cfg),
                          precision=str(cfg.perplexity.precision))

    def load(self, row: dict[str, Any]) -> list[int]:
        ids = self.tokenizer(row["text"], add_special_tokens=False)["input_ids"][: self.cfg.perplexity.max_tokens]
        if not ids:
            raise SkipRow("empty_text")
        return [self.bos] + ids

    def collate(self, items: list[list[int]]) -> dict[str, torch.Tensor]:
        n = max(len(x) for x in items)
        ids = torch.full((len(items), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for j, x in enumerate(items):
            ids[j, : len(x)] = torch.tensor(x)
            mask[j, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def build_module(self):
        from realsyn_pl.models.perplexity import PerplexityScorer

        return PerplexityScorer(self.lm, self.fp32_logits)

    def write(self, stage: Stage, input_path: Path, result: ShardResult) -> Counts:
        p = self.cfg.perplexity
        ppl = dict(zip(result.ids, result.outputs.get("ppl", [])))
        c, rows = result.skip_counts(), []
        for r in iter_rows(input_path):
            if r["id"] not in ppl:
                continue
            reason = ppl_reason(float(ppl[r["id"]]), p.min_ppl, p.max_ppl)
            if reason:
                c.drop(reason)
            else:
                c.keep()
                rows.append({**r, "ppl": float(ppl[r["id"]])})
        write_records(stage.path("sentences", result.index), rows, PPL_SENTENCES)
        return c


def ppl_reason(ppl: float, lo: float, hi: float) -> str | None:
    """Keep lo <= PPL <= hi (paper: 30 and 200)."""
    if not np.isfinite(ppl) or ppl > hi:
        return "ppl_high"
    if ppl < lo:
        return "ppl_low"
    return None


def run_perplexity_disabled(cfg: BuildConfig, ex: "Executor") -> bool:
    """perplexity.enabled=false: every sentence passes with ppl null; the manifest's config says so."""
    from realsyn_pl.construct.engine.executor import run_sharded
    from realsyn_pl.construct.engine.mapping import map_shard
    from realsyn_pl.construct.engine.stage import input_indices

    in_dir = Path(cfg.work_dir) / PPL_INPUT
    stage = Stage(cfg.work_dir, "perplexity", {"enabled": False}, [PPL_INPUT])

    def work(i: int) -> Counts:
        return map_shard(in_dir / f"sentences-{i:05d}.parquet", stage.path("sentences", i), PPL_SENTENCES,
                         lambda r: {**r, "ppl": None})

    return run_sharded(ex, stage, input_indices(in_dir, "sentences"), work, cfg.force)
