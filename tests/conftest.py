import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# A CLIP small enough for CPU tests (open_clip config schema).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_NAME = "realsyn-test-tiny"


@pytest.fixture(scope="session")
def world_shards(tmp_path_factory):
    """8 shards x 10 samples of the shape world in the RealSyn layout, with sizes.json."""
    from realsyn_pl.demo.world import write_world_shards

    return write_world_shards(tmp_path_factory.mktemp("world"), num_samples=80, samples_per_shard=10, seed=1, px=32)


def fit_overrides(shards, out_dir, **extra):
    """Dotlist for a tiny CPU fit on `shards`."""
    import json

    n = len(json.loads((shards / "sizes.json").read_text()))
    items = {
        "output_dir": str(out_dir),
        "model.name": TINY_NAME,
        "data.train": f"[{{urls: '{shards}/{{00000..{n - 1:05d}}}.tar'}}]",
        "data.batch_size": 8,
        "data.workers": 0,
        "data.shuffle_buffer": 16,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.max_epochs": 1,
        "trainer.log_every_n_steps": 1,
        "logging.wandb": "disabled",
        "logging.progress_bar": False,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]
