"""LightningModule that embeds images or texts with any open_clip model, L2-normalised (stage 1 embed stages)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from realsyn_pl.construct.engine.predict import BuildPredictModule


class Embedder(BuildPredictModule):
    def __init__(self, model: torch.nn.Module, modality: str):
        super().__init__()
        if modality not in ("images", "sentences"):
            raise ValueError(f"modality must be images or sentences, got {modality!r}")
        self.model = model.eval()
        self.modality = modality

    def infer(self, inputs: torch.Tensor) -> dict[str, Any]:
        if self.modality == "images":
            feats = self.model.encode_image(inputs)
        else:
            feats = self.model.encode_text(inputs)
        return {"embedding": F.normalize(feats.float(), dim=-1)}
