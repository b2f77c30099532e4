"""Fit callbacks and plugins: open_clip export, throughput, end-of-run summary, atomic checkpoint writes."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from realsyn_pl.config import ConfigError
from realsyn_pl.training.shard_report import gather_short_shards


@contextlib.contextmanager
def writing(path: Path, tmp: Path, what: str) -> Iterator[None]:
    """Around the write of `tmp` (renamed to `path` once complete): a failed write removes the partial file, which
    holds the space a retry needs, and a full disk ends the run with one line naming the file, not a traceback
    from deep inside the training loop."""
    try:
        yield
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise ConfigError(f"{path}: no space left on device; {what} not saved (free some space, or set "
                              "output_dir on another disk, and resume with resume=last)") from None
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, tmp, "export"), open(tmp, "wb") as fh:
        torch.save(obj, fh)  # through a Python file: a full disk is OSError(ENOSPC), not torch's "unexpected pos"
    os.replace(tmp, path)


class ExportOpenClip(Callback):
    """Writes export/open_clip_model.pt, loadable by open_clip.create_model_and_transforms(name, pretrained=PATH),
    after every epoch and at the end (plus the model config JSON when the architecture is custom)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)

    def _export(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        state = module.open_clip_state_dict()  # type: ignore[attr-defined]
        if not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(state, self.out_dir / "open_clip_model.pt")
        cfg = module.model_cfg  # type: ignore[attr-defined]
        if cfg.custom is not None:
            from omegaconf import OmegaConf

            custom = OmegaConf.to_container(OmegaConf.create(cfg.custom)) if not isinstance(cfg.custom, dict) else cfg.custom
            (self.out_dir / f"{cfg.name}.json").write_text(json.dumps(custom, indent=2))

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._export(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._export(trainer, module)


class Throughput(Callback):
    """Logs samples/s over all ranks, measured between logging steps."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._samples = 0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._t0, self._samples = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._samples += int(batch["image"].shape[0]) * trainer.world_size
        if (batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0:
            now = time.perf_counter()
            module.log("perf/samples_per_s", self._samples / max(now - self._t0, 1e-9), batch_size=1)
            self._t0, self._samples = now, 0


class FitSummary(Callback):
    """At the end of fit (or at an interruption, see interrupt.py): summary.json (steps, samples, skips by reason,
    shards short of their sizes.json count, wall time) and one printed line."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self._start = time.time()
        self._samples = 0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = time.time()

    # Counted as a batch starts: an interruption writes the summary at the end of its last batch, before this
    # callback's own on_train_batch_end would run.
    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._samples += int(batch["image"].shape[0]) * trainer.world_size

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.write(trainer, module)

    def write(self, trainer: L.Trainer, module: L.LightningModule, interrupted: Optional[str] = None,
              checkpoint: Optional[Path] = None) -> None:
        """summary.json; prints the end-of-run lines unless `interrupted` (the signal's name). Every rank calls it."""
        skipped = module.skipped_totals()  # type: ignore[attr-defined]
        short = gather_short_shards(trainer, module)
        if not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get("train/loss")
        steps_per_epoch = max(1, int(trainer.num_training_batches))  # one step per batch (accumulation is inside)
        summary = {
            "global_step": trainer.global_step,
            # Lightning's current_epoch counts an epoch cut short by max_steps as done.
            "epochs_completed": trainer.global_step // steps_per_epoch,
            "epochs": round(trainer.global_step / steps_per_epoch, 4),
            "samples_this_run": self._samples,
            "skipped": skipped,
            "short_shards": {shard: {"delivered": got, "promised": promised}
                             for shard, (got, promised) in sorted(short.items())},
            "final_loss": float(loss) if loss is not None else None,
            "wall_time_s": round(time.time() - self._start, 2),
            "world_size": trainer.world_size,
            "interrupted": interrupted,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if interrupted:
            return
        shorts = f", {len(short)} shard(s) short of sizes.json (summary.json: short_shards)" if short else ""
        print(f"fit done: step {summary['global_step']}, {summary['samples_this_run']} samples, "
              f"skipped {sum(skipped.values())} distinct {skipped}{shorts}, {summary['wall_time_s']} s -> {self.out_dir}")
        export = self.out_dir / "export"
        if (export / "open_clip_model.pt").is_file():
            print(load_snippet(export, module.model_cfg.name, module.model_cfg.custom is not None))  # type: ignore[attr-defined]


def load_snippet(export: Path, name: str, custom: bool) -> str:
    """The exact code that loads the export in plain open_clip (a custom architecture must be registered first)."""
    lines = ["load the model in open_clip with:", "  import open_clip"]
    if custom:
        lines.append(f"  open_clip.add_model_config({str(export / (name + '.json'))!r})")
    lines.append(f"  model, _, preprocess = open_clip.create_model_and_transforms({name!r}, "
                 f"pretrained={str(export / 'open_clip_model.pt')!r})")
    lines.append(f"  tokenizer = open_clip.get_tokenizer({name!r})")
    return "\n".join(lines)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary name and renamed: a job killed mid-save leaves the previous
    checkpoint intact instead of a truncated one that `resume=last` would trip over."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with writing(path, tmp, "checkpoint"):
            super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)
