"""`realsyn_pl fit`: pretrain CLIP on webdataset shards with the paper's recipe."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from realsyn_pl.config import ConfigError, FitConfig, load_config, to_object
from realsyn_pl.data.datamodule import ShardDataModule
from realsyn_pl.data.shards import ShardsRanDry, check_text_keys, resolve_sources
from realsyn_pl.models.clip import CLIPModule
from realsyn_pl.models.factory import NotWeightsOnly, load_weights_only
from realsyn_pl.training.callbacks import AtomicCheckpointIO, ExportOpenClip, FitSummary, Throughput
from realsyn_pl.training.environment import resolve_topology
from realsyn_pl.training.interrupt import GracefulStop
from realsyn_pl.training.loggers import WANDB_ID_FILE, build_loggers, finish_loggers
from realsyn_pl.training.progress import PlainProgress, stdout_is_terminal
from realsyn_pl.training.quiet import silence_known_noise
from realsyn_pl.training.shard_report import ShortShardWarnings


def _plain(obj) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)  # type: ignore[return-value]


def fit_finished(out_dir: Path) -> bool:
    """Whether a fit in `out_dir` ran to its end (an interrupted one also writes summary.json, marked so)."""
    path = Path(out_dir) / "summary.json"
    if not path.is_file():
        return False
    try:
        return not json.loads(path.read_text()).get("interrupted")
    except (ValueError, AttributeError):
        return False


def existing_checkpoints(out_dir: Path) -> list[Path]:
    """Lightning checkpoints in checkpoints/ and the ones SLURM's pre-emption signal writes in output_dir."""
    return sorted((out_dir / "checkpoints").glob("*.ckpt")) + sorted(out_dir.glob("hpc_ckpt_*.ckpt"))


def resolve_resume(resume: Optional[str], out_dir: Path) -> Optional[str]:
    if resume is None:
        return None
    if resume in ("last", "latest"):
        # The newest write wins: on SLURM requeue that is the hpc_ckpt_N.ckpt saved on SIGUSR1, which is newer than
        # the last periodic checkpoint.
        candidates = [p for p in [out_dir / "checkpoints" / "last.ckpt", *out_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        if not candidates:
            return None  # a first run under a requeueing scheduler starts fresh
        return str(max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name)))
    if not Path(resume).is_file():
        raise ConfigError(f"resume: checkpoint not found: {resume}")
    return resume


def prepare_output_dir(out_dir: Path, resume: Optional[str], overwrite: bool) -> None:
    """A fresh run into a folder with checkpoints would silently start over beside them (Lightning then writes
    last-v1.ckpt, which resume=last never picks): refuse it unless asked to overwrite."""
    found = existing_checkpoints(out_dir)
    if resume is not None or not found:
        return
    if not overwrite:
        raise ConfigError(f"output_dir={out_dir} already has checkpoints ({found[0].name}, ...): continue with "
                          "resume=last, or start over with overwrite=true, or choose another output_dir")
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) != 0:
        return
    for path in found:
        path.unlink(missing_ok=True)
    for folder in ("csv", "export"):
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    for name in ("summary.json", WANDB_ID_FILE):
        (out_dir / name).unlink(missing_ok=True)


def checkpoint_position(path: Optional[str]) -> tuple[Optional[int], int]:
    """The global step a checkpoint was saved at and the epochs it has entered, i.e. the max_epochs needed to
    continue from it (memory-mapped: reads no weights)."""
    if path is None:
        return None, 0
    try:
        ckpt = load_weights_only(path, mmap=True)
    except NotWeightsOnly:
        raise
    except (RuntimeError, ValueError, OSError, EOFError) as err:
        raise ConfigError(f"resume: cannot read checkpoint {path}: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict):  # a weights-only file of another shape (a bare tensor, a list)
        raise ConfigError(f"resume: {path} is not a Lightning checkpoint (it holds a {type(ckpt).__name__})")
    # `epoch` is the 0-based epoch in progress; a checkpoint written after some of its batches (the last one
    # included: last.ckpt is saved before the epoch-end increment) has entered it.
    batches = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    in_epoch = int(batches.get("current", {}).get("processed", 0))
    return int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0)) + (1 if in_epoch > 0 else 0)


def epoch_finished(path: str) -> bool:
    """Whether the checkpoint was saved after the last batch of its epoch (Lightning's is_last_batch)."""
    ckpt = load_weights_only(path, mmap=True)
    batches = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    return bool(batches.get("is_last_batch", False))


def nothing_to_train(cfg: FitConfig, ckpt: str, step: int, epochs: int) -> Optional[str]:
    """The line to print when the checkpoint being resumed already reached this run's end (Lightning would
    return at once without a word), else None."""
    max_steps, max_epochs = cfg.trainer.max_steps, cfg.trainer.max_epochs
    if 0 < max_steps <= step:
        reached, limits = f"trainer.max_steps={max_steps}", "trainer.max_steps (or trainer.max_epochs)"
    elif 0 <= max_epochs <= epochs and epoch_finished(ckpt):
        reached = f"the end of epoch {epochs} = trainer.max_epochs={max_epochs}"
        limits = "trainer.max_epochs (or trainer.max_steps)"
    else:
        return None
    return f"nothing to train: the checkpoint {ckpt} is at step {step} = {reached}; raise {limits} to continue"


