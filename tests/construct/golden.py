"""A `build all` that exercises every step with several units, and the hashes of what it writes.

The corpus is the demo's procedural OBELICS corpus (6 files: re-posted, undersized and broken images, templated
and boilerplate sentences); the teacher is a tiny random-init CLIP and the captioner a tiny random-init
VisionEncoderDecoder, both built here (no download). Semantic dedup runs in quantile mode (a fixed share removed
whatever the random model's similarity scale) inside several k-means clusters, retrieval in several buckets, the
balance reduce in several partitions and the writer in several tars, so a scheduler that loses, repeats or reorders a
unit changes the bytes.

GOLDEN holds the sha256 of every data file of that build as the pre-Ray pipeline (commit 0876249, one process,
OMP/torch threads 1) wrote it, with CANARY: a hash of a few float32 products of the same kind, so a machine whose
floating point differs (another CPU's kernels) is told apart from a scheduler that changed the output.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "golden_build.json"
# bookkeeping, not data: timings, versions and config hashes (the config schema may gain or lose keys)
SKIPPED = {"manifest.json", "_config.json", "_replaced.json"}


def corpus(folder: Path) -> list[Path]:
    from realsyn_pl.demo.corpus import CorpusConfig, write_corpus

    return write_corpus(folder, CorpusConfig(documents=240, docs_per_file=40, seed=3, concept_skew=1.5))


def overrides(work: Path, corpus_dir: Path, captioner: Path) -> list[str]:
    from conftest import TINY_CLIP

    items = {
        "work_dir": str(work), "progress": "false", "seed": 0,
        "input.format": "obelics", "input.paths": f"[{corpus_dir}/docs-*.parquet]",
        "download.enabled": "false", "perplexity.enabled": "false",
        "embed.model.name": "golden-tiny", "embed.model.pretrained": "null", "embed.batch_size": 16,
        "embed.workers": 0, "embed.dtype": "float32",
        "dedup.mode": "quantile", "dedup.quantile": 0.3, "dedup.max_threshold": 0.5, "dedup.cluster_size": 60,
        "dedup.partitions": 3, "dedup.bucket_items": 100,
        "dedup_text.mode": "quantile", "dedup_text.quantile": 0.3, "dedup_text.max_threshold": 0.5,
        "dedup_text.cluster_size": 150, "dedup_text.partitions": 2, "dedup_text.bucket_items": 100,
        "cluster.k": 12, "cluster.train_sample": 100000, "cluster.init": "kmeans++",
        "retrieve.k": 3, "retrieve.nprobe": 2, "retrieve.clusters_per_bucket": 3,
        "caption.enabled": "true", "caption.model": str(captioner), "caption.num_beams": 1,
        "caption.max_new_tokens": 6, "caption.batch_size": 8, "caption.workers": 0,
        "tag.vocab": "[builtin:general]", "tag.use_mined": "true", "tag.top_n": 3, "tag.batch_size": 16,
        "tag.workers": 0, "mine_tags.top_k": 50, "mine_tags.min_count": 2,
        "rewrite.backend": "template", "rewrite.batch_size": 16,
        "balance.k": 6, "balance.train_sample": 100000, "balance.init": "kmeans++", "balance.caps": "[4,8]",
        "balance.window.mode": "quantile", "balance.window.q_low": 0.1, "balance.window.q_high": 0.95,
        "balance.reduce_items": 40,
        "write.cap": 8, "write.samples_per_shard": 25, "write.image_size": 32,
        "trainer.accelerator": "cpu",
    }
    return [f"{k}={v}" for k, v in items.items()] + [f"embed.model.custom={json.dumps(TINY_CLIP)}"]


def _content(path: Path, work: Path) -> bytes:
    data = path.read_bytes()
    # the dataset card names the build directory
    return data.replace(str(work).encode(), b"<work>") if path.suffix == ".md" else data


def tree_hashes(work: Path) -> dict[str, str]:
    """sha256 of every data file under `work` (bookkeeping files, done markers and temp files left out)."""
    return {p.relative_to(work).as_posix(): hashlib.sha256(_content(p, work)).hexdigest()
            for p in sorted(work.rglob("*"))
            if p.is_file() and p.name not in SKIPPED and "_done" not in p.parts and not p.name.startswith(".")}


def canary() -> str:
    """A hash of float32 results of the kinds the build computes (a seeded tiny CLIP forward, a matmul, a faiss
    k-means): equal on machines whose kernels round alike."""
    import faiss
    import numpy as np
    import open_clip
    import torch

    from conftest import TINY_CLIP

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    with torch.no_grad():
        img = model.encode_image(torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32))
        txt = model.encode_text(torch.arange(32).reshape(2, 16) % 100)
    x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    km = faiss.Kmeans(16, 4, niter=5, seed=1, spherical=True)
    km.train(x)
    h = hashlib.sha256()
    for a in (img.numpy(), txt.numpy(), x @ x.T, km.centroids):
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    return h.hexdigest()


def load() -> dict:
    return json.loads(GOLDEN.read_text())
