"""Image (and caption) features of a frozen CLIP, computed on every rank's slice and gathered back in dataset order.

`encode_batch` is the step: `Encoder` (encoder.py) runs it through `Trainer.predict` across processes, and
`runner.manual_extractor` in a plain loop (one process on one device, or inside a running Trainer).
No Lightning import here: a single-process eval never pays for it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

# Feature dtypes, by code: features travel as fp32 (exact for bf16/fp16, and what every collective backend
# handles); the code says which dtype the encoder produced, so the metrics see exactly clip-benchmark's tensors.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def encode_batch(model: torch.nn.Module, tokenizer: Callable, batch: dict[str, Any], device: torch.device) -> dict:
    """Raw (unnormalised) features, as clip-benchmark's metric code normalises them itself."""
    out: dict[str, Any] = {"idx": batch["idx"].cpu()}
    image = model.encode_image(batch["image"].to(device))
    out["dtype"] = DTYPES.index(image.dtype) if image.dtype in DTYPES else 0
    out["image"] = image.float().cpu()
    if "texts" in batch:
        flat = [t for texts in batch["texts"] for t in texts]
        owner = torch.tensor([i for i, texts in zip(batch["idx"].tolist(), batch["texts"]) for _ in texts])
        pos = torch.tensor([j for texts in batch["texts"] for j in range(len(texts))])
        if flat:
            text = model.encode_text(tokenizer(flat).to(device)).float().cpu()
        else:
            text = torch.zeros(0, out["image"].shape[1])
        out.update(text=text, text_owner=owner.long(), text_pos=pos.long())
    else:
        out["target"] = batch["target"].cpu()
    return out


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from all ranks (sizes may differ: padded for the collective, then trimmed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([t.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).cpu()


def gather(outputs: Iterable[dict], batch_size: Optional[int] = None) -> dict[str, Any]:
    """Every rank's step outputs joined and sorted by sample key (each sample was read by exactly one rank).

    Keys come from `datasets.rank_loader`: sorted, they are clip-benchmark's sample order, and key // batch_size
    numbers its batches; with batch_size given, "batch_sizes" lists the sizes of those batches in that order."""
    outputs = list(outputs)
    local: dict[str, torch.Tensor] = {}
    for k in ("idx", "image", "target", "text", "text_owner", "text_pos"):
        parts = [o[k] for o in outputs if k in o]
        if parts:
            local[k] = torch.cat(parts)
    # A rank may have no samples (fewer samples than ranks): agree on what exists and on the feature width.
    dtype = max((o.get("dtype", 0) for o in outputs), default=0)
    dim, has_text, has_target, dtype = _max_over_ranks(
        [local["image"].shape[1] if "image" in local else 0, int("text" in local), int("target" in local), dtype])
    empty = {"idx": torch.zeros(0, dtype=torch.long), "image": torch.zeros(0, dim), "text": torch.zeros(0, dim),
             "text_owner": torch.zeros(0, dtype=torch.long), "text_pos": torch.zeros(0, dtype=torch.long),
             "target": torch.zeros(0, dtype=torch.long)}
    wanted = ["idx", "image"] + (["target"] if has_target else []) + (["text", "text_owner", "text_pos"] if has_text else [])
    full = {k: _all_gather_rows(local.get(k, empty[k])) for k in wanted}
    order = torch.argsort(full["idx"])
    result: dict[str, Any] = {"idx": full["idx"][order], "image": full["image"][order], "dtype": DTYPES[dtype]}
    if len(torch.unique(result["idx"])) != len(result["idx"]):
        raise RuntimeError("a sample was read by more than one rank or loader worker")
    if has_target:
        result["target"] = full["target"][order]
    if batch_size:
        result["batch_sizes"] = torch.unique_consecutive(result["idx"] // batch_size, return_counts=True)[1].tolist()
    if has_text:
        # image order, then caption order within an image: the order clip-benchmark's retrieval loop builds
        stride = int(full["text_pos"].max().item()) + 1 if len(full["text_pos"]) else 1
        t_order = torch.argsort(full["text_owner"] * stride + full["text_pos"])
        result["text"] = full["text"][t_order]
        # row of the image each caption belongs to
        result["text_image"] = torch.searchsorted(result["idx"], full["text_owner"][t_order])
    return result


def _max_over_ranks(values: list[int]) -> list[int]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    objs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objs, values)
    return [max(v[i] for v in objs) for i in range(len(values))]
