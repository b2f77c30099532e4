"""Loggers: CSV always (unless disabled), W&B online with credentials, offline without (never a login prompt).
A resumed run continues the same CSV file and the same W&B run, so its curves are not split."""
from __future__ import annotations

import csv
import netrc
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from realsyn_pl.config import ConfigError, LoggingConfig


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(setting: str) -> str | None:
    if setting == "disabled":
        return None
    if setting == "auto":
        return os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
    if setting in ("online", "offline"):
        return setting
    raise ConfigError(f"logging.wandb must be auto, online, offline or disabled, got {setting!r}")


WANDB_ID_FILE = "wandb_run_id.txt"


def steps_done(lightning_step: Optional[int]) -> int:
    """The row number of a training step's metrics: optimizer steps done once it is over, as the console, the
    checkpoints (global_step) and summary.json count. Lightning passes the steps done before it (0 for the first),
    and for epoch-end metrics the same number as the epoch's last step."""
    return (lightning_step or 0) + 1


class _ContinuingWriter(ExperimentWriter):
    """Keeps an earlier run's metrics.csv rows up to `keep_through_step` (the resumed checkpoint's step) and appends
    to them; later rows are dropped, since the resumed run trains and logs those steps again. Metrics logged for
    the same step (a step's and its epoch's) go into one row."""

    def __init__(self, log_dir: str, keep_through_step: Optional[int]):
        self._keep_through_step = keep_through_step
        super().__init__(log_dir=log_dir)

    def log_metrics(self, metrics_dict: dict[str, float], step: Optional[int] = None) -> None:
        if step is not None and self.metrics and self.metrics[-1].get("step") == step:
            row = self.metrics.pop()
            super().log_metrics({**{k: v for k, v in row.items() if k != "step"}, **metrics_dict}, step)
            return
        super().log_metrics(metrics_dict, step)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._keep_through_step is None:
            path.unlink()
            return
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = sorted(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(r["step"]) <= self._keep_through_step]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
        self.metrics_keys = fields


class ContinuingCSVLogger(CSVLogger):
    """csv/version_0/metrics.csv for the whole run, across resumes."""

    def __init__(self, save_dir: str, resume_step: Optional[int], flush_logs_every_n_steps: int):
        super().__init__(save_dir=save_dir, name="csv", version=0, flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._resume_step)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        step = steps_done(step)
        writer = self.experiment
        # Written out when a new step begins, so that a step's row is never split by a flush.
        if writer.metrics and writer.metrics[-1].get("step") != step and len(writer.metrics) >= self._flush_logs_every_n_steps:
            self.save()
        writer.log_metrics(metrics, step)  # no prefix: this logger is built without one


class StepWandbLogger(WandbLogger):
    """W&B with the same step numbers as the console and metrics.csv (trainer/global_step = steps done)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # Lightning always passes `anonymous` to wandb.init, which then warns that the setting has no effect.
        self._wandb_init.pop("anonymous", None)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        super().log_metrics(metrics, steps_done(step))


def wandb_run_id(out_dir: Path, resuming: bool) -> str:
    """The run's W&B id, kept in output_dir so every resume logs into the same W&B run."""
    path = out_dir / WANDB_ID_FILE
    if resuming and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:  # only rank 0 logs to W&B
        path.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg: LoggingConfig, out_dir: Path, config: dict[str, Any], resume_step: Optional[int] = None,
                  flush_every: int = 100) -> list[Logger]:
    """`resume_step`: the global step of the checkpoint this run resumes from (None for a fresh run)."""
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(ContinuingCSVLogger(str(out_dir), resume_step, flush_every))
    mode = wandb_mode(cfg.wandb)
    if mode is not None:
        logger = StepWandbLogger(project=cfg.project, name=cfg.run_name, save_dir=str(out_dir), mode=mode,
                                 id=wandb_run_id(out_dir, resume_step is not None), resume="allow")
        logger.log_hyperparams(config)
        loggers.append(logger)
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    """Close this process's W&B run, so the next fit in the same process (the demo, tests) starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish()
