"""Stage `embed_syn_text` (predict): the embedding model's text tower over every syn_text, for the balance window.

The paper's window is cosine(image, syn_text) with EVA02-CLIP E/14-plus, the same model that embedded the pools, so
this is `embed_sentences` pointed at the syn_text stage's records (`syn_text/images-i.parquet`, column syn_text).
Output `emb-i.npy` + ids (image ids) per syn_text shard i; drops empty_text.

balance.window_text_tags=strip embeds syn_text without its image's own tags (the records' `tags` column: what the
rewriter was given), because those tags were chosen by this same model's image-text cosine and raise the score the
window reads (data_build/README.md). A text that is nothing but its tags is dropped as only_tags.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Sequence

from realsyn_pl.construct.engine.actors import run_predict_task
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor
from realsyn_pl.construct.engine.predict import PredictJob, SkipRow
from realsyn_pl.construct.engine.stage import StageError
from realsyn_pl.construct.extract.model_stages import EmbedTask

NAME, INPUT, KIND = "embed_syn_text", "syn_text", "images"
TAG_MODES = ("keep", "strip")


def strip_tags(text: str, tags: Sequence[str]) -> str:
    """`text` without every occurrence of each tag (a whole word or phrase, case-insensitive, any run of spaces
    between its words, hyphenated compounds left whole; longer tags first, so 'glass window' goes before 'window'),
    spaces tidied."""
    for tag in sorted({t.strip() for t in tags if t and t.strip()}, key=len, reverse=True):
        words = r"\s+".join(re.escape(w) for w in tag.split())
        # a hyphenated compound is one word ('window-sill' keeps its 'window'), not a tag and a '-sill' fragment
        text = re.sub(rf"(?<![\w-]){words}(?![\w-])", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)  # 'a , b' -> 'a, b' where a tag stood before a mark
    return re.sub(r"\s+", " ", text).strip()


class SynTextEmbedTask(EmbedTask):
    def __init__(self, cfg: BuildConfig):
        # the text tower on the syn_text column, with the same seeded construction as embed_* (random-init models
        # must match) and the same embed.dtype check
        super().__init__(cfg, NAME, (cfg.balance.syn_text_stage, KIND), "sentences", "syn_text")
        self.strip = cfg.balance.window_text_tags == "strip"
        if self.strip:
            self.columns = ["id", "syn_text", "tags"]

    @staticmethod
    def config_of(cfg: BuildConfig) -> dict[str, Any]:
        conf = EmbedTask.config_of(cfg) | {"syn_text_stage": cfg.balance.syn_text_stage}
        if cfg.balance.window_text_tags != "keep":  # keep (the default) leaves earlier builds' hash as it was
            conf["window_text_tags"] = cfg.balance.window_text_tags
        return conf

    def load(self, row: dict[str, Any]) -> Any:
        if self.strip and row.get("syn_text") and row["syn_text"].strip():
            stripped = strip_tags(row["syn_text"], row.get("tags") or [])
            if not re.search(r"\w", stripped):  # nothing but tags (and punctuation) left
                raise SkipRow("only_tags")
            row = {**row, "syn_text": stripped}
        return super().load(row)

    @classmethod
    def job(cls, cfg: BuildConfig) -> PredictJob:  # type: ignore[override]
        if cfg.balance.window_text_tags not in TAG_MODES:  # before an actor starts
            raise StageError(f"balance.window_text_tags must be keep or strip, got {cfg.balance.window_text_tags!r}")
        src = cfg.balance.syn_text_stage
        return PredictJob(NAME, src, KIND, cls.config_of(cfg), [src], partial(cls, cfg))


def run(cfg: BuildConfig, ex: Executor) -> bool:
    return run_predict_task(SynTextEmbedTask.job(cfg), ex, cfg.work_dir, cfg.trainer, cfg.force)
