"""Stage registry and the `build` / `predict` commands: run one stage, or every stage in order (`all`).

Before Ray starts, the stages that read files from outside the build check them (`_preflight`), so a wrong format or
file is one line before any work. A build that ends with shards closes with a summary: the shard pattern and count, the dataset card,
and the `fit` command to run next.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from realsyn_pl.config import ConfigError
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.executor import Executor
from realsyn_pl.construct.engine.order import ACTOR_STAGES, ALIASES, MODEL_STAGES, STAGE_ORDER
from realsyn_pl.construct.engine.progress import stdout_is_terminal, third_party_bars

StageFn = Callable[[BuildConfig, Executor], bool]


def _model_stage(name: str) -> StageFn:
    def run(cfg: BuildConfig, ex: Executor) -> bool:
        from realsyn_pl.construct.engine.actors import run_predict_task
        from realsyn_pl.construct.extract.model_stages import EmbedTask, PerplexityTask, run_perplexity_disabled

        if name == "perplexity" and not cfg.perplexity.enabled:
            return run_perplexity_disabled(cfg, ex)
        job = PerplexityTask.job(cfg) if name == "perplexity" else EmbedTask.job(cfg, name)
        return run_predict_task(job, ex, cfg.work_dir, cfg.trainer, cfg.force)
    return run


def _stages() -> dict[str, StageFn]:
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
        "dedup_images": lambda c, ex: dedup.run(c, ex, "dedup_images"),
        "sentence_filter": sentence_stage.run,
        "wordcount": entropy.run_wordcount,
        "entropy": entropy.run_entropy,
        "perplexity": _model_stage("perplexity"),
        "embed_sentences": _model_stage("embed_sentences"),
        "dedup_sentences": lambda c, ex: dedup.run(c, ex, "dedup_sentences"),
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


def _preflight() -> dict[str, Callable[[BuildConfig], Any]]:
    """The stages that read files from outside the build, and their checks of those files (one line each)."""
    from realsyn_pl.construct.extract import documents
    from realsyn_pl.construct.release import official

    return {"extract": documents.check_input, "release": official.check_input}


def stage_dir(cfg: BuildConfig, name: str) -> Path:
    """Where stage `name` keeps its files (write and release may put theirs outside work_dir)."""
    out = {"write": cfg.write.output_dir, "release": cfg.release.output_dir}.get(name)
    return Path(out) if out is not None else Path(cfg.work_dir) / name


def force_plan(cfg: BuildConfig, names: list[str]) -> Callable[[str], bool]:
    """Whether each stage of this run is wiped and rebuilt. force=false: none; true: all; a stage name S: S, then
    each later stage whose inputs changed since it was built (judged when it is reached, after the stages before it
    ran; the others are skipped as complete or resumed), nothing before S. A later stage stale only through an input
    (no direct input moved) is not forced: in this order that input is upstream of S or outside the run, so the stage
    refuses in one line naming the chain instead of being rebuilt from it. A directory wiped by a forced run that was
    killed holds `_replaced.json`, which counts as stale, so a rerun with the same force rebuilds it again."""
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


def launched_as_ranks() -> Optional[str]:
    """How this process was started as one of several (torchrun, srun with several tasks), or None."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return f"rank {os.environ.get('RANK', '?')} of WORLD_SIZE={os.environ['WORLD_SIZE']} (torchrun)"
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
        return f"task {os.environ.get('SLURM_PROCID', '?')} of an srun step of {os.environ['SLURM_STEP_NUM_TASKS']}"
    return None


def run_build(cfg: BuildConfig) -> None:
    ranks = launched_as_ranks()
    if ranks is not None:
        raise ConfigError(f"build and predict run as one driver on Ray, but this process is {ranks}: start it once "
                          "(on SLURM: sbatch data_build/launch/ray_slurm.sbatch build ...; see data_build/README.md)")
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
    from realsyn_pl.construct.engine.stage import StageError
    from realsyn_pl.data.interleaved import FormatError

    force_of = force_plan(cfg, names)
    if "syn_text" in names:  # a refused zero-shot rewrite fails now, not after stages 1-2 have run
        from realsyn_pl.construct.generate.rewrite import check_zero_shot

        try:
            check_zero_shot(cfg.rewrite)
        except StageError as err:
            raise ConfigError(str(err)) from None
    for name, check in _preflight().items():  # input files that cannot work fail now, before Ray starts
        if name in names:
            try:
                check(cfg)
            except (StageError, FormatError) as err:
                raise ConfigError(str(err)) from None
    # bars drawn in place only on a terminal, as `fit` decides: a log file would keep every redraw
    with third_party_bars(cfg.progress and stdout_is_terminal()), Executor(cfg.ray, cfg.progress) as ex:
        print(f"[build] {where(ex)}: {ex.session.cpus:g} CPUs, {ex.session.gpus:g} GPUs", flush=True)
        for i, name in enumerate(names):
            ex.next_is_model_stage = i + 1 < len(names) and names[i + 1] in ACTOR_STAGES
            try:
                # the stages read cfg.force as a bool: this stage's own decision
                stages[name](dataclasses.replace(cfg, force=force_of(name)), ex)
            except (StageError, FormatError) as err:
                raise ConfigError(str(err)) from None
            except KeyboardInterrupt:
                print(f"\n[build] interrupted in {name}: the units that finished are kept; rerun the same command to "
                      "go on", file=sys.stderr, flush=True)
                raise SystemExit(130) from None
    print(next_step(cfg, names), flush=True)


