"""Zero-shot classification on precomputed image features, through clip-benchmark's own `evaluate`."""
from __future__ import annotations

from typing import Any, Callable

import torch
from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot
from sklearn.metrics import roc_auc_score


class _Precomputed(torch.nn.Module):
    """A CLIP whose image tower is already applied: encode_image passes features through, encode_text is the model's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def encode_image(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


class _FeatureBatches:
    """What clip-benchmark's loop iterates: (features, targets) batches, plus `.dataset.classes`."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, classes: list[str], batch_size: int):
        self.features, self.targets, self.batch_size = features, targets, batch_size
        self.dataset = type("Classes", (), {"classes": classes})()

    def __iter__(self):
        for start in range(0, len(self.features), self.batch_size):
            yield self.features[start:start + self.batch_size], self.targets[start:start + self.batch_size]

    def __len__(self) -> int:
        return (len(self.features) + self.batch_size - 1) // self.batch_size


def classifier(model: torch.nn.Module, tokenizer: Callable, classes: list[str], templates: Any, device: torch.device,
               amp: bool) -> torch.Tensor:
    return cb_zeroshot.zero_shot_classifier(model, tokenizer, classes, templates, device.type, amp=amp)


def evaluate(model: torch.nn.Module, tokenizer: Callable, features: torch.Tensor, targets: torch.Tensor,
             classes: list[str], templates: Any, device: torch.device, amp: bool, batch_size: int = 256) -> dict:
    """clip-benchmark's metrics (acc1, acc5, mean_per_class_recall; mAP for multi-label), plus ROC AUC for 2 classes."""
    model = model.to(device).eval()
    batches = _FeatureBatches(features, targets, classes, batch_size)
    metrics = cb_zeroshot.evaluate(_Precomputed(model), batches, tokenizer, classes, templates, device.type, amp=amp)
    if len(classes) == 2 and targets.ndim == 1:
        clf = classifier(model, tokenizer, classes, templates, device, amp)
        logits, true = cb_zeroshot.run_classification(_Precomputed(model), clf, batches, device.type, amp=amp)
        metrics["roc_auc"] = roc_auc(logits, true)
    return metrics


def roc_auc(logits: torch.Tensor, target: torch.Tensor) -> float:
    """ROC AUC of class 1 (Hateful Memes' metric); the score is the softmax probability of class 1."""
    if len(torch.unique(target)) < 2:
        return float("nan")
    return float(roc_auc_score(target.numpy(), torch.softmax(logits.float(), dim=1)[:, 1].numpy()))
