"""Plain-text progress for logs that go to a file (SLURM, nohup): a start-up summary, then one flushed line per
logging interval, instead of a progress bar that a file shows only at the end."""
from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from realsyn_pl.data.shards import SKIP_REASONS


def stdout_is_terminal() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def warmup_steps(module: Any) -> int:
    """Optimizer steps of LR warm-up under the configured schedule."""
    cfg, total = module.optim_cfg, module.schedule_total
    if cfg.scheduler == "onecycle":
        return int(float(cfg.pct_start) * total)
    if cfg.scheduler == "cosine":
        return int(cfg.warmup_steps)
    return 0


def startup_summary(trainer: L.Trainer, module: Any) -> str:
    dm = trainer.datamodule
    per_epoch = int(trainer.num_training_batches)
    micro = int(dm.cfg.batch_size)
    world = int(trainer.world_size)
    total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else per_epoch * int(trainer.max_epochs)
    shards = sum(len(s.shards) for s in dm.sources)
    return (
        f"fit: {shards} shards, {dm.num_samples} samples/epoch, {per_epoch} steps/epoch; global batch "
        f"{micro * world * module.accumulate} = {micro} per device x {world} device(s) x {module.accumulate} "
        f"accumulated (contrastive over all); training to step {total} from step {trainer.global_step}, "
        f"LR schedule {module.schedule_total} steps ({module.optim_cfg.scheduler}, warm-up {warmup_steps(module)})"
    )


class PlainProgress(Callback):
    """Rank 0 prints the start-up summary always, and (when `lines`) one line every `log_every_n_steps`:
    step, epoch, loss, lr, samples/s per device and in total, skipped samples."""

    def __init__(self, lines: bool):
        self.lines = lines
        self._t0 = 0.0
        self._samples = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._t0, self._samples = time.perf_counter(), 0
        if trainer.is_global_zero:
            print(startup_summary(trainer, module), flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += int(batch["image"].shape[0])
        step = trainer.global_step
        last = trainer.max_steps > 0 and step >= trainer.max_steps
        if not (self.lines and trainer.is_global_zero) or (step % max(1, trainer.log_every_n_steps) and not last):
            return
        now = time.perf_counter()
        per_device = self._samples / max(now - self._t0, 1e-9)
        self._t0, self._samples = now, 0
        metrics = trainer.callback_metrics
        loss = metrics.get("train/loss")
        lr = float(metrics.get("train/lr", module.lr_schedulers().optimizer.param_groups[0]["lr"]))  # type: ignore[union-attr]
        skipped = sum(int(metrics.get(f"data/skipped_{r}", 0)) for r in SKIP_REASONS)
        epoch = step / max(1, trainer.num_training_batches)
        print(f"step {step} epoch {epoch:.2f} loss {float(loss) if loss is not None else float('nan'):.4f} "
              f"lr {lr:.3e} samples/s {per_device:.1f}/device {per_device * trainer.world_size:.1f} total "
              f"skipped {skipped}", flush=True)
