"""The CLIP pretraining LightningModule: an open_clip model, the contrastive loss, AdamW + per-step LR schedule."""
from __future__ import annotations

import math
from collections import Counter
from contextlib import nullcontext
from typing import Any, Optional

import lightning as L
import torch

from realsyn_pl.config import ConfigError, LossConfig, ModelConfig, OptimConfig
from realsyn_pl.data.shards import SKIP_REASONS
from realsyn_pl.models.factory import create_clip
from realsyn_pl.models.loss import ContrastiveLoss
from realsyn_pl.training.optim import build_optimizer, build_scheduler

MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps the learned temperature at 1/100
# Scheduler state that encodes the schedule's length (OneCycleLR); dropped on resume so the new length applies.
SCHEDULE_SHAPE_KEYS = ("total_steps", "_schedule_phases")


class CLIPModule(L.LightningModule):
    """Each training step takes one global batch per device (`accumulate` micro-batches of the configured size)
    and makes one optimizer step. With accumulate > 1 the loss is the contrastive loss over all micro-batches
    (every sample sees the negatives of the whole accumulated batch), computed with open_clip's --accum-freq
    feature caching, so the gradient equals that of one batch of accumulate x batch_size."""

    def __init__(self, model: dict, optim: dict, loss: dict, schedule_steps: Optional[int] = None,
                 accumulate: int = 1, gradient_clip_val: Optional[float] = None):
        super().__init__()
        # Plain dicts only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters()
        # Manual optimization: the accumulated contrastive loss needs several backward passes per optimizer step
        # over one batch, which Lightning's automatic accumulation (a sum of per-micro-batch losses) cannot express.
        self.automatic_optimization = False
        self.model_cfg = ModelConfig(**model)
        self.optim_cfg = OptimConfig(**optim)
        self.loss_cfg = LossConfig(**loss)
        self.schedule_steps = schedule_steps
        self.accumulate = int(accumulate)
        self.gradient_clip_val = gradient_clip_val
        bundle = create_clip(self.model_cfg)
        self.model = bundle.model
        self.preprocess_train = bundle.preprocess_train
        self.preprocess_val = bundle.preprocess_val
        self.tokenizer = bundle.tokenizer
        self.loss_fn = ContrastiveLoss(self.loss_cfg.local_loss, self.loss_cfg.gather_with_grad)
        self.skipped: Counter = Counter()  # this epoch's skips on this rank
        # Shards this rank read to their end with fewer samples than sizes.json promised: shard -> (got, promised)
        self.short_shards: dict[str, tuple[int, int]] = {}
        self._skipped_best: Counter = Counter()
        self.schedule_total = 0  # optimizer steps the LR schedule spans (set in configure_optimizers)
        self._restored_schedule_total: Optional[int] = None
        self._restored_step = 0

    def setup(self, stage: str) -> None:
        self.loss_fn.rank = self.global_rank
        self.loss_fn.world_size = self.trainer.world_size if self.trainer is not None else 1

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(image, normalize=True), self.model.encode_text(text, normalize=True)

    def _backward_sync(self, last: bool):
        """DDP all-reduces gradients only after the last micro-batch's backward."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return nullcontext() if last or block is None else block()

    def accumulated_backward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Backward of the contrastive loss over the whole batch, `accumulate` micro-batches at a time.

        open_clip's --accum-freq algorithm: features of every micro-batch without grad first, then per micro-batch
        a forward with grad whose features replace its cached ones in the full-batch loss. Each backward gives the
        exact gradient through that micro-batch; their sum is the full-batch gradient. The temperature keeps its
        graph in one pass only (open_clip keeps it in all k, which scales its gradient by k)."""
        k = self.accumulate
        if images.shape[0] % k:
            raise ValueError(f"batch of {images.shape[0]} does not split into {k} equal micro-batches")
        image_parts, text_parts = images.chunk(k), texts.chunk(k)
        if k == 1:
            image_features, text_features = self(images, texts)
            loss = self.loss_fn(image_features, text_features, self.model.logit_scale.exp())
            self.manual_backward(loss)
            return loss.detach()
        with torch.no_grad():
            cached = [self(i, t) for i, t in zip(image_parts, text_parts)]
        cached_image, cached_text = [c[0] for c in cached], [c[1] for c in cached]
        for j in range(k):
            last = j == k - 1
            with self._backward_sync(last):
                image_features, text_features = self(image_parts[j], text_parts[j])
                all_image = torch.cat(cached_image[:j] + [image_features] + cached_image[j + 1:])
                all_text = torch.cat(cached_text[:j] + [text_features] + cached_text[j + 1:])
                logit_scale = self.model.logit_scale.exp()
                loss = self.loss_fn(all_image, all_text, logit_scale if last else logit_scale.detach())
                self.manual_backward(loss)
        return loss.detach()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step trains with
        loss = self.accumulated_backward(batch["image"], batch["text"])
        if self.gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
        self.log("train/logit_scale", self.model.logit_scale.exp().detach(), batch_size=bs)
        self.log("train/lr", lr, batch_size=bs)  # not on the bar: it rounds to 3 decimals (0.000)
        for reason, n in batch.get("skipped", {}).items():
            self.skipped[reason] += int(n)
        for shard, got, promised in batch.get("short_shards", []):
            self.short_shards[str(shard)] = (int(got), int(promised))
        if batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            # One collective for all reasons, and only on logging steps (every rank reaches the same ones).
            for reason, total in self.skipped_totals().items():
                self.log(f"data/skipped_{reason}", float(total), batch_size=bs)
        return loss

    def on_train_epoch_start(self) -> None:
        # Every epoch reads each sample once, so the same bad samples come back each epoch: keep the largest
        # epoch's count (the distinct bad samples), not the sum over epochs.
        for reason in SKIP_REASONS:
            self._skipped_best[reason] = max(self._skipped_best[reason], self.skipped[reason])
        self.skipped = Counter()

    def skipped_totals(self) -> dict[str, int]:
        """Distinct skipped samples by reason over all ranks (a collective: call on every rank)."""
        local = torch.tensor([max(self.skipped[r], self._skipped_best[r]) for r in SKIP_REASONS],
                             dtype=torch.float64, device=self.device)
        total = self.trainer.strategy.reduce(local, reduce_op="sum") if self.trainer.world_size > 1 else local
        return {r: int(v) for r, v in zip(SKIP_REASONS, total.tolist())}

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        planned = int(self.trainer.estimated_stepping_batches)
        total = self.schedule_steps or planned
        if total < planned:
            raise ConfigError(f"trainer.schedule_steps={total} is shorter than the {planned} optimizer steps of this run")
        self.schedule_total = total
        scheduler = build_scheduler(optimizer, self.optim_cfg, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # -- resume: the schedule follows this run's length -------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["schedule_total_steps"] = self.schedule_total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run keeps the LR schedule's position (its step count) but not its length: the schedule is
        the one configure_optimizers built for this run's max_steps / max_epochs / schedule_steps."""
        step = int(checkpoint.get("global_step", 0))
        saved = checkpoint.get("schedule_total_steps")
        self._restored_schedule_total = int(saved) if saved is not None else None
        for state in checkpoint.get("lr_schedulers", []):
            for key in SCHEDULE_SHAPE_KEYS:
                state.pop(key, None)
        self._restored_step = step

    def on_train_start(self) -> None:
        restored = self._restored_schedule_total
        if restored is None or restored == self.schedule_total:
            return
        step = self._restored_step
        if self.schedule_total <= step:
            raise ConfigError(
                f"trainer.max_steps / max_epochs: the checkpoint is at step {step} but this run's LR schedule ends "
                f"at {self.schedule_total}; raise trainer.max_steps or trainer.max_epochs to extend the run"
            )
        # The optimizer carries the old schedule's rate for this step: recompute it on the new schedule.
        scheduler = self.lr_schedulers()
        scheduler.last_epoch -= 1
        scheduler.step()

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
