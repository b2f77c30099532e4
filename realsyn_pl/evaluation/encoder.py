"""The LightningModule that `eval` runs through `Trainer.predict` when it spans several processes or devices."""
from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch

from realsyn_pl.evaluation.features import encode_batch


class Encoder(L.LightningModule):
    def __init__(self, model: torch.nn.Module, tokenizer: Callable):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict:
        return encode_batch(self.model, self.tokenizer, batch, self.device)
