"""AdamW with open_clip's weight-decay exclusions, and the LR schedules (OneCycle per the paper, cosine, constant)."""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from realsyn_pl.config import ConfigError, OptimConfig


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """open_clip's rule: gains, biases, norms and the temperature are not decayed."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not no_weight_decay(n, p)]
    exempt = [p for n, p in named if no_weight_decay(n, p)]
    return torch.optim.AdamW(
        [{"params": exempt, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )


def _cosine_with_warmup(warmup: int, total: int, base_lr: float, min_lr: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return (min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))) / base_lr

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LRScheduler:
    """A scheduler stepped once per optimizer step over `total_steps`."""
    if total_steps < 1:
        raise ConfigError(f"the LR schedule needs at least one optimizer step, got total_steps={total_steps}")
    if cfg.scheduler == "onecycle":
        if cfg.pct_start * total_steps - 1 <= 0:
            # Tiny data is the usual cause: few samples / a large batch make few steps.
            raise ConfigError(
                f"OneCycle needs a warm-up longer than one step: optim.pct_start x total steps = "
                f"{cfg.pct_start} x {total_steps} = {cfg.pct_start * total_steps:g}; lower data.batch_size (more "
                "steps per epoch), train longer (trainer.max_epochs), raise optim.pct_start, or warm up in steps "
                "with optim.scheduler=cosine optim.warmup_steps=N"
            )
        return OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=total_steps,
            pct_start=cfg.pct_start,
            anneal_strategy=cfg.anneal_strategy,
            div_factor=cfg.div_factor,
            final_div_factor=cfg.final_div_factor,
            cycle_momentum=cfg.cycle_momentum,
        )
    if cfg.scheduler == "cosine":
        return LambdaLR(optimizer, _cosine_with_warmup(cfg.warmup_steps, total_steps, cfg.lr, cfg.min_lr))
    if cfg.scheduler == "constant":
        return LambdaLR(optimizer, lambda step: 1.0)
    raise ConfigError(f"optim.scheduler must be onecycle, cosine or constant, got {cfg.scheduler!r}")
