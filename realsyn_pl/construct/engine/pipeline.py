"""Stage registry and the `build` / `predict` commands: run one stage, or every stage in order (`all`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from realsyn_pl.config import ConfigError
from realsyn_pl.construct.engine.config import BuildConfig

MODEL_STAGES = ("perplexity", "embed_images", "embed_sentences", "caption", "tag", "syn_text")
# `rewrite` names the stage by its config section; its output directory is syn_text (what balance reads).
ALIASES = {"rewrite": "syn_text"}


def _model_stage(name: str) -> Callable[[BuildConfig], bool]:
    def run(cfg: BuildConfig) -> bool:
        from realsyn_pl.construct.engine.predict import run_predict_task
        from realsyn_pl.construct.engine.stage import Stage
        from realsyn_pl.construct.extract.model_stages import EMBED_INPUTS, PPL_INPUT, EmbedTask, PerplexityTask

        if name == "perplexity" and not cfg.perplexity.enabled:
            from realsyn_pl.construct.extract.model_stages import run_perplexity_disabled

            return run_perplexity_disabled(cfg)
        if name == "perplexity":
            config, inputs = PerplexityTask.config_of(cfg), [PPL_INPUT]
        else:
            config, inputs = EmbedTask.config_of(cfg), [EMBED_INPUTS[name][0]]
        # a complete stage is skipped before its model is loaded (GPT-2 large / EVA02-E are big)
        if Stage(cfg.work_dir, name, config, inputs).skip_complete(cfg.force):
            return True
        task = PerplexityTask(cfg) if name == "perplexity" else EmbedTask(cfg, name)
        return run_predict_task(task, cfg.work_dir, cfg.trainer, cfg.progress, cfg.force)
    return run


def _stages() -> dict[str, Callable[[BuildConfig], bool]]:
    from realsyn_pl.construct.balance import sampler, syn_embed
    from realsyn_pl.construct.extract import dedup, documents, download, entropy, image_filter, sentence_stage
    from realsyn_pl.construct.generate import caption, mine_tags, rewrite, tag
    from realsyn_pl.construct.release import official, write
    from realsyn_pl.construct.retrieve import cluster, hierarchical

    return {
        # stage 1, extract/: documents -> filtered, deduplicated image and sentence pools
        "extract": documents.run,
        "download": download.run,
        "image_filter": image_filter.run,
        "embed_images": _model_stage("embed_images"),
        "dedup_images": lambda c: dedup.run(c, "dedup_images"),
        "sentence_filter": sentence_stage.run,
        "wordcount": entropy.run_wordcount,
        "entropy": entropy.run_entropy,
        "perplexity": _model_stage("perplexity"),
        "embed_sentences": _model_stage("embed_sentences"),
        "dedup_sentences": lambda c: dedup.run(c, "dedup_sentences"),
        # stage 2, retrieve/: text clusters, hierarchical retrieval
        "cluster": cluster.run,
        "retrieve": hierarchical.run,
        # stage 3, generate/: image semantic augmented generation
        "mine_tags": mine_tags.run,
        "caption": caption.run,
        "tag": tag.run,
        "syn_text": rewrite.run,
        # stage 4, balance/ and release/: the balance window, caps, RealSyn shards
        "embed_syn_text": syn_embed.run,
        "balance": sampler.run,
        "write": write.run,
        # the published RealSyn parquet files -> shards (not part of `all`)
        "release": official.run,
    }


STAGE_ORDER = ("extract", "download", "image_filter", "embed_images", "dedup_images", "sentence_filter",
               "wordcount", "entropy", "perplexity", "embed_sentences", "dedup_sentences",
               "cluster", "retrieve", "mine_tags", "caption", "tag", "syn_text",
               "embed_syn_text", "balance", "write")


def stage_dir(cfg: BuildConfig, name: str) -> Path:
    """Where stage `name` keeps its files (write and release may put theirs outside work_dir)."""
    out = {"write": cfg.write.output_dir, "release": cfg.release.output_dir}.get(name)
    return Path(out) if out is not None else Path(cfg.work_dir) / name


def force_plan(cfg: BuildConfig, names: list[str]) -> Callable[[str], bool]:
    """Whether each stage of this run is wiped and rebuilt. force=false: none; true: all; a stage name S: S, then
    each later stage whose inputs changed since it was built (judged when it is reached, after the stages before it
    ran; the others are skipped as complete or resumed), nothing before S. A later stage stale only through an input
    (no direct input moved) is not forced: in this order that input is upstream of S or outside the run, so the stage
    refuses in one line naming the chain instead of being rebuilt from it. Every rank decides the same, whenever it
    gets there: a directory rank 0 has already wiped holds `_replaced.json`, which counts as stale, and a stage begun
    without a wipe records the inputs' current fingerprints (not stale for anyone)."""
    from realsyn_pl.construct.engine.stage import is_stale, parse_force, stale_chain

    value = parse_force(cfg.force)
    if isinstance(value, bool):
        return lambda name: value
    target = ALIASES.get(value, value)
    accepted = f"true, false or a stage of this run: {', '.join(names)}"
    if target not in names:
        if target in STAGE_ORDER or target == "release":
            raise ConfigError(f"force={value}: stage {target!r} is not part of this run (build {cfg.stage}"
                              f"{'' if cfg.until is None else ' until=' + cfg.until}); force takes {accepted}")
        raise ConfigError(f"force must be {accepted}; got {value!r}")
    first = names.index(target)

    def decide(name: str) -> bool:
        i = names.index(name)
        if i <= first:
            return i == first
        if not is_stale(stage_dir(cfg, name), cfg.work_dir):
            return False
        via, changed = stale_chain(stage_dir(cfg, name), cfg.work_dir) or ([], {})
        if via:
            return False
        moved = sorted(changed)
        print(f"[build] {name}: {', '.join(moved) or 'its build'} changed since it was built: rebuilt "
              f"(force={target})", flush=True)
        return True
    return decide


