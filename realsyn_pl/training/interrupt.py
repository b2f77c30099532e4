"""Ctrl-C (SIGINT) and SIGTERM (what SLURM, Kubernetes and torchrun send to stop a job) during `fit`: the step in
progress finishes, every rank saves checkpoints/last.ckpt at that step through the usual checkpoint path (the
data stream position included, so `resume=last` continues mid-epoch exactly), summary.json says interrupted, one
line says how to resume, and the process exits 130 / 143 (128 + the signal number, as a shell reports it).

Lightning's own SIGTERM handling ends the fit at the next batch without a checkpoint and exits 0; this takes both
signals over once training starts. SLURM's requeue signal (SIGUSR1, hpc_ckpt_*.ckpt) is left to Lightning."""
from __future__ import annotations

import io
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from realsyn_pl.data.worker_signals import IDLE, STOPPING, TRAINING, set_main_state

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


class FitInterrupted(SystemExit):
    """Raised once the checkpoint is saved. A SystemExit, so every way into fit (the CLI, the demo, torchrun's
    ranks) ends with the signal's exit code and no traceback."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def _say(text: str) -> None:
    """Write from a signal handler: straight to the file descriptor, since print() could be the very call the
    handler interrupted (a reentrant write raises); through the stream where it has none (a captured stderr)."""
    try:
        fd = sys.stderr.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        sys.stderr.write(text)
        return
    os.write(fd, text.encode())


def resume_hint(step: int, checkpoint: Path, out_dir: Path) -> str:
    return (f"interrupted at step {step}; checkpoint saved to {checkpoint}; resume with your command plus "
            f"resume=last, e.g. `python -m realsyn_pl fit --config {out_dir / 'config.yaml'} resume=last`")


def _training_ends_with(trainer: L.Trainer, batch_idx: int) -> bool:
    """This batch is the run's last: it ends normally (export, summary) rather than as an interruption."""
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    last_of_epoch = batch_idx + 1 >= int(trainer.num_training_batches)
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1  # -1: no epoch limit
    return last_of_epoch and 0 <= max_epochs <= trainer.current_epoch + 1


def _agreed_signal(trainer: L.Trainer, local: int) -> int:
    """The signal any rank received (0: none). One small all-reduce per step, so all ranks stop after the same
    step even when only some got the signal (Kubernetes signals PID 1 only; Lightning's launcher signals its
    parent)."""
    import torch.distributed as dist

    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return local
    flag = torch.tensor([local], dtype=torch.int32, device=trainer.strategy.root_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class GracefulStop(Callback):
    """`write_summary(trainer, module, interrupted, checkpoint)` writes summary.json (a collective: every rank
    calls it)."""

    def __init__(self, out_dir: Path, write_summary: Callable[..., None]):
        self.out_dir = Path(out_dir)
        self.write_summary = write_summary
        self._signum = 0
        self._stop: Optional[FitInterrupted] = None
        self._previous: dict[int, _Handler] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._signum:
            if signum == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait for the checkpoint
                raise KeyboardInterrupt
            return
        self._signum = signum
        set_main_state(STOPPING)  # loader workers signalled with this process leave the stopping to it
        _say(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint (Ctrl-C again quits "
             "without one)\n")

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (an interactive trainer in a thread)
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        set_main_state(TRAINING)
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and connector.received_sigterm:
            # A SIGTERM that reached Lightning's handler during start-up is handled here too (Lightning would end
            # the fit after the first batch without a checkpoint).
            connector.received_sigterm = False
            self._handle(signal.SIGTERM, None)

    def _restore(self) -> None:
        set_main_state(IDLE)  # from here on a SIGTERM to a worker is torch's (or anyone's) to end it
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signum = _agreed_signal(trainer, self._signum)
        if not signum or self._stop is not None or _training_ends_with(trainer, batch_idx):
            return
        path = self.out_dir / "checkpoints" / "last.ckpt"
        # ModelCheckpoint's last file, in its state too: otherwise the resumed run's ModelCheckpoint takes last.ckpt
        # for someone else's file and writes last-v1.ckpt beside it, which resume=last never picks.
        checkpointer = trainer.checkpoint_callback
        if isinstance(checkpointer, ModelCheckpoint):
            checkpointer.last_model_path = str(path)
        # Saved here, where ModelCheckpoint saves its step checkpoints, so the resume takes the same proven path.
        trainer.save_checkpoint(path, weights_only=False)
        self.write_summary(trainer, module, interrupted=signal.Signals(signum).name, checkpoint=path)
        self._stop = FitInterrupted(signum, trainer.global_step, path)

    def _raise(self, trainer: L.Trainer) -> None:
        if self._stop is None:
            return
        if trainer.is_global_zero:
            print(resume_hint(self._stop.step, self._stop.checkpoint, self.out_dir), file=sys.stderr, flush=True)
        raise self._stop

    # Stop at the next hook, after Lightning has logged the step's metrics (its CSV row is then complete) and the
    # progress line is out, but before the epoch-end export and evaluation.
    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._raise(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._raise(trainer)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
