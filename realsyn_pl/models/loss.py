"""Symmetric InfoNCE (CLIP) loss with cross-rank feature gathering, numerically matching open_clip's ClipLoss."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn.functional as F
from torch import nn


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    gather_with_grad: bool,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate features from all ranks in rank order.

    With `gather_with_grad`, gradients flow back to every rank's features (the DDP gradient then equals the
    single-process gradient on the global batch). Without it only the local slice keeps its graph.
    """
    if gather_with_grad:
        all_image = torch.cat(torch.distributed.nn.all_gather(image_features), dim=0)
        all_text = torch.cat(torch.distributed.nn.all_gather(text_features), dim=0)
        return all_image, all_text
    image_list = [torch.zeros_like(image_features) for _ in range(world_size)]
    text_list = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(image_list, image_features)
    dist.all_gather(text_list, text_features)
    image_list[rank] = image_features
    text_list[rank] = text_features
    return torch.cat(image_list, dim=0), torch.cat(text_list, dim=0)


class ContrastiveLoss(nn.Module):
    """CLIP loss over the global batch.

    local_loss=True: each rank scores only its own rows against all columns (memory O(local x global)); the
    mean over ranks equals the global loss. local_loss=False: every rank computes the full global loss.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
        if self.world_size == 1:
            per_image = logit_scale * image_features @ text_features.T
            return per_image, per_image.T
        all_image, all_text = gather_features(
            image_features, text_features, self.gather_with_grad, self.rank, self.world_size
        )
        if self.local_loss:
            return logit_scale * image_features @ all_text.T, logit_scale * text_features @ all_image.T
        per_image = logit_scale * all_image @ all_text.T
        return per_image, per_image.T

    def labels(self, num_logits: int, device: torch.device) -> torch.Tensor:
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        return labels

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
        per_image, per_text = self.logits(image_features, text_features, logit_scale)
        labels = self.labels(per_image.shape[0], image_features.device)
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
