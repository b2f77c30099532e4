"""LightningModule scoring sentences with a transformers causal LM: PPL(x) = exp(-(1/t) sum_i log p(x_i | x_<i)).

Tokenisation choice (the paper leaves it open): the LM's BOS token (GPT-2: <|endoftext|>) is prepended, so all t
tokens of the sentence are predicted, the first one from BOS alone; pad positions are masked out.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from realsyn_pl.construct.engine.predict import BuildPredictModule

# perplexity.precision value: the LM's body under bf16 autocast, its head (logits, log-softmax) in fp32
FP32_LOGITS = "bf16-fp32-logits"


def trainer_precision(precision: str) -> str:
    """The Lightning precision a perplexity.precision value runs the Trainer in (FP32_LOGITS: bf16-mixed, whose
    autocast covers the body; the scorer leaves autocast for the head)."""
    return "bf16-mixed" if precision == FP32_LOGITS else precision


# config keys of transformers models whose forward changes the logits after the output layer
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")

class PerplexityScorer(BuildPredictModule):
    def __init__(self, lm: torch.nn.Module, fp32_logits: bool = False):
        super().__init__()
        self.lm = lm.eval()
        self.fp32_logits = fp32_logits
        if fp32_logits and (lm.get_output_embeddings() is None or getattr(lm, "base_model", lm) is lm):
            raise ValueError(f"perplexity.precision={FP32_LOGITS}: {type(lm).__name__} has no separate base model "
                             "and output head")
        # models whose forward scales or caps the head's output after it: the split below would skip that step
        config = getattr(lm, "config", None)
        post = [k for k in LOGIT_POSTPROCESSING if getattr(config, k, None) not in (None, 1, 1.0)]
        if fp32_logits and post:
            raise ValueError(f"perplexity.precision={FP32_LOGITS}: {type(lm).__name__} post-processes its logits "
                             f"({', '.join(post)}); use perplexity.precision=32 or bf16-mixed")

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.fp32_logits:
            return self.lm(input_ids=ids, attention_mask=mask).logits
        # bf16 logits of a 50k vocabulary round each to ~3 digits and move PPL by several percent; the head is ~8% of
        # GPT-2 large's FLOPs, so only it leaves autocast: the last hidden state upcast, the head applied in fp32
        hidden = self.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        head = self.lm.get_output_embeddings()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return F.linear(hidden.float(), head.weight.float(), bias)

    def infer(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        logits = self.logits(ids, mask)[:, :-1].float()
        target, tmask = ids[:, 1:], mask[:, 1:].float()
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        mean = (nll * tmask).sum(1) / tmask.sum(1).clamp_min(1)
        return {"ppl": torch.exp(mean.double())}