def check_precision(cfg: FitConfig) -> None:
    """fp16 autocast on a CPU is several times slower than fp32 (no fp16 kernels worth the casts): refuse it before
    building anything."""
    precision = str(cfg.trainer.precision)
    if not precision.startswith("16"):
        return
    accelerator = cfg.trainer.accelerator
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()
                                      and not torch.backends.mps.is_available())
    if on_cpu:
        raise ConfigError(f"trainer.precision={precision} (fp16) on a CPU is several times slower than fp32; use "
                          "trainer.precision=bf16-mixed or 32")


def build_module(cfg: FitConfig) -> CLIPModule:
    return CLIPModule(
        model=_plain(cfg.model),
        optim=_plain(cfg.optim),
        loss=_plain(cfg.loss),
        schedule_steps=cfg.trainer.schedule_steps,
        accumulate=cfg.trainer.accumulate_grad_batches,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
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


def build_trainer(cfg: FitConfig, out_dir: Path, extra_callbacks: Sequence[L.Callback] = (),
                  resume_step: Optional[int] = None) -> L.Trainer:
    devices, num_nodes = resolve_topology(cfg.trainer.devices, cfg.trainer.num_nodes)
    bar = cfg.logging.progress_bar and stdout_is_terminal()  # a file gets plain lines instead (PlainProgress)
    summary = FitSummary(out_dir)
    callbacks = [
        # First: on an interruption it stops the run before the others' epoch-end work (export, eval).
        GracefulStop(out_dir, summary.write),
        ModelCheckpoint(
            dirpath=str(out_dir / "checkpoints"),
            filename="{epoch}-{step}",
            save_last=True,
            save_top_k=cfg.checkpoint.save_top_k,
            every_n_train_steps=cfg.checkpoint.every_n_train_steps,
            every_n_epochs=None if cfg.checkpoint.every_n_train_steps else cfg.checkpoint.every_n_epochs,
        ),
        Throughput(),
        # The export is written before the summary, which prints how to load it.
        *([ExportOpenClip(out_dir / "export")] if cfg.checkpoint.export_open_clip else []),
        ShortShardWarnings(),
        summary,
        PlainProgress(lines=not bar),
        *extra_callbacks,
    ]
    # The module logs train/lr itself (the rate each step trained with): no LearningRateMonitor, whose separate
    # log call would give every step a second CSV row.
    loggers = build_loggers(cfg.logging, out_dir, _plain(cfg), resume_step=resume_step,
                            flush_every=cfg.trainer.log_every_n_steps)
    return L.Trainer(
        default_root_dir=str(out_dir),
        max_epochs=cfg.trainer.max_epochs,
        max_steps=cfg.trainer.max_steps,
        accelerator=cfg.trainer.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        deterministic=cfg.trainer.deterministic,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=bar,
        use_distributed_sampler=False,  # the shard reader splits data by rank itself
        num_sanity_val_steps=0,
    )


def run_fit(cfg: FitConfig, eval_cfg: Optional[Any] = None) -> Path:
    """Train; returns the output directory (checkpoints/, export/, csv/, summary.json).
    `eval_cfg` (an EvalConfig) runs its zero-shot tasks during fit, like cfg.eval.config does from a file."""
    out_dir = Path(cfg.output_dir)
    check_precision(cfg)
    silence_known_noise()
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt = resolve_resume(cfg.resume, out_dir)
    prepare_output_dir(out_dir, cfg.resume, cfg.overwrite)
    resume_step, resume_epochs = checkpoint_position(ckpt)
    if resume_step is not None and 0 < cfg.trainer.max_steps < resume_step:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.max_steps} is below step {resume_step} of the checkpoint "
                          f"being resumed ({ckpt}); to extend a run raise trainer.max_steps / trainer.max_epochs")
    # Lightning would stop at once without a word (its epoch counter is already past max_epochs).
    if resume_step is not None and 0 <= cfg.trainer.max_epochs < resume_epochs:
        raise ConfigError(f"trainer.max_epochs={cfg.trainer.max_epochs} is below the {resume_epochs} epoch(s) the "
                          f"checkpoint being resumed has reached ({ckpt}, step {resume_step}); to extend a run "
                          "raise trainer.max_epochs")
    done = nothing_to_train(cfg, ckpt, resume_step or 0, resume_epochs) if ckpt is not None else None
    if done is not None:
        print(done)
        return out_dir
    # Fail on bad data paths and text keys before building a large model.
    check_text_keys(resolve_sources(cfg.data), cfg.data.text_keys)
    module = build_module(cfg)
    datamodule = ShardDataModule(cfg.data, module.preprocess_train, module.tokenizer,
                                  accumulate=cfg.trainer.accumulate_grad_batches)
    evaluator = eval_callback(cfg, eval_cfg)
    trainer = build_trainer(cfg, out_dir, [evaluator] if evaluator is not None else [], resume_step)
    if trainer.is_global_zero:
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    ran_dry = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    except ShardsRanDry as err:  # from a DataLoader worker it comes wrapped in the worker's traceback
        ran_dry = err.line()
    finally:
        finish_loggers(trainer.loggers)
    if ran_dry is not None:
        # Raised out here, without the original's traceback, whose frames would keep the loader's worker
        # processes alive until exit.
        raise ConfigError(ran_dry)
    return out_dir



