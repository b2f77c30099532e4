"""`realsyn_pl fit`: pretrain CLIP on webdataset shards with the paper's recipe."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import OmegaConf

from realsyn_pl.config import ConfigError, FitConfig, load_config, to_object
from realsyn_pl.data.datamodule import ShardDataModule
from realsyn_pl.data.shards import resolve_sources
from realsyn_pl.models.clip import CLIPModule
from realsyn_pl.training.callbacks import AtomicCheckpointIO, ExportOpenClip, FitSummary, Throughput
from realsyn_pl.training.environment import resolve_topology
from realsyn_pl.training.loggers import build_loggers


def _plain(obj) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)  # type: ignore[return-value]


def resolve_resume(resume: Optional[str], out_dir: Path) -> Optional[str]:
    if resume is None:
        return None
    if resume == "last":
        last = out_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None  # a first run under a requeueing scheduler starts fresh
    if not Path(resume).is_file():
        raise ConfigError(f"resume: checkpoint not found: {resume}")
    return resume


def build_module(cfg: FitConfig) -> CLIPModule:
    return CLIPModule(
        model=_plain(cfg.model),
        optim=_plain(cfg.optim),
        loss=_plain(cfg.loss),
        schedule_steps=cfg.trainer.schedule_steps,
    )


def eval_callback(cfg: FitConfig, eval_cfg: Optional[Any] = None) -> Optional[L.Callback]:
    """The zero-shot-during-fit callback, from cfg.eval (a preset path) or an EvalConfig given in code."""
    from realsyn_pl.evaluation.callback import ZeroShotEval
    from realsyn_pl.evaluation.config import EvalConfig

    if eval_cfg is None and cfg.eval.config is None:
        return None
    if eval_cfg is None:
        eval_cfg = to_object(load_config(EvalConfig, [cfg.eval.config], cfg.eval.overrides))
    return ZeroShotEval(eval_cfg, every_n_epochs=cfg.eval.every_n_epochs)


def build_trainer(cfg: FitConfig, out_dir: Path, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    devices, num_nodes = resolve_topology(cfg.trainer.devices, cfg.trainer.num_nodes)
    callbacks = [
        ModelCheckpoint(
            dirpath=str(out_dir / "checkpoints"),
            filename="{epoch}-{step}",
            save_last=True,
            save_top_k=cfg.checkpoint.save_top_k,
            every_n_train_steps=cfg.checkpoint.every_n_train_steps,
            every_n_epochs=None if cfg.checkpoint.every_n_train_steps else cfg.checkpoint.every_n_epochs,
        ),
        Throughput(),
        FitSummary(out_dir),
        *extra_callbacks,
    ]
    loggers = build_loggers(cfg.logging, out_dir, _plain(cfg))
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.checkpoint.export_open_clip:
        callbacks.append(ExportOpenClip(out_dir / "export"))
    return L.Trainer(
        default_root_dir=str(out_dir),
        max_epochs=cfg.trainer.max_epochs,
        max_steps=cfg.trainer.max_steps,
        accelerator=cfg.trainer.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        accumulate_grad_batches=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        deterministic=cfg.trainer.deterministic,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=cfg.logging.progress_bar,
        use_distributed_sampler=False,  # the shard reader splits data by rank itself
        num_sanity_val_steps=0,
    )


def run_fit(cfg: FitConfig, eval_cfg: Optional[Any] = None) -> Path:
    """Train; returns the output directory (checkpoints/, export/, csv/, summary.json).
    `eval_cfg` (an EvalConfig) runs its zero-shot tasks during fit, like cfg.eval.config does from a file."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt = resolve_resume(cfg.resume, out_dir)
    resolve_sources(cfg.data)  # fail on bad data paths before building a large model
    module = build_module(cfg)
    datamodule = ShardDataModule(cfg.data, module.preprocess_train, module.tokenizer)
    evaluator = eval_callback(cfg, eval_cfg)
    trainer = build_trainer(cfg, out_dir, [evaluator] if evaluator is not None else [])
    if trainer.is_global_zero:
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    return out_dir



