"""Linear probe with clip-benchmark's protocol, on CPU or GPU (CLIP's L-BFGS protocol: lbfgs_probe.py).

clip-benchmark (metrics/linear_probe.py) trains a linear layer (logistic regression) with AdamW, a cosine LR schedule
and cross-entropy on frozen, L2-normalised image features, picks the weight decay on a validation split by a coarse
(7 points) then halving search over logspace(-6, 2, 97), and retrains on train+val. It asserts CUDA; this is the
same procedure, step for step and with the same seeding, on whatever device is given.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from clip_benchmark.metrics.linear_probe import cosine_lr
from clip_benchmark.metrics.zeroshot_classification import accuracy
from sklearn.metrics import balanced_accuracy_score
from torch.utils.data import DataLoader, TensorDataset

from realsyn_pl.evaluation import lbfgs_probe
from realsyn_pl.evaluation.config import LinearProbeConfig
from realsyn_pl.evaluation.zeroshot import roc_auc

WD_GRID = np.logspace(-6, 2, num=97).tolist()
WD_COARSE = np.logspace(-6, 2, num=7).tolist()


def train(features: torch.Tensor, targets: torch.Tensor, num_classes: int, weight_decay: float,
          cfg: LinearProbeConfig, device: torch.device) -> torch.nn.Linear:
    torch.manual_seed(cfg.seed)
    model = torch.nn.Linear(features.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(features, targets), batch_size=cfg.batch_size, shuffle=True)
    schedule = cosine_lr(optimizer, cfg.lr, 0.0, cfg.epochs * len(loader))
    for epoch in range(cfg.epochs):
        for i, (x, y) in enumerate(loader):
            schedule(i + epoch * len(loader))
            optimizer.zero_grad()
            loss = criterion(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
    return model


@torch.no_grad()
def infer(model: torch.nn.Linear, features: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    return torch.cat([model(features[s:s + batch_size].to(device)).cpu()
                      for s in range(0, len(features), batch_size)]) if len(features) else torch.zeros(0, model.out_features)


def _val_acc(train_x, train_y, val_x, val_y, num_classes, wd, cfg, device) -> float:
    model = train(train_x, train_y, num_classes, wd, cfg, device)
    acc1, = accuracy(infer(model, val_x, device, cfg.batch_size).float(), val_y.float(), topk=(1,))
    return acc1


def find_peak(indices: list[int], cache: dict, *args) -> int:
    """The index (in WD_GRID) with the best validation accuracy; ties keep the earlier index, as clip-benchmark."""
    best_idx, best = 0, 0.0
    for idx in indices:
        if idx not in cache:
            cache[idx] = _val_acc(*args[:5], WD_GRID[idx], *args[5:])
        if best < cache[idx]:
            best_idx, best = idx, cache[idx]
    return best_idx


def sweep_weight_decay(train_x, train_y, val_x, val_y, num_classes, cfg, device) -> float:
    args = (train_x, train_y, val_x, val_y, num_classes, cfg, device)
    cache: dict[int, float] = {}  # training is seeded, so a repeated grid point gives the same accuracy
    peak = find_peak([i for i, wd in enumerate(WD_GRID) if wd in WD_COARSE], cache, *args)
    span = 8
    while span > 0:
        left, right = max(peak - span, 0), min(peak + span, len(WD_GRID) - 1)
        peak = find_peak([left, peak, right], cache, *args)
        span //= 2
    return WD_GRID[peak]


def fewshot_indices(targets: torch.Tensor, k: int, seed: int) -> Optional[list[int]]:
    """clip-benchmark's selection: a seeded permutation, the first k of each class (all if k < 0); None if short."""
    torch.manual_seed(seed)
    perm = torch.randperm(len(targets)).tolist()
    counts: dict[int, int] = {}
    keep = []
    for p in perm:
        t = int(targets[p])
        counts.setdefault(t, 0)
        if k < 0 or counts[t] < k:
            counts[t] += 1
            keep.append(p)
    if k > 0 and any(c != k for c in counts.values()):
        return None
    return keep


def evaluate(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             cfg: LinearProbeConfig, device: torch.device, val_x: Optional[torch.Tensor] = None,
             val_y: Optional[torch.Tensor] = None) -> dict:
    """Linear-probe metrics (lp_acc1, lp_acc5, lp_mean_per_class_recall, ...) under cfg.protocol: clip-benchmark's
    (its weight_decay) or CLIP's L-BFGS logistic regression (its C, lbfgs_probe.py)."""
    if cfg.normalize:
        train_x, test_x = _norm(train_x), _norm(test_x)
        val_x = _norm(val_x) if val_x is not None else None
    with torch.random.fork_rng(devices=[]):
        keep = fewshot_indices(train_y, cfg.fewshot_k, cfg.seed)
        if keep is None:
            raise ValueError(f"linear probe: some class has fewer than fewshot_k={cfg.fewshot_k} training samples")
        fx, fy = train_x[keep], train_y[keep]
        num_classes = int(train_y.max()) + 1  # as clip-benchmark: classes seen in the train split
        lbfgs = cfg.protocol == "lbfgs"
        dtype = lbfgs_probe.DTYPES[cfg.dtype] if lbfgs else None
        if val_x is not None and len(val_x):  # the regularisation chosen on the validation split
            chosen = (lbfgs_probe.sweep_c(fx, fy, val_x, val_y, num_classes, cfg.max_iter, cfg.tol, dtype, device)
                      if lbfgs else sweep_weight_decay(fx, fy, val_x, val_y, num_classes, cfg, device))
            if cfg.fewshot_k < 0:  # full data: the final fit uses train + val
                fx, fy = torch.cat([fx, val_x]), torch.cat([fy, val_y])
        else:
            chosen = lbfgs_probe.NO_SWEEP_C if lbfgs else 0.0
        if lbfgs:
            probe = lbfgs_probe.fit(fx, fy, num_classes, chosen, cfg.max_iter, cfg.tol, dtype, device)
            logits = probe.logits(test_x)
            # iterations of the final fit: max_iter means it stopped on the cap, not on tol (scikit-learn's
            # ConvergenceWarning)
            settings = {"C": chosen, "max_iter": cfg.max_iter, "lbfgs_iterations": probe.iterations,
                        "dtype": cfg.dtype}
        else:
            logits = infer(train(fx, fy, num_classes, chosen, cfg, device), test_x, device, cfg.batch_size)
            settings = {"weight_decay": chosen, "epochs": cfg.epochs}
    pred = logits.argmax(dim=1)
    if test_y.max() >= 5:
        acc1, acc5 = accuracy(logits.float(), test_y.float(), topk=(1, 5))
    else:
        acc1, = accuracy(logits.float(), test_y.float(), topk=(1,))
        acc5 = float("nan")
    metrics = {"lp_acc1": acc1, "lp_acc5": acc5, "lp_mean_per_class_recall": balanced_accuracy_score(test_y, pred),
               "protocol": cfg.protocol, **settings, "seed": cfg.seed, "fewshot_k": cfg.fewshot_k,
               "normalized": cfg.normalize}
    if num_classes == 2:
        metrics["lp_roc_auc"] = roc_auc(logits, test_y)
    return metrics


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def split_validation(x: torch.Tensor, y: torch.Tensor, proportion: float, seed: int):
    """A seeded random share of the train split as validation (when the dataset has no val split)."""
    if not 0.0 < proportion < 1.0:
        raise ValueError(f"val_proportion must be in (0, 1), got {proportion}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(x) * proportion))
    val, tr = perm[:n_val], perm[n_val:]
    return x[tr], y[tr], x[val], y[val]
