"""`realsyn_pl eval`: run a suite's (dataset, task) list on one model, write per-task JSON, summary.json, report.md.

This module stays light (no torch at import) so `run_eval` can set up the CPU runtime before torch loads; the
machinery is in `runner` (Runner, build_trainer, manual_extractor, also reachable from here).
"""
from __future__ import annotations

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
    """Evaluate cfg.model on the configured suite; returns the results (report files under cfg.output_dir)."""
    configure_cpu_runtime(cfg)
    from realsyn_pl.evaluation import runner as R
    from realsyn_pl.evaluation.report import write
    from realsyn_pl.evaluation.suites import plan
    from realsyn_pl.models.factory import create_clip

    suite, runs = plan(cfg)
    bundle = create_clip(cfg.model)
    model = bundle.model.eval().requires_grad_(False)
    device = R.plain_device(cfg)
    if device is not None:
        rank, world = 0, 1
        model.to(device)
        extract = R.manual_extractor(model, bundle.tokenizer, device, R.autocast_context(cfg.trainer.precision, device),
                                     progress=cfg.progress_bar)
    else:
        from realsyn_pl.evaluation.encoder import Encoder

        trainer = R.build_trainer(cfg)
        encoder = Encoder(model, bundle.tokenizer)
        rank, world, device = trainer.global_rank, trainer.world_size, trainer.strategy.root_device

        def extract(loader):
            return trainer.predict(encoder, dataloaders=loader, return_predictions=True) or []

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, file=sys.stderr if msg.startswith(("missing:", "failed:")) else sys.stdout, flush=True)

    runner = R.Runner(cfg, model, bundle.tokenizer, bundle.preprocess_val, extract, rank, world, device,
                      R._is_amp(cfg.trainer.precision))
    started = datetime.datetime.now()
    results = runner.run_all(runs, log)
    if rank == 0:
        header = [f"- model: {cfg.model.name}, weights: {cfg.model.pretrained or 'none (random init)'}",
                  f"- suite: {suite.name}; templates: {cfg.templates}; precision: {cfg.trainer.precision}; "
                  f"processes: {world}", f"- run: {started:%Y-%m-%d %H:%M}, {platform.node()}, "
                  f"{(datetime.datetime.now() - started).total_seconds():.0f}s"]
        started_wandb = _maybe_wandb(cfg)
        report = write(Path(cfg.output_dir), results, suite, cfg.model.name, cfg.model.pretrained, cfg.language,
                       cfg.reference_model, header)
        if started_wandb:
            import wandb

            wandb.finish()
        done = sum(r.status == "ok" for r in results)
        print(f"eval: {done} of {len(results)} runs done, {len(results) - done} not run; report: {report}")
    if not any(r.status == "ok" for r in results):
        raise ConfigError(f"no dataset could be evaluated ({len(results)} missing or failed); see "
                          f"{Path(cfg.output_dir) / 'report.md'}")
    return results


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
