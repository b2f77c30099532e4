"""A stage's k-means centres and the assignment to them: what dedup (stage 1), cluster (stage 2) and balance
(stage 4) share.

`fit_centroids` writes `<stage>/centroids.npy` (+ `_kmeans.json`; a fit that exists is reused): flat k-means as one
Ray task up to `two_level_above` centres, two-level k-means above (twolevel.py, its units as tasks). `assigner_for`
gives the nearest-centre search of a fitted stage. Both run where the driver sends them: the fit's tasks ask for one
GPU when `gpu` (faiss-gpu and a GPU in the cluster).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from realsyn_pl.construct.clustering import kmeans, twolevel
from realsyn_pl.construct.engine import products
from realsyn_pl.construct.engine.arrays import ArrayReader, save_npy
from realsyn_pl.construct.engine.stage import Stage, StageError, write_json

CENTROIDS = "centroids.npy"
INFO = "_kmeans.json"


def spec_from(c: Any, key: str) -> twolevel.Spec:
    """The k-means spec of a stage config (cluster.* or balance.*)."""
    fields = twolevel.Spec.__dataclass_fields__
    return twolevel.Spec(**{f: getattr(c, f) for f in fields if f != "key" and hasattr(c, f)}, key=key)


def fit_flat(stage_dir: Path, name: str, reader: ArrayReader, spec: twolevel.Spec, gpu: bool, info: dict[str, Any],
             mask: twolevel.Mask = None) -> None:
    """One flat k-means on a seeded sample of the rows (where `mask(p)` is True): the task behind fit_centroids."""
    masks = None if mask is None else [mask(p) for p in range(len(reader.indices))]
    sample = kmeans.sample_rows(reader, info["n_sample_target"], spec.seed, masks)
    if len(sample) == 0:
        raise StageError(f"{name}: no embeddings to cluster")
    try:
        fit = kmeans.train(sample, spec.k, spec.niter, spec.seed, gpu, spec.init, spec.nredo, f"{spec.key}.init")
    except ValueError as err:
        raise StageError(f"{name}: {err}") from None
    write_json(stage_dir / INFO, {**info, "k": len(fit.centroids), "n_train": fit.n_train, "gpu": fit.gpu,
                                  "objective": fit.objective, "niter": spec.niter, "init": spec.init,
                                  "nredo": spec.nredo})
    save_npy(stage_dir / CENTROIDS, fit.centroids)


def fit_centroids(ex: Any, stage: Stage, reader: ArrayReader, spec: twolevel.Spec, gpu: bool,
                  mask: twolevel.Mask = None, n_rows: Optional[int] = None,
                  info: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """`centroids.npy` on a sample of the rows (those `mask(p)` keeps in shard p; `n_rows` of them in all), unless
    the stage has it already. Returns the fit's summary."""
    path, info_path = stage.dir / CENTROIDS, stage.dir / INFO
    n_rows = len(reader) if n_rows is None else n_rows
    info = info if info is not None else twolevel.plan(spec, n_rows)
    if not path.is_file():
        res = ex.resources(stage.root, gpu=gpu)
        if info["method"] == "two_level":
            return twolevel.TwoLevelFit(stage, reader, spec, gpu, info, mask, n_rows).run(ex, res)
        ex.call(stage, "k-means", fit_flat, stage.dir, stage.name, reader, spec, gpu, info, mask, resources=res)
    return json.loads(info_path.read_text()) if info_path.is_file() else {}


def assigner_for(stage_dir: Path, spec: twolevel.Spec, gpu: bool, batch: int = 65536, fp16: bool = True,
                 mode: Optional[str] = None):
    """The assignment of a fitted stage (`mode`, default spec.assign): exact (every centre; faiss, fp16 on the task's
    GPU, or torch there where faiss has no GPU support) | two_level (top assign_probe coarse centres, then their children; numpy on the CPU) | auto (two_level for
    a two-level fit on the CPU, exact on a GPU, where 2M centres x 1024 in fp16 are one product away)."""
    mode = mode or spec.assign
    check_assign(stage_dir, spec, mode)
    two = (stage_dir / "parent.npy").is_file()
    centroids = np.load(stage_dir / CENTROIDS, allow_pickle=False)
    cuda = not gpu and products.task_device() == "cuda"  # a GPU this task holds, faiss without GPU support
    if two and (mode == "two_level" or (mode == "auto" and not (gpu or cuda))):
        return twolevel.TwoLevelAssigner(np.load(stage_dir / "coarse.npy", allow_pickle=False), centroids,
                                         np.load(stage_dir / "parent.npy", allow_pickle=False), spec.assign_probe,
                                         batch)
    if cuda:
        return products.TorchAssigner(centroids, "cuda", batch, fp16)
    return kmeans.Assigner(centroids, gpu, batch, fp16)


def check_assign(stage_dir: Path, spec: twolevel.Spec, mode: str) -> None:
    if mode not in ("auto", "exact", "two_level"):
        raise StageError(f"{spec.key}.assign must be auto, exact or two_level, got {mode!r}")
    if mode == "two_level" and not (stage_dir / "parent.npy").is_file():
        raise StageError(f"{spec.key}.assign=two_level needs a two-level fit ({spec.key}.method=two_level)")


class AssignerOf:
    """`assigner_for(...)` built once per worker process, on first use in a task: what a step's work function
    carries instead of the centre index itself (a faiss index does not travel, and 2M centres should not)."""

    def __init__(self, stage_dir: Path, spec: twolevel.Spec, gpu: bool, batch: int = 65536, fp16: bool = True,
                 mode: Optional[str] = None):
        self.args = (Path(stage_dir), spec, gpu, batch, fp16, mode)
        check_assign(Path(stage_dir), spec, mode or spec.assign)

    def __call__(self) -> Any:
        from realsyn_pl.construct.engine.memo import per_process

        stage_dir = self.args[0]
        stamp = (stage_dir / CENTROIDS).stat().st_mtime_ns  # a refit in the same place is another assigner
        return per_process(f"assigner:{stage_dir}:{stamp}:{self.args[1:]}", lambda: assigner_for(*self.args))
