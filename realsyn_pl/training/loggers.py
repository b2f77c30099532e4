"""Loggers: CSV always (unless disabled), W&B online with credentials, offline without (never a login prompt)."""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

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


def build_loggers(cfg: LoggingConfig, out_dir: Path, config: dict[str, Any]) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(CSVLogger(save_dir=str(out_dir), name="csv"))
    mode = wandb_mode(cfg.wandb)
    if mode is not None:
        logger = WandbLogger(project=cfg.project, name=cfg.run_name, save_dir=str(out_dir), mode=mode)
        logger.log_hyperparams(config)
        loggers.append(logger)
    return loggers
