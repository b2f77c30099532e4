"""Similarity products where a task holds a GPU: torch on CUDA for dedup's pair blocks, retrieval's intra-cluster
top-k and the exact centre probe; numpy (BLAS) on the CPU otherwise.

Ray hides the GPUs from a task that did not ask for one (CUDA_VISIBLE_DEVICES is empty), so `task_device()` inside a
task says whether the driver gave it a GPU. The products are float32 on either device (TF32 off): the GPU's differ
from the CPU's in the last bits only, and every caller is built so that such bits cannot change its result: dedup
recomputes in float64 every distance float32 cannot decide, and a top-k recomputes its k + TIE_PAD candidates in
float64 on the host and ranks them there (higher value, then lower index).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import numpy as np

from realsyn_pl.construct.clustering.topk import NEG, topk_rows
from realsyn_pl.construct.engine.stage import StageError

TIE_PAD = 8  # extra candidates taken from float32 products so the exact rerank can apply the tie rule at the k-th place
# a device is "cpu" (numpy and BLAS), "cuda" / "cuda:N" (torch), or "torch:cpu": torch's code on the CPU, which
# runs the GPU path on a machine without one


def _torch_device(device: str) -> str:
    return device.removeprefix("torch:")


def wants_gpu(setting: str, key: str, cluster_gpus: float) -> bool:
    """Whether a step's tasks ask Ray for a GPU: `auto` where the cluster has one, `true` (an error without one),
    `false` never."""
    if setting not in ("auto", "true", "false"):
        raise StageError(f"{key} must be auto, true or false, got {setting!r}")
    if setting == "true" and cluster_gpus < 1:
        raise StageError(f"{key}=true but the Ray cluster has no GPU")
    return setting != "false" and cluster_gpus >= 1


def task_device() -> str:
    """'cuda' when this process sees a CUDA device (inside a Ray task: the task asked for a GPU), else 'cpu'."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def _exact_fp32() -> Iterator[None]:
    """TF32 would round the inputs to 10 bits of mantissa: off for these products."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


Labels = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def candidates(xr: np.ndarray, xc: np.ndarray, limit: float, row_lo: int, col_lo: int, n_members: int, block: int,
               chunk: int, device: str = "cpu", labels: Optional[Labels] = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(rows of xr, columns of xc, float32 distance 1 - <xr, xc>) of every pair closer than `limit`, in chunks of at
    most max(chunk, columns): rows `block` at a time, member x member pairs once (the column's index in the
    cluster's order, col_lo + c, above the row's, row_lo + r), member x guest pairs (column index >= n_members)
    always. `labels(lo, hi)`: (a label per row lo..hi-1, one per column), read as each block begins; pairs whose
    labels are equal are left out (the caller's items already connected)."""
    if device == "cpu":
        yield from _numpy_candidates(xr, xc, limit, row_lo, col_lo, n_members, block, chunk, labels)
    else:
        yield from _torch_candidates(xr, xc, limit, row_lo, col_lo, n_members, block, chunk, device, labels)


def _chunks(per_row: np.ndarray, chunk: int) -> Iterator[tuple[int, int]]:
    """Row ranges holding at most `chunk` candidates (or one row), from the running count per row."""
    start = 0
    while start < len(per_row):
        base = per_row[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(per_row, base + chunk, "right")))
        yield start, stop
        start = stop


def _parts(n_rows: int, n_cols: int, labels: Optional[Labels], lo: int
           ) -> list[tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]]:
    """How one block of rows is multiplied: [(rows, columns, row labels, column labels)], None = all. Where most of
    the block's rows are already one component (the later blocks of a dense group), those rows are multiplied only
    by the columns outside it: their products with its own members could only repeat what is known. So a group of m
    near copies costs its first block's products, not m^2."""
    if labels is None:
        return [(None, None, None, None)]
    lr, lc = labels(lo, lo + n_rows)
    values, counts = np.unique(lr, return_counts=True)
    top = values[np.argmax(counts)]
    inside = lr == top
    outside_cols = np.flatnonzero(lc != top)
    if counts.max() < 2 or len(outside_cols) > 0.9 * n_cols:
        return [(None, None, lr, lc)]
    rows_in, rows_out = np.flatnonzero(inside), np.flatnonzero(~inside)
    parts = [(rows_in, outside_cols, lr[rows_in], lc[outside_cols])]
    if len(rows_out):
        parts.append((rows_out, None, lr[rows_out], lc))
    return parts


