"""The LightningModule that `eval` runs through `Trainer.predict` when it spans several processes or devices."""
from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch

from realsyn_pl.evaluation.features import encode_batch


class Encoder(L.LightningModule):
    def __init__(self, model: torch.nn.Module, tokenizer: Callable, amp: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.amp = amp  # clip-benchmark's torch.autocast(device), inside Lightning's own (fp32) precision

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict:
        with torch.autocast(self.device.type, enabled=self.amp):
            return encode_batch(self.model, self.tokenizer, batch, self.device)
