"""Zero-shot evaluation during `fit`: every N epochs, run a configured suite's zero-shot tasks and log the metrics."""
from __future__ import annotations

from typing import Optional

import lightning as L
import torch

from realsyn_pl.evaluation.config import EvalConfig
from realsyn_pl.evaluation.runner import Runner, amp_context, manual_extractor
from realsyn_pl.evaluation.suites import plan

ZERO_SHOT = ("zeroshot_classification", "zeroshot_retrieval")


class ZeroShotEval(L.Callback):
    """Logs eval/<dataset>/<metric> (fractions) for the zero-shot tasks of `cfg` (suite + datasets).

    The LightningModule must expose `model` (an open_clip CLIP), `tokenizer` and `preprocess_val`, as
    realsyn_pl's CLIPModule does. Every rank evaluates its slice; the logged numbers are the full-dataset ones.
    Missing datasets are reported once and skipped; a dataset that fails on one rank is skipped on all (the ranks
    agree before any collective). cfg.amp applies when fit runs in fp32; under a *-mixed fit precision its
    autocast is used.
    """

    def __init__(self, cfg: EvalConfig, every_n_epochs: int = 1):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.cfg, self.every_n_epochs = cfg, every_n_epochs
        _, runs = plan(cfg)
        self.runs = [(e, t) for e, t in runs if t in ZERO_SHOT]
        if not self.runs:
            raise ValueError("ZeroShotEval: the configured suite has no zero-shot tasks")
        self.reported_missing: set[str] = set()
        self.last: dict[str, float] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.last = self.evaluate(trainer, pl_module)
        for name, value in self.last.items():
            pl_module.log(name, value, rank_zero_only=True)

    def evaluate(self, trainer: Optional[L.Trainer], pl_module: L.LightningModule) -> dict[str, float]:
        model = pl_module.model
        was_training = model.training
        model.eval()
        device = pl_module.device
        context = trainer.precision_plugin.forward_context if trainer is not None else torch.no_grad
        amp = "mixed" in str(trainer.precision) if trainer is not None else False
        if self.cfg.amp and not amp:  # fit runs in fp32: the eval config's amp (clip-benchmark's autocast) applies
            context, amp = amp_context(device), True
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        runner = Runner(self.cfg, model, pl_module.tokenizer, pl_module.preprocess_val,
                        manual_extractor(model, pl_module.tokenizer, device, context), rank, world, device, amp=amp)
        metrics: dict[str, float] = {}
        try:
            results = runner.run_all(self.runs, self._log if rank == 0 else lambda msg: None)
        finally:
            model.train(was_training)
        for r in results:
            for column, value in r.columns().items():
                metrics[f"eval/{column}" if r.task == "zeroshot_retrieval" else f"eval/{column}/{r.metric}"] = value
            if r.status == "ok" and r.task == "zeroshot_classification":
                metrics[f"eval/{r.key}/acc1"] = r.metrics["acc1"]
        return metrics

    def _log(self, msg: str) -> None:
        if msg.startswith(("missing:", "failed:")):
            if msg in self.reported_missing:
                return
            self.reported_missing.add(msg)
        print(msg, flush=True)