def _blocks(n_rows: int, n_cols: int, block: int, labels: Optional[Labels]) -> Iterator[tuple]:
    """(lo, n, rows, columns, row indices, column indices, row labels, column labels) of each part of each block of
    rows (_parts), indices resolved, empty parts left out."""
    for lo in range(0, n_rows, block):
        n = min(block, n_rows - lo)
        for rows, cols, lr, lc in _parts(n, n_cols, labels, lo):
            rr = np.arange(lo, lo + n) if rows is None else rows + lo
            cc = np.arange(n_cols) if cols is None else cols
            if len(rr) and len(cc):
                yield lo, n, rows, cols, rr, cc, lr, lc


def _numpy_candidates(xr, xc, limit, row_lo, col_lo, n_members, block, chunk, labels=None):
    for lo, n, rows, cols, rr, cc, lr, lc in _blocks(len(xr), len(xc), block, labels):
        xb = xr[lo:lo + n] if rows is None else xr[rr]
        dist = xb @ (xc.T if cols is None else xc[cc].T)
        np.subtract(np.float32(1.0), dist, out=dist)
        cand = dist < limit
        jj = cc + col_lo
        cand &= (jj[None, :] >= n_members) | (jj[None, :] > (rr + row_lo)[:, None])
        if lr is not None:
            cand &= lr[:, None] != lc[None, :]
        for start, stop in _chunks(np.cumsum(cand.sum(axis=1)), chunk):
            r, c = np.nonzero(cand[start:stop])
            r += start
            yield rr[r], cc[c], dist[r, c]


def _torch_candidates(xr, xc, limit, row_lo, col_lo, n_members, block, chunk, device, labels=None):
    import torch

    with _exact_fp32(), torch.no_grad():
        device = _torch_device(device)
        tr = torch.as_tensor(np.asarray(xr, np.float32), device=device)
        tc = torch.as_tensor(np.asarray(xc, np.float32), device=device)
        for lo, n, rows, cols, rr, cc, lr, lc in _blocks(len(xr), len(xc), block, labels):
            xb = tr[lo:lo + n] if rows is None else tr[torch.as_tensor(rr, device=device)]
            xcb = tc if cols is None else tc[torch.as_tensor(cc, device=device)]
            dist = 1.0 - xb @ xcb.T
            ii = torch.as_tensor(rr + row_lo, device=device)
            jj = torch.as_tensor(cc + col_lo, device=device)
            cand = (dist < limit) & ((jj[None, :] >= n_members) | (jj[None, :] > ii[:, None]))
            if lr is not None:
                tlr, tlc = torch.as_tensor(lr, device=device), torch.as_tensor(lc, device=device)
                cand &= tlr[:, None] != tlc[None, :]
            per_row = torch.cumsum(cand.sum(dim=1), 0).cpu().numpy()
            for start, stop in _chunks(per_row, chunk):
                r, c = torch.nonzero(cand[start:stop], as_tuple=True)
                d = dist[start:stop][r, c]
                r, c = r.cpu().numpy() + start, c.cpu().numpy()
                yield rr[r], cc[c], d.cpu().numpy()


