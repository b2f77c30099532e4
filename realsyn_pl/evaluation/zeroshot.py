"""Zero-shot classification on precomputed image features, through clip-benchmark's own `evaluate`."""
from __future__ import annotations

from typing import Any, Callable, Optional

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
    """What clip-benchmark's loop iterates: (features, targets) batches, plus `.dataset.classes`.

    `batch_sizes` (in order) reproduces the batches clip-benchmark's own loader made, so every logits matmul has the
    rows it had there (CPU matmul results can depend on the number of rows); else fixed-size batches."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, classes: list[str], batch_size: int,
                 batch_sizes: Optional[list[int]] = None):
        if batch_sizes is None:
            batch_sizes = [min(batch_size, len(features) - s) for s in range(0, len(features), batch_size)]
        if sum(batch_sizes) != len(features):
            raise ValueError(f"batch sizes add up to {sum(batch_sizes)}, not {len(features)} samples")
        self.features, self.targets, self.batch_sizes = features, targets, batch_sizes
        self.dataset = type("Classes", (), {"classes": classes})()

    def __iter__(self):
        start = 0
        for size in self.batch_sizes:
            yield self.features[start:start + size], self.targets[start:start + size]
            start += size

    def __len__(self) -> int:
        return len(self.batch_sizes)


def classifier(model: torch.nn.Module, tokenizer: Callable, classes: list[str], templates: Any, device: torch.device,
               amp: bool) -> torch.Tensor:
    return cb_zeroshot.zero_shot_classifier(model, tokenizer, classes, templates, device.type, amp=amp)


def evaluate(model: torch.nn.Module, tokenizer: Callable, features: torch.Tensor, targets: torch.Tensor,
             classes: list[str], templates: Any, device: torch.device, amp: bool, batch_size: int = 256,
             batch_sizes: Optional[list[int]] = None, dtype: torch.dtype = torch.float32) -> dict:
    """clip-benchmark's metrics (acc1, acc5, mean_per_class_recall; mAP for multi-label), plus ROC AUC for 2 classes.

    `dtype`: the encoder's output dtype (bf16/fp16 under amp), restored so the logits are made from the very tensors
    clip-benchmark's loop makes them from."""
    model = model.to(device).eval()
    batches = _FeatureBatches(features.to(dtype), targets, classes, batch_size, batch_sizes)
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
