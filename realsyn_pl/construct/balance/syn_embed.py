"""Stage `embed_syn_text` (predict): the embedding model's text tower over every syn_text, for the balance window.

The paper's window is cosine(image, syn_text) with EVA02-CLIP E/14-plus, the same model that embedded the pools, so
this is `embed_sentences` pointed at the syn_text stage's records (`syn_text/images-i.parquet`, column syn_text).
Output `emb-i.npy` + ids (image ids) per syn_text shard i; drops empty_text.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from realsyn_pl.construct.engine.actors import run_predict_task
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor
from realsyn_pl.construct.engine.predict import PredictJob
from realsyn_pl.construct.extract.model_stages import EmbedTask

NAME, INPUT, KIND = "embed_syn_text", "syn_text", "images"


class SynTextEmbedTask(EmbedTask):
    def __init__(self, cfg: BuildConfig):
        # the text tower on the syn_text column, with the same seeded construction as embed_* (random-init models
        # must match) and the same embed.dtype check
        super().__init__(cfg, NAME, (cfg.balance.syn_text_stage, KIND), "sentences", "syn_text")

    @staticmethod
    def config_of(cfg: BuildConfig) -> dict[str, Any]:
        return EmbedTask.config_of(cfg) | {"syn_text_stage": cfg.balance.syn_text_stage}

    @classmethod
    def job(cls, cfg: BuildConfig) -> PredictJob:  # type: ignore[override]
        src = cfg.balance.syn_text_stage
        return PredictJob(NAME, src, KIND, cls.config_of(cfg), [src], partial(cls, cfg))


def run(cfg: BuildConfig, ex: Executor) -> bool:
    return run_predict_task(SynTextEmbedTask.job(cfg), ex, cfg.work_dir, cfg.trainer, cfg.force)
