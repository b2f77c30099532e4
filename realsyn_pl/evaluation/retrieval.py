"""Zero-shot image-text retrieval on precomputed features, with clip-benchmark's recall code."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k


def evaluate(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor,
             recall_k: list[int], device: torch.device, batch_size: int = 64, amp: bool = False,
             dtype: torch.dtype = torch.float32) -> dict:
    """Recall@k both ways, as clip-benchmark defines it: a hit when any matching item is among the top k.

    image_retrieval = text->image (the paper's "image retrieval"), text_retrieval = image->text.
    `text_image[j]` is the row in `image_features` of caption j. `dtype` is the encoder's output dtype: with amp,
    clip-benchmark normalises the bf16/fp16 features under autocast and scores them in that dtype on the CPU, so
    ties (identical captions, equal scores) are its own only if the scores are made the same way.
    """
    with torch.no_grad(), torch.autocast(device.type, enabled=amp):
        images_emb = F.normalize(image_features.to(device, dtype), dim=-1).cpu()
        texts_emb = F.normalize(text_features.to(device, dtype), dim=-1).cpu()
    scores = texts_emb @ images_emb.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), text_image] = True
    metrics = {}
    dev = device.type
    for k in recall_k:
        metrics[f"image_retrieval_recall@{k}"] = (
            batchify(recall_at_k, scores, positive_pairs, batch_size, dev, k=k) > 0).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (
            batchify(recall_at_k, scores.T, positive_pairs.T, batch_size, dev, k=k) > 0).float().mean().item()
    return metrics