def run_build(cfg: BuildConfig) -> None:
    stages = _stages()
    cfg.stage = ALIASES.get(cfg.stage, cfg.stage)
    if cfg.stage == "all":
        names = list(STAGE_ORDER)
        if cfg.until is not None:
            if cfg.until not in STAGE_ORDER:
                raise ConfigError(f"until={cfg.until!r} is not a stage of `all`: {', '.join(STAGE_ORDER)}")
            names = names[: names.index(cfg.until) + 1]
    elif cfg.stage in stages:
        names = [cfg.stage]
    else:
        raise ConfigError(f"unknown build stage {cfg.stage!r}; stages: all, {', '.join(STAGE_ORDER)}")
    from realsyn_pl.construct.engine.stage import Stage, StageError
    from realsyn_pl.data.interleaved import FormatError

    force_of = force_plan(cfg, names)
    if "syn_text" in names:  # a refused zero-shot rewrite fails now, not after stages 1-2 have run
        from realsyn_pl.construct.generate.rewrite import check_zero_shot

        try:
            check_zero_shot(cfg.rewrite)
        except StageError as err:
            raise ConfigError(str(err)) from None
    for i, name in enumerate(names):
        try:
            # the stages read cfg.force as a bool: this stage's own decision
            complete = stages[name](dataclasses.replace(cfg, force=force_of(name)))
        except (StageError, FormatError) as err:
            raise ConfigError(str(err)) from None
        if not complete and i + 1 < len(names):
            # another rank still works on this stage and the next stages need all of it. Nothing waits after the
            # last stage: no one reads it here, and `write` may keep its manifest outside work_dir (write.output_dir).
            Stage(cfg.work_dir, name, {}, []).wait_complete_any()


def run_predict(cfg: BuildConfig) -> None:
    if ALIASES.get(cfg.stage, cfg.stage) not in MODEL_STAGES:
        raise ConfigError(f"predict runs a model stage: stage must be one of {', '.join(MODEL_STAGES)}, "
                          f"got {cfg.stage!r}")
    run_build(cfg)
