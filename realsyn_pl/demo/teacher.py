"""The demo's teacher: the paper embeds everything with a large web-pretrained CLIP (EVA02-CLIP E/14-plus). Offline,
the demo trains a small CLIP on a modest set of clean captioned images from the same world — the analogue of a
web-pretrained teacher — unless a real model is given by name/path. Its export is what the build stages load."""
from __future__ import annotations

import copy
from pathlib import Path

from realsyn_pl.config import FitConfig, SourceConfig
from realsyn_pl.demo import world


def train_teacher(out_dir: Path, fit: FitConfig, pairs: int, epochs: int, seed: int) -> Path:
    """Train (or reuse) the teacher; returns its open_clip state dict."""
    weights = out_dir / "fit" / "export" / "open_clip_model.pt"
    from realsyn_pl.training.fit import fit_finished

    if fit_finished(out_dir / "fit") and weights.is_file():  # an interrupted teacher resumes below
        return weights
    shards = out_dir / "pairs"
    if not (shards / "sizes.json").is_file():
        # Another seed than the corpus: the teacher never sees the documents' images.
        world.write_world_shards(shards, pairs, max(1, pairs // 8), seed=seed + 777, px=64)
    cfg = copy.deepcopy(fit)
    cfg.output_dir = str(out_dir / "fit")
    cfg.seed = seed
    cfg.resume = "last"  # a killed demo continues its teacher instead of being refused
    cfg.trainer.max_epochs = epochs
    from realsyn_pl.construct.release.write import shard_urls
    from realsyn_pl.training.fit import run_fit

    cfg.data.train = [SourceConfig(urls=shard_urls(shards))]
    run_fit(cfg)
    return weights