def where(ex: Executor) -> str:
    if ex.local:
        return "in this process, no Ray (ray.in_process=true)"
    return f"{'embedded Ray on this machine' if ex.session.embedded else 'Ray cluster'} at {ex.session.address}"


def next_step(cfg: BuildConfig, names: list[str]) -> str:
    """The build's last lines: where the output is and what to run next."""
    last = names[-1]
    out = stage_dir(cfg, last)
    if last in ("write", "release"):
        summary = shards_summary(cfg, last)
        if summary is not None:
            return summary
        return f"[build] done: shards in {out}; pretrain on them with python -m realsyn_pl fit (urls in its manifest)"
    following = STAGE_ORDER[STAGE_ORDER.index(last) + 1:] if last in STAGE_ORDER else ()
    more = f"; next: python -m realsyn_pl build {following[0]} (or build all) with the same config" if following else ""
    return f"[build] done: {last} in {out}{more}"


def _manifest(folder: Path) -> Optional[dict[str, Any]]:
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("done") else None


def fit_command(urls: str, preset: str) -> str:
    """The `fit` command line for shards `urls`, quoted for a POSIX shell."""
    value = "data.train=[{urls: '" + urls.replace("'", "''") + "'}]"  # a YAML single-quoted string
    arg = f'"{value}"' if not set(value) & set('"$`\\!') else shlex.quote(value)
    return f"python -m realsyn_pl fit --config {preset} {arg}"


def shards_summary(cfg: BuildConfig, last: str) -> Optional[str]:
    """What `write` or `release` made, from its manifest: samples, shard pattern and count, the card, the fit command
    (the tiny CPU recipe after a smoke build's random-init embeddings, else the paper's ViT-B/32). None without one."""
    from realsyn_pl.construct.calibration import PAPER_REMOVAL
    from realsyn_pl.construct.release.card_notes import random_init_stages, removal_warnings

    work = Path(cfg.work_dir)
    m = _manifest(stage_dir(cfg, last)) or _manifest(work / last)  # release via img2dataset: work_dir/release
    if m is None or "urls" not in m:
        return None
    samples, shards = int(m.get("samples", 0)), int(m.get("num_shards", 0))
    lines = [f"[build] done: {samples} samples in {shards} shard(s) {m['urls']}"]
    if m.get("card"):
        lines.append(f"[build] dataset card: {m['card']}")
    if not samples:
        lines.append("[build] nothing to train on: every sample was dropped (counts by reason in "
                     f"{stage_dir(cfg, last) / 'manifest.json'})")
        return "\n".join(lines)
    smoke = random_init_stages({s: _manifest(work / s) or {} for s in ("embed_images", "embed_sentences")})
    if smoke:
        lines.append("[build] note: the embeddings came from a random-init model (a smoke build): the texts and "
                     "their selection are not meaningful, as the card says")
    filters = [s for _, stages, _ in PAPER_REMOVAL for s in stages] + ["balance"]
    for far in removal_warnings({s: _manifest(work / s) or {} for s in filters}):
        lines.append(f"[build] warning: {far} (the card lists each threshold as a value and as a fraction)")
    preset = "fit/tiny_cpu" if smoke else "fit/realsyn15m_vitb32"
    lines.append(f"[build] next: {fit_command(m['urls'], preset)}")
    return "\n".join(lines)


def run_predict(cfg: BuildConfig) -> None:
    if ALIASES.get(cfg.stage, cfg.stage) not in MODEL_STAGES:
        raise ConfigError(f"predict runs a model stage: stage must be one of {', '.join(MODEL_STAGES)}, "
                          f"got {cfg.stage!r}")
    run_build(cfg)
