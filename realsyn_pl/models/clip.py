"""The CLIP pretraining LightningModule: an open_clip model, the contrastive loss, AdamW + per-step LR schedule."""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Optional

import lightning as L
import torch

from realsyn_pl.config import ConfigError, LossConfig, ModelConfig, OptimConfig
from realsyn_pl.data.shards import SKIP_REASONS
from realsyn_pl.models.factory import create_clip
from realsyn_pl.models.loss import ContrastiveLoss
from realsyn_pl.training.optim import build_optimizer, build_scheduler

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature at 1/100


class CLIPModule(L.LightningModule):
    def __init__(self, model: dict, optim: dict, loss: dict, schedule_steps: Optional[int] = None):
        super().__init__()
        # Plain dicts only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters()
        self.model_cfg = ModelConfig(**model)
        self.optim_cfg = OptimConfig(**optim)
        self.loss_cfg = LossConfig(**loss)
        self.schedule_steps = schedule_steps
        bundle = create_clip(self.model_cfg)
        self.model = bundle.model
        self.preprocess_train = bundle.preprocess_train
        self.preprocess_val = bundle.preprocess_val
        self.tokenizer = bundle.tokenizer
        self.loss_fn = ContrastiveLoss(self.loss_cfg.local_loss, self.loss_cfg.gather_with_grad)
        self.skipped: Counter = Counter()

    def setup(self, stage: str) -> None:
        self.loss_fn.rank = self.global_rank
        self.loss_fn.world_size = self.trainer.world_size if self.trainer is not None else 1

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(image, normalize=True), self.model.encode_text(text, normalize=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image_features, text_features = self(batch["image"], batch["text"])
        logit_scale = self.model.logit_scale.exp()
        loss = self.loss_fn(image_features, text_features, logit_scale)
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("train/logit_scale", logit_scale.detach(), batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=bs)
        for reason, n in batch.get("skipped", {}).items():
            self.skipped[reason] += int(n)
        if batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            # One collective for all reasons, and only on logging steps (every rank reaches the same ones).
            for reason, total in self.skipped_totals().items():
                self.log(f"data/skipped_{reason}", float(total), batch_size=bs)
        return loss

    def skipped_totals(self) -> dict[str, int]:
        """Skipped samples by reason over all ranks so far (a collective: call on every rank)."""
        local = torch.tensor([self.skipped[r] for r in SKIP_REASONS], dtype=torch.float64, device=self.device)
        total = self.trainer.strategy.reduce(local, reduce_op="sum") if self.trainer.world_size > 1 else local
        return {r: int(v) for r, v in zip(SKIP_REASONS, total.tolist())}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        planned = int(self.trainer.estimated_stepping_batches)
        total = self.schedule_steps or planned
        if total < planned:
            raise ConfigError(f"trainer.schedule_steps={total} is shorter than the {planned} optimizer steps of this run")
        scheduler = build_scheduler(optimizer, self.optim_cfg, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
