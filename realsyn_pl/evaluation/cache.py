"""Linear-probe feature cache, keyed so a stale entry can never be read back.

Path: <cache_dir>/<model name>/<weights sha256>/<dataset key>-<hash of dataset name, root, transform>/<split>.pt.
The weights hash is over the model's state dict (names, dtypes, shapes, bytes): two checkpoints share an entry only
when they hold the same weights, whatever their file names; a random-init model is never reused across runs.
Each entry also stores its key, checked again on load.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from realsyn_pl.models.factory import load_weights_only


def weights_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


class FeatureCache:
    def __init__(self, cache_dir: Optional[str], model_name: str, fingerprint: str):
        self.root = Path(cache_dir) if cache_dir else None
        self.model_name, self.fingerprint = model_name, fingerprint

    def key(self, dataset_key: str, dataset: str, root: str, split: str, transform: Any, amp: bool = False) -> dict:
        key = {"model": self.model_name, "weights_sha256": self.fingerprint, "dataset_key": dataset_key,
               "dataset": dataset, "root": os.path.abspath(root), "split": split, "transform": repr(transform)}
        if amp:  # autocast features differ from fp32 ones; fp32 keys stay as they were
            key["amp"] = True
        return key

    def path(self, key: dict) -> Optional[Path]:
        if self.root is None:
            return None
        data = hashlib.sha256(f"{key['dataset']}|{key['root']}|{key['transform']}{'|amp' if key.get('amp') else ''}"
                              .encode()).hexdigest()[:12]
        return (self.root / _safe(key["model"]) / key["weights_sha256"][:24]
                / f"{_safe(key['dataset_key'])}-{data}" / f"{_safe(key['split'])}.pt")

    def load(self, key: dict) -> Optional[dict]:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        entry = load_weights_only(path)  # an entry holding other objects is refused, never unpickled
        if not isinstance(entry, dict) or entry.get("key") != key:  # a hash-prefix collision or a hand-edited cache
            return None
        return entry

    def save(self, key: dict, features: torch.Tensor, targets: torch.Tensor) -> None:
        path = self.path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": key, "features": features, "targets": targets}, tmp)
        os.replace(tmp, path)
