"""The architecture of a `fit` export found beside its weights: model.name=auto with model.pretrained=
<run>/export/open_clip_model.pt reads <run>/export/<name>.json (what fit writes there for a custom architecture), so
`eval` needs no architecture repeated.

Kept free of torch and open_clip: eval resolves the name when its config loads (result file names and the report
use it), before it sets up the CPU runtime that torch reads at import.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from realsyn_pl.config import ConfigError, ModelConfig

AUTO = "auto"
# model.name=auto without an exported architecture beside the weights: the paper's (and clip-benchmark's) model
DEFAULT_NAME = "ViT-B-32"
OPEN_CLIP_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def read_architecture(path: Path) -> Optional[dict[str, Any]]:
    """The open_clip model config in a .json file, or None for any other JSON (or an unreadable file)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) and all(k in cfg for k in OPEN_CLIP_KEYS) else None


def architecture_beside(weights: str) -> Optional[tuple[str, dict[str, Any]]]:
    """(name, config) of the one open_clip architecture file in the weights' folder; None when there is none."""
    folder = Path(weights).parent
    found = [(p.stem, cfg) for p in sorted(folder.glob("*.json")) if (cfg := read_architecture(p)) is not None]
    if len(found) > 1:
        raise ConfigError(f"model.name=auto: {folder} holds {len(found)} architecture files "
                          f"({', '.join(name + '.json' for name, _ in found)}); set model.name to one of them")
    return found[0] if found else None


def resolve_auto(cfg: ModelConfig) -> ModelConfig:
    """model.name=auto as a concrete model: the architecture exported beside local weights (registered under its
    file's name through model.custom), else ViT-B-32. Any other name is returned unchanged."""
    if cfg.name != AUTO:
        return cfg
    if cfg.custom is not None:
        raise ConfigError("model.custom needs a model.name to register the architecture under (not auto)")
    found = architecture_beside(cfg.pretrained) if cfg.pretrained and Path(cfg.pretrained).is_file() else None
    if found is None:
        return dataclasses.replace(cfg, name=DEFAULT_NAME)
    name, arch = found
    return dataclasses.replace(cfg, name=name, custom=arch)
