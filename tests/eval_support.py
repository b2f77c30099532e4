"""Shared pieces of the eval tests: a tiny open_clip checkpoint, generated wds datasets, clip-benchmark's own CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from realsyn_pl.evaluation import synthetic

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
NAME = "realsyn-eval-tiny"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def tiny_checkpoint(folder: Path, seed: int) -> Path:
    """A random-init tiny CLIP saved as an open_clip state dict (what `--pretrained PATH` reads)."""
    import open_clip

    from realsyn_pl.models.factory import register_model_config

    register_model_config(NAME, TINY)
    torch.manual_seed(seed)
    model = open_clip.create_model(NAME)
    path = folder / f"tiny_seed{seed}.pt"
    torch.save(model.state_dict(), path)
    (folder / "tiny.json").write_text(json.dumps(TINY))
    return path


def make_data(folder: Path) -> dict[str, Path]:
    """6-class colour classification (test in 2 shards, 37 samples: not a multiple of any batch or rank count),
    and a 30-image, 2-captions-each retrieval set."""
    cls = synthetic.write_classification(folder / "colours", {"train": 96, "val": 48, "test": 37}, seed=3, px=32,
                                         per_shard=20, labeling="colour")
    ret = synthetic.write_retrieval(folder / "captions", 30, seed=4, px=32, per_shard=16)
    return {"classification": cls, "retrieval": ret}


def overrides(ckpt: Path, out: Path, datasets: str, **extra) -> list[str]:
    items = {"model.name": NAME, "model.custom": json.dumps(TINY), "model.pretrained": str(ckpt),
             "output_dir": str(out), "datasets": datasets, "workers": 0, "batch_size": 16,
             "trainer.accelerator": "cpu", "linear_probe.cache_dir": str(out / "cache"), "amp": "false"}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def classification_entry(root: Path, tasks: str = "[zeroshot_classification]", **fields) -> str:
    more = "".join(f", {k}: {v}" for k, v in fields.items())
    return f"{{key: colours, dataset: wds/colours, root: '{root}', tasks: {tasks}{more}}}"


def retrieval_entry(root: Path) -> str:
    return f"{{key: captions, dataset: wds/captions, root: '{root}', tasks: [zeroshot_retrieval], metric: recall}}"


def result_file(out: Path, key: str, task: str) -> dict:
    """Our result JSON of (dataset key, task), found through summary.json (file names follow the --output template)."""
    summary = json.loads((out / "summary.json").read_text())
    results = [r for s in summary.get("models", [summary]) for r in s["results"]]
    match = [r["file"] for r in results if r["key"] == key and r["task"] == task and r["status"] == "ok"]
    assert len(match) == 1, (key, task, match)
    return json.loads(Path(match[0]).read_text())


def clip_benchmark_eval(folder: Path, ckpt: Path, dataset: str, root: Path, task: str, out: Path,
                        workers: int = 0, amp: bool = False, device: str = "cpu") -> dict:
    """clip-benchmark's own `clip_benchmark eval` on the same checkpoint and data: --no_amp (fp32, as our amp=false)
    unless amp (its default autocast, as our amp=true), on `device`: cpu or cuda (it takes CUDA wherever CUDA is
    visible, so cpu hides the GPUs)."""
    cmd = [sys.executable, "-m", "realsyn_pl.evaluation.clip_benchmark_cli", "--model-config",
           f"{NAME}={folder / 'tiny.json'}", "--", "eval", "--model", NAME, "--pretrained", str(ckpt),
           "--dataset", dataset, "--dataset_root", str(root), "--task", task] + ([] if amp else ["--no_amp"]) + [
           "--num_workers", str(workers),
           "--batch_size", "16", "--recall_k", "1", "5", "10", "--output", str(out), "--quiet"]
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else ENV
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def duplicate_caption_set(folder: Path, n: int = 40) -> Path:
    """A retrieval set (two captions per image) where many images share identical captions, as in COCO and Flickr:
    captions name only the colour, so images of one colour tie on every caption that names it."""
    import random

    from realsyn_pl.demo import world

    rng = random.Random(5)
    records = []
    for i in range(n):
        thing = world.random_thing(rng)
        texts = [f"a {thing.colour} thing.", f"a photo of something {thing.colour}."]
        records.append({"__key__": "s%07d" % i, "png": synthetic._png(world.render(thing, rng, 32)),
                        "txt": "\n".join(texts)})
    synthetic._write_split(folder, "test", records, per_shard=16)
    (folder / "dataset_type.txt").write_text("retrieval\n")
    return folder