def topk(q: np.ndarray, s: np.ndarray, k: int, offset: int = 0, device: str = "cpu",
         s_device: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of q @ s.T per row (+offset) and their similarities, best first, -1/-inf padded, ties to
    the lower column. k + TIE_PAD candidates are chosen from float32 products (BLAS on the CPU, torch on a GPU,
    `s_device` the sentences already there), then their similarities recomputed in float64 on the host
    (`exact_rerank`): the values, and so the ranking, depend on neither the device nor the shape of the product
    (how many images a unit scores at once)."""
    kk = k + TIE_PAD
    if device == "cpu":
        cand, _ = topk_rows(np.asarray(q, np.float32) @ np.asarray(s, np.float32).T, kk)
    else:
        cand, _ = _torch_topk(q, s if s_device is None else s_device, kk, 0, device)
    return exact_rerank(q, s, cand, k, offset)


def exact_rerank(q: np.ndarray, s: np.ndarray, cand: np.ndarray, k: int, offset: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Of each row's candidate columns `cand` (-1 = none), the k best by the float64 inner product rounded to
    float32, ties to the lower column; (columns + offset, values)."""
    if len(q) == 0 or cand.shape[1] == 0:
        return np.full((len(q), k), -1, np.int64), np.full((len(q), k), NEG, np.float32)
    ok = cand >= 0
    r, c = np.nonzero(ok)
    exact = np.full(cand.shape, NEG, np.float32)
    exact[r, c] = np.einsum("ij,ij->i", np.asarray(q, np.float64)[r], np.asarray(s, np.float64)[cand[r, c]])
    return _ranked(np.where(ok, cand, np.iinfo(np.int64).max), exact, k, offset)


def _ranked(cols: np.ndarray, vals: np.ndarray, k: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of the candidate columns `cols` by `vals` (higher first, then the lower column), as
    (columns + offset, values), -1 / -inf where a row has fewer (a candidate valued -inf is none)."""
    idx = np.full((len(cols), k), -1, np.int64)
    val = np.full((len(cols), k), NEG, np.float32)
    by_col = np.argsort(cols, axis=1, kind="stable")
    cols, vals = np.take_along_axis(cols, by_col, axis=1), np.take_along_axis(vals, by_col, axis=1)
    best = np.argsort(-vals, axis=1, kind="stable")[:, :k]
    kk = best.shape[1]
    got_c, got_v = np.take_along_axis(cols, best, axis=1), np.take_along_axis(vals, best, axis=1)
    idx[:, :kk] = np.where(got_v > NEG, got_c + offset, -1)
    val[:, :kk] = got_v
    return idx, val


def _torch_topk(q: np.ndarray, s: Any, k: int, offset: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """topk_rows of q @ s.T computed on `device`: float32 values from torch, the tie rule applied on the host to
    k + TIE_PAD of them."""
    import torch

    device = _torch_device(device)
    m, n = len(q), int(s.shape[0])
    if m == 0 or n == 0:
        return np.full((m, k), -1, np.int64), np.full((m, k), NEG, np.float32)
    with _exact_fp32(), torch.no_grad():
        sims = torch.as_tensor(np.asarray(q, np.float32), device=device) @ to_device(s, device).T
        v, i = torch.topk(sims, min(k + TIE_PAD, n), dim=1)
    return _ranked(i.cpu().numpy(), v.cpu().numpy(), k, offset)


def to_device(x: Any, device: str) -> Any:
    """A float32 tensor of `x` on `device` (as is when it already is one)."""
    import torch

    device = _torch_device(device)
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(x, np.float32), device=device)


# Most bytes one score block of TorchAssigner may take (rows x centres, the product and its fp32 copy): with 2M
# centres, 65,536 rows would be 786 GB; the budget cuts a batch to ~170 rows there and changes no result
ASSIGN_SCORE_BYTES = 2 << 30


class TorchAssigner:
    """Nearest centres by inner product on the task's GPU with torch (where faiss has no GPU support): every centre
    scored, in fp16 when `fp16` (as the faiss GPU index; exact enough to rank centres), `batch` rows at a time, fewer
    where `batch` x centres would pass ASSIGN_SCORE_BYTES."""

    def __init__(self, centroids: np.ndarray, device: str, batch: int = 65536, fp16: bool = True):
        import torch

        self.device = _torch_device(device)
        self.centres = to_device(centroids, self.device)
        if fp16:
            self.centres = self.centres.to(torch.float16)
        per_row = len(self.centres) * (self.centres.element_size() + 4)  # the product and its fp32 copy
        self.batch = max(1, min(batch, ASSIGN_SCORE_BYTES // max(1, per_row)))

    def search(self, x: np.ndarray, nprobe: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(cluster ids (n, nprobe) int64, cosine to each (n, nprobe) float32), best first."""
        import torch

        ids = np.zeros((len(x), nprobe), np.int64)
        sims = np.zeros((len(x), nprobe), np.float32)
        for lo in range(0, len(x), self.batch):
            q = to_device(x[lo:lo + self.batch], self.device).to(self.centres.dtype)
            with _exact_fp32(), torch.no_grad():
                v, i = torch.topk((q @ self.centres.T).float(), min(nprobe, len(self.centres)), dim=1)
            ids[lo:lo + len(q), :v.shape[1]] = i.cpu().numpy()
            sims[lo:lo + len(q), :v.shape[1]] = v.cpu().numpy()
        return ids, sims
