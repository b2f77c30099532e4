"""CLIP's linear-probe protocol (Radford et al. 2021, appendix A.3), in torch so it runs on a GPU.

CLIP fits scikit-learn's LogisticRegression (L-BFGS, max_iter 1000) on frozen image features and picks the inverse
L2 regularisation strength C on the validation split "over the range between 1e-6 and 1e6, with 96 logarithmically
spaced steps", by "a parametric binary search that starts with [10^-6, 10^-5.5, ..., 10^6] and iteratively halves
the interval around the peak until it reaches a resolution of 8 steps per decade". What runs here:

- the grid C_GRID = logspace(-6, 6, 97) (8 steps per decade); the coarse pass scores every 4th point (25 points, half
  a decade apart), then two halvings score the points 2 and then 1 grid steps either side of the peak;
- the score is top-1 accuracy on the validation split; a tie keeps the smaller C (the stronger regularisation);
- the final classifier is refit on train + val at the chosen C and scored on the test split.

Each fit minimises sum of cross-entropy + ||W||^2 / (2 C) over the multinomial weights W and an unpenalised
intercept (scikit-learn's objective C * sum of cross-entropy + ||W||^2 / 2, divided by C as scikit-learn computes it),
starting from zeros, by full-batch torch.optim.LBFGS with a strong Wolfe line search. It stops when the largest
gradient entry of that objective is <= tol, or after max_iter iterations: scikit-learn's criterion up to 1.1, the
versions CLIP ran (from 1.2 scikit-learn divides the objective by n, so its tol t is our t * n). With two classes
scikit-learn fits one binary logistic regression; the multinomial fit at C / 2 has the same optimum
(W = [v/2, -v/2] for its weight v), so the multinomial code serves both and C means what it means in scikit-learn.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

C_GRID = np.logspace(-6, 6, num=97).tolist()  # 8 steps per decade over [1e-6, 1e6]
COARSE_STEP = 4  # the coarse pass: every 4th grid point, i.e. half a decade apart
HALVINGS = (2, 1)  # grid steps either side of the peak in each halving: 1/4, then 1/8 of a decade
NO_SWEEP_C = 1.0  # scikit-learn's default C, used when there is no validation split to sweep on
HISTORY = 50  # L-BFGS correction pairs kept (fit)
CHUNK_ROWS = 1 << 16  # rows per forward/backward piece: ImageNet-size logits never sit in memory whole
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Probe:
    """A fitted multinomial logistic regression: logits = x @ weight.T + bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, iterations: int):
        self.weight, self.bias, self.iterations = weight, bias, iterations

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return torch.cat([(x[s:s + CHUNK_ROWS].to(w.device, w.dtype) @ w.T + self.bias).cpu()
                          for s in range(0, len(x), CHUNK_ROWS)]) if len(x) else torch.zeros(0, len(w))


def fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, max_iter: int, tol: float,
        dtype: torch.dtype, device: torch.device) -> Probe:
    """scikit-learn's LogisticRegression(C=c, max_iter=max_iter, tol=tol) fit, by torch's L-BFGS."""
    x = x.to(device, dtype)
    y = y.to(device, torch.long)
    n, d = x.shape
    c_eff = c / 2 if num_classes == 2 else c  # the binary fit at c (module docstring)
    weight = torch.zeros(num_classes, d, dtype=dtype, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=dtype, device=device, requires_grad=True)
    # Up to 15 evaluations per iteration on average, as scipy's maxfun default (15000) against maxiter 1000. The
    # history is 50, not scipy's 10: torch's L-BFGS with 10 needs ~3x the iterations of scipy's to reach a tight
    # tolerance, with 50 about as many (same optimum; 50 x 2 vectors of classes x (dim + 1) numbers, 0.4 GB in
    # float64 for ImageNet on ViT-B/32 features). The objective is summed over samples, not averaged: torch keeps a
    # curvature pair only if s.y > 1e-10, which the tiny steps of a mean objective at small C never reach.
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, max_eval=15 * max_iter,
                                  tolerance_grad=tol, tolerance_change=64 * torch.finfo(dtype).eps,
                                  history_size=HISTORY, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), dtype=dtype, device=device)
        for s in range(0, n, CHUNK_ROWS):
            part = torch.nn.functional.cross_entropy(x[s:s + CHUNK_ROWS] @ weight.T + bias, y[s:s + CHUNK_ROWS],
                                                     reduction="sum")
            part.backward()
            total += part.detach()
        penalty = weight.pow(2).sum() / (2 * c_eff)
        penalty.backward()
        return total + penalty.detach()

    optimizer.step(closure)
    iterations = int(optimizer.state[optimizer.param_groups[0]["params"][0]].get("n_iter", 0))
    return Probe(weight.detach(), bias.detach(), iterations)


def search(score: Callable[[int], float]) -> int:
    """The index into C_GRID that CLIP's parametric binary search settles on, given score(index); each index is
    scored at most once."""
    cache: dict[int, float] = {}

    def peak_of(indices: list[int]) -> int:
        best_idx, best = indices[0], -float("inf")
        for idx in indices:  # ascending C: a tie keeps the smaller C
            if idx not in cache:
                cache[idx] = score(idx)
            if cache[idx] > best:
                best_idx, best = idx, cache[idx]
        return best_idx

    last = len(C_GRID) - 1
    peak = peak_of(list(range(0, last + 1, COARSE_STEP)))
    for span in HALVINGS:
        peak = peak_of(sorted({max(peak - span, 0), peak, min(peak + span, last)}))
    return peak


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y.to(logits.device)).double().mean()) if len(y) else 0.0


def sweep_c(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
            num_classes: int, max_iter: int, tol: float, dtype: torch.dtype, device: torch.device) -> float:
    """The C with the best validation accuracy under CLIP's search."""
    train_x, val_x = train_x.to(device, dtype), val_x.to(device, dtype)  # once, not once per fit

    def score(idx: int) -> float:
        probe = fit(train_x, train_y, num_classes, C_GRID[idx], max_iter, tol, dtype, device)
        return accuracy(probe.logits(val_x), val_y)

    return C_GRID[search(score)]
