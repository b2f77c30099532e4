"""`realsyn_pl eval`: run a suite's (dataset, task) list on one or several models, write per-task JSON (named by
clip-benchmark's --output template), summary.json, report.md.

This module stays light (no torch at import) so `run_eval` can set up the CPU runtime before torch loads; the
machinery is in `runner` (Runner, build_trainer, manual_extractor, also reachable from here).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
from pathlib import Path

from realsyn_pl.config import ConfigError
from realsyn_pl.evaluation.config import EvalConfig


def configure_cpu_runtime(cfg: EvalConfig) -> bool:
    """Set OMP_WAIT_POLICY from cfg.omp_wait_policy if torch (hence its OpenMP runtime) is not loaded yet and the
    variable is unset; True if set here. It changes only how idle OpenMP threads wait, never a result."""
    if not cfg.omp_wait_policy or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = cfg.omp_wait_policy.upper()
    return True


def run_eval(cfg: EvalConfig) -> list:
    """Evaluate cfg.models (or cfg.model) on the configured suite; returns the results of all models (report files
    under cfg.output_dir)."""
    configure_cpu_runtime(cfg)
    from realsyn_pl.evaluation import runner as R
    from realsyn_pl.evaluation.report import result_paths, write
    from realsyn_pl.evaluation.suites import plan

    if cfg.amp and R._is_amp(cfg.trainer.precision):
        raise ConfigError(f"amp: true autocasts already; with trainer.precision={cfg.trainer.precision} set amp=false, "
                          "or leave trainer.precision at 32")
    suite, runs = plan(cfg)
    models = list(cfg.models) or [cfg.model]
    paths = result_paths(cfg, models, runs)
    device = R.plain_device(cfg)
    trainer = R.build_trainer(cfg) if device is None else None
    if trainer is not None:
        R.connect_early(trainer)
    rank = trainer.global_rank if trainer is not None else 0
    started = datetime.datetime.now()
    per_model, everything, missing = [], [], {}

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, file=sys.stderr if msg.startswith(("missing:", "failed:")) else sys.stdout, flush=True)

    for model_cfg in models:
        results = _run_model(cfg, model_cfg, runs, paths[_model_id(model_cfg)], trainer, device, log, missing)
        per_model.append((model_cfg, results))
        everything += results
    world = trainer.world_size if trainer is not None else 1
    if rank == 0:
        header = [f"- model{'s' if len(models) > 1 else ''}: "
                  + "; ".join(f"{m.name}, weights: {m.pretrained or 'none (random init)'}" for m in models),
                  f"- suite: {suite.name}; templates: {cfg.templates}; amp: {cfg.amp} "
                  f"({'autocast on the device, as clip_benchmark eval' if cfg.amp else 'fp32, as clip_benchmark eval --no_amp'}); "
                  f"precision: {cfg.trainer.precision}; processes: {world}",
                  f"- run: {started:%Y-%m-%d %H:%M}, {platform.node()}, "
                  f"{(datetime.datetime.now() - started).total_seconds():.0f}s"]
        started_wandb = _maybe_wandb(cfg)
        report = write(Path(cfg.output_dir), [(m.name, m.pretrained, r) for m, r in per_model], suite, cfg.language,
                       cfg.reference_model, header)
        if started_wandb:
            import wandb

            wandb.finish()
        done = sum(r.status == "ok" for r in everything)
        print(f"eval: {done} of {len(everything)} runs done, {len(everything) - done} not run; report: {report}",
              flush=True)
        failures = failed_line(per_model)
        if failures:
            print(failures, file=sys.stderr, flush=True)
    if not any(r.status == "ok" for r in everything):
        raise ConfigError(f"no dataset could be evaluated ({len(everything)} missing or failed); see "
                          f"{Path(cfg.output_dir) / 'report.md'}")
    return everything


def exit_status(results: list) -> int:
    """`eval`'s exit code: 1 when a run failed (the others' results are written all the same), else 0. A dataset
    that is not on disk is reported as missing, not as a failure: suites list more datasets than most hosts hold."""
    return 1 if any(r.status == "failed" for r in results) else 0


def failed_line(per_model: list) -> str:
    """One line naming each failed run (dataset, task, model and weights) with its reason; '' when none failed."""
    failed = [(m, r) for m, results in per_model for r in results if r.status == "failed"]
    if not failed:
        return ""
    runs = "; ".join(f"{r.key} {r.task} with {m.name} ({_weights_name(m.pretrained)}): "
                     f"{(r.reason.strip().splitlines() or ['no reason given'])[0]}" for m, r in failed)
    return f"eval: {len(failed)} run{'s' if len(failed) > 1 else ''} failed: {runs}"


def _weights_name(pretrained) -> str:
    return os.path.basename(pretrained) if pretrained else "random init"


def _model_id(m) -> tuple:
    return (m.name, m.pretrained)


def _run_model(cfg: EvalConfig, model_cfg, runs: list, paths: list, trainer, device, log, missing: dict) -> list:
    """One model's (dataset, task) runs; those whose result file exists are read back under skip_existing, and a
    model with nothing left to run is never loaded."""
    import dataclasses

    from realsyn_pl.evaluation import runner as R
    from realsyn_pl.evaluation.report import write_result
    from realsyn_pl.models.factory import create_clip

    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    reused = _existing(paths, world) if cfg.skip_existing else {}
    todo = [(i, run) for i, run in enumerate(runs) if i not in reused]
    for i in reused:
        log(f"skip: {paths[i]} exists")
    fresh: dict = {}
    if todo:
        run_cfg = dataclasses.replace(cfg, model=model_cfg)
        with quiet_random_init_warning(model_cfg.pretrained):
            bundle = create_clip(model_cfg)
        model = bundle.model.eval().requires_grad_(False)
        if trainer is None:
            model.to(device)
            context = R.amp_context(device) if cfg.amp else R.autocast_context(cfg.trainer.precision, device)
            extract = R.manual_extractor(model, bundle.tokenizer, device, context)
        else:
            from realsyn_pl.evaluation.encoder import Encoder

            encoder = Encoder(model, bundle.tokenizer, cfg.amp)
            device = trainer.strategy.root_device

            def extract(loader):
                return trainer.predict(encoder, dataloaders=loader, return_predictions=True) or []

        runner = R.Runner(run_cfg, model, bundle.tokenizer, bundle.preprocess_val, extract, rank, world, device,
                          cfg.amp or R._is_amp(cfg.trainer.precision))

        def keep(j: int, result) -> None:
            result.file = str(paths[todo[j][0]])
            if rank == 0 and result.status == "ok":
                write_result(result, model_cfg.name, model_cfg.pretrained, cfg.language)

        for (i, _), result in zip(todo, runner.run_all([run for _, run in todo], log, missing, keep)):
            fresh[i] = result
    results = []
    for i in range(len(runs)):
        result = reused.get(i) or fresh[i]
        result.file = str(paths[i])
        results.append(result)
    return results


def _existing(paths: list, world: int) -> dict:
    """skip_existing's reused results, rank 0's on every rank: a rank whose view of the files differs (a result
    being written, a lagging shared filesystem) would otherwise run another list of datasets and pair its
    collectives with the wrong ones."""
    from realsyn_pl.evaluation import runner as R
    from realsyn_pl.evaluation.report import read_result

    try:
        mine, error = {i: read_result(p) for i, p in enumerate(paths) if p.is_file()}, None
    except ConfigError as err:
        mine, error = {}, str(err)
    reused, error = R.every_rank((mine, error), world)[0]
    if error:
        raise ConfigError(error)
    return reused


@contextlib.contextmanager
def quiet_random_init_warning(pretrained):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" whenever it builds a model without a
    hub tag, also when realsyn_pl loads a local checkpoint into it right after: drop that line when weights are given."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "initialized randomly" not in record.getMessage()

    drop = _Drop()
    root = logging.getLogger()
    if pretrained:
        root.addFilter(drop)
        for handler in root.handlers:
            handler.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        for handler in root.handlers:
            handler.removeFilter(drop)


def _maybe_wandb(cfg: EvalConfig) -> bool:
    """Start a W&B run for the report table unless disabled or one is already active; True if started here."""
    if cfg.wandb == "disabled":
        return False
    import wandb
    from omegaconf import OmegaConf

    from realsyn_pl.training.loggers import wandb_mode

    if wandb.run is not None:
        return False
    wandb.init(project="realsyn_pl", job_type="eval", mode=wandb_mode(cfg.wandb), dir=cfg.output_dir,
               config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    return True
