"""LightningModule scoring sentences with a transformers causal LM: PPL(x) = exp(-(1/t) sum_i log p(x_i | x_<i)).

Tokenisation choice (the paper leaves it open): the LM's BOS token (GPT-2: <|endoftext|>) is prepended, so all t
tokens of the sentence are predicted, the first one from BOS alone; pad positions are masked out.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from realsyn_pl.construct.engine.predict import BuildPredictModule


class PerplexityScorer(BuildPredictModule):
    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm.eval()

    def infer(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        logits = self.lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target, tmask = ids[:, 1:], mask[:, 1:].float()
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        mean = (nll * tmask).sum(1) / tmask.sum(1).clamp_min(1)
        return {"ppl": torch.exp(mean.double())}
