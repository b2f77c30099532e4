"""Model stages (embed, perplexity, caption, tag, rewrite): the predict-loop contract and the stage runner.

Contract for a model stage: subclass `PredictTask` and `BuildPredictModule`.
- `PredictTask.load(row)` turns one input record (dict with `task.columns`) into a model input; it runs in DataLoader
  workers and raises `SkipRow(reason)` for bad rows (counted as dropped, never a crash).
- `PredictTask.collate(items)` makes a batch input; `BuildPredictModule.infer(inputs)` returns
  {name: tensor/array (n, ...) or list} with one entry per input; `PredictTask.write(stage, input_path, result)`
  writes output shard `result.index` (records and/or arrays, atomically) and returns its Counts.
- Batches never cross input shards, so the computation for a row does not depend on how shards were spread over
  actors: one actor or many give the same numbers. Each actor (engine/actors.py) holds the stage's task and module,
  built once, and runs `Trainer(devices=1).predict` over the whole shards the driver hands it as it becomes free;
  `ShardPredictionWriter` marks each shard done after its files are written, so a rerun skips finished shards.
- `PredictTask.precision` (optional) overrides trainer.precision for that stage (perplexity: fp32 by default).
- What a model stage's output depends on beyond its config's strings (PredictJob.stage): the precision it runs in and
  the content of its weights, named in its config by a `model`, `adapter` or open_clip `pretrained` (or `hf-hub:` /
  `local-dir:` name) entry: a local file or folder, or a hub name / open_clip tag through its local cache. Each is
  identified by its files' sizes, mtimes and the sha256 of their first and last MiB (cheap for GBs of weights); new
  weights at the same path or another precision refuse the old directory. Weights not on this machine (a worker
  node's own copy) identify as what the directory recorded: unknown is not a change.
- The driver never loads a model: a stage describes itself as a `PredictJob` (name, inputs, config, and a function
  that makes the task), and each actor makes its own task from it (actors.py runs it: run_predict_task).
"""
from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import lightning as L
import torch
from torch.utils.data import IterableDataset, get_worker_info

from realsyn_pl.construct.engine.records import num_rows, read_batches
from realsyn_pl.construct.engine.stage import PRECISION, WEIGHTS, Counts, Stage
from realsyn_pl.data.writers import ShardResult


class SkipRow(Exception):
    """Raised by PredictTask.load for a row that cannot be used; the message is the drop reason."""


class PredictTask(ABC):
    name: str = ""           # this stage's name (its output directory)
    input_stage: str = ""    # the stage whose record shards are read
    input_kind: str = ""     # record kind read from it: {kind}-{i:05d}.parquet
    columns: list[str] = ["id"]
    batch_size: int = 32
    workers: int = 0
    # None: the build's trainer.precision; a Lightning precision string fixes this stage's (perplexity: "32")
    precision: Optional[str] = None

    @abstractmethod
    def stage_config(self) -> dict[str, Any]:
        """What the output depends on (model, thresholds, ...): changing it refuses to reuse old shards."""

    def stage_inputs(self) -> list[str]:
        """Every stage directory the output is made from (their fingerprints are part of the stage's hash): the
        input stage, plus any stage a task joins by id (rewrite: caption, tag) or otherwise reads."""
        return [self.input_stage]

    @abstractmethod
    def load(self, row: dict[str, Any]) -> Any:
        ...

    @abstractmethod
    def collate(self, items: list[Any]) -> Any:
        ...

    @abstractmethod
    def build_module(self) -> "BuildPredictModule":
        ...

    @abstractmethod
    def write(self, stage: Stage, input_path: Path, result: ShardResult) -> Counts:
        ...

    def begin_shard(self, index: int, path: Path) -> None:  # noqa: B027 (an optional hook: most tasks need none)
        """Called (in the loader worker) before the rows of input shard `index` are loaded: tasks that join other
        stages' records by id (rewrite: captions, tags) load that shard's side data here."""


def _to_host(v: Any) -> Any:
    """A batch's output on the host in the dtype the model gave it: fp16 embeddings stay fp16 until the writer (a
    shard's buffer of fp32 copies would be twice the size); bfloat16, which numpy lacks, becomes float32."""
    if isinstance(v, torch.Tensor):
        v = v.detach()
        return (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy()
    return v


class BuildPredictModule(L.LightningModule):
    """predict_step = infer on the loaded rows + the bookkeeping the writer needs."""

    @abstractmethod
    def infer(self, inputs: Any) -> dict[str, Any]:
        ...

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        outputs = {} if batch["inputs"] is None else {k: _to_host(v) for k, v in self.infer(batch["inputs"]).items()}
        return {"shard": batch["shard"], "n_rows": batch["n_rows"], "rows": batch["rows"], "ids": batch["ids"],
                "skipped": batch["skipped"], "outputs": outputs}


class ShardBatches(IterableDataset):
    """The batches of whole input shards. Batch c of a shard is made of its rows c*B .. (c+1)*B-1 (B = the task's
    batch_size) that load (skipped rows leave it smaller), so what a row is batched with does not depend on how many
    DataLoader workers share the shard: worker w of W loads (decodes) batches w, w + W, ...; the writer puts the
    shard back together in row order."""

    def __init__(self, task: PredictTask, shards: list[tuple[int, Path]]):
        self.task = task
        self.shards = shards

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index, path in self.shards:
            yield from self._shard(index, path, worker, workers)

    def _shard(self, index: int, path: Path, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        n, size = num_rows(path), max(1, self.task.batch_size)
        if n == 0:
            if worker == 0:  # an empty shard still gets its (empty) output files and marker
                self.task.begin_shard(index, path)
                yield self._batch(index, 0, [], [], [], {})
            return
        mine = set(range(worker, -(-n // size), workers))
        if not mine:
            return
        self.task.begin_shard(index, path)
        rows: list[int] = []
        ids: list[str] = []
        items: list[Any] = []
        skipped: dict[int, str] = {}
        start = 0
        for rb in read_batches(path, self.task.columns, batch_size=max(size, 256)):
            end = start + rb.num_rows
            c = start // size
            while c * size < end:
                lo, hi = max(c * size, start), min((c + 1) * size, end)
                if c in mine:
                    for k, rec in enumerate(rb.slice(lo - start, hi - lo).to_pylist()):
                        try:
                            items.append(self.task.load(rec))
                        except SkipRow as why:
                            skipped[lo + k] = str(why)
                        rows.append(lo + k)
                        ids.append(rec["id"])
                    if hi == min((c + 1) * size, n):
                        yield self._batch(index, n, rows, ids, items, skipped)
                        rows, ids, items, skipped = [], [], [], {}
                c += 1
            start = end

    def _batch(self, index, n, rows, ids, items, skipped) -> dict[str, Any]:
        return {"shard": index, "n_rows": n, "rows": rows, "ids": ids, "skipped": skipped,
                "inputs": self.task.collate(items) if items else None}


# ---- what the weights are: a stage's fingerprint changes with their content, not only with their path
EDGE = 1 << 20  # bytes hashed at each end of a weight file
WEIGHT_KEYS = ("model", "adapter")  # config entries (strings) that name weights: a local path or a hub name
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def file_identity(path: Path) -> str:
    """Size, mtime and the sha256 of the first and last MiB of one file: a file overwritten in place (another
    checkpoint, a re-download) differs, and a multi-GB file costs two reads."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(EDGE))
        if st.st_size > EDGE:
            fh.seek(max(EDGE, st.st_size - EDGE))
            h.update(fh.read(EDGE))
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()[:16]}"


def folder_identity(root: Path) -> str:
    """One digest of `root`: a file, or every file of a folder (its config and tokenizer files change the output as
    its weights do), hidden ones (.git, caches) left out."""
    if root.is_file():
        return hashlib.sha256(file_identity(root).encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = Path(folder, name)
            if path.is_file():
                h.update(f"{path.relative_to(root).as_posix()}\0{file_identity(path)}\n".encode())
    return h.hexdigest()[:16]


def _hub_snapshot(repo: str) -> Optional[Path]:
    """The local snapshot folder of a hub repository, if it is in the cache (nothing is downloaded)."""
    if not HUB_NAME.match(repo):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not installed, not cached, or not a repository name: several error types
        return None


def _open_clip_cached(name: str, tag: str) -> Optional[Path]:
    """The cached file of an open_clip pretrained tag (the places models/factory.py's check looks), or None."""
    try:
        import open_clip
        import open_clip.pretrained as oc_pretrained

        cfg = open_clip.get_pretrained_cfg(name, tag)
    except Exception:  # an unknown model: the stage itself says so when it loads
        return None
    if not cfg:
        return None
    if cfg.get("file"):
        return Path(cfg["file"]) if Path(cfg["file"]).is_file() else None
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        snapshot = _hub_snapshot(repo)
        names = [*oc_pretrained._get_safe_alternatives(filename or oc_pretrained.HF_WEIGHTS_NAME),
                 filename or oc_pretrained.HF_WEIGHTS_NAME]
        found = [snapshot / n for n in names if snapshot is not None and (snapshot / n).is_file()]
        return found[0] if found else None
    cached = Path("~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", ""))
    return cached if cfg.get("url") and cached.is_file() else None


def weights_root(location: str, clip_name: Optional[str] = None) -> Optional[Path]:
    """Where the weights named by `location` are on this machine: a local file or folder, a `local-dir:` / `hf-hub:`
    name, an open_clip tag of model `clip_name`, or a hub repository in the local cache; None when not here."""
    if location.startswith("local-dir:"):
        path = Path(location[len("local-dir:"):]).expanduser()
        return path if path.exists() else None
    if location.startswith("hf-hub:"):
        return _hub_snapshot(location[len("hf-hub:"):])
    path = Path(location).expanduser()
    if path.exists():
        return path
    if clip_name is not None:
        return _open_clip_cached(clip_name, location)
    return _hub_snapshot(location)


def weight_locations(config: Any) -> list[tuple[str, Optional[str]]]:
    """(location, open_clip model name or None) of every weights entry in a stage config, in config order: an open_clip
    model config ({name, pretrained, ...}) gives its `hf-hub:`/`local-dir:` name and its pretrained path or tag;
    a `model` / `adapter` string gives itself."""
    out: list[tuple[str, Optional[str]]] = []
    if isinstance(config, dict):
        if isinstance(config.get("name"), str) and "pretrained" in config:
            name = config["name"]
            if name.startswith(("hf-hub:", "local-dir:")):
                out.append((name, None))
            if isinstance(config["pretrained"], str):
                out.append((config["pretrained"], name))
            return out
        for key, value in config.items():
            if key in WEIGHT_KEYS and isinstance(value, str) and value:
                out.append((value, None))
            else:
                out.extend(weight_locations(value))
    elif isinstance(config, (list, tuple)):
        for value in config:
            out.extend(weight_locations(value))
    return out


def weights_identity(config: dict[str, Any]) -> dict[str, Optional[str]]:
    """{location: digest, or None where the weights cannot be read on this machine} for the weights a stage config
    names."""
    out: dict[str, Optional[str]] = {}
    for location, clip_name in weight_locations(config):
        root = weights_root(location, clip_name)
        try:
            out[location] = folder_identity(root) if root is not None else None
        except OSError:  # unreadable here (permissions, a vanishing file): unknown, as weights not on this machine
            out[location] = None
    return out


@dataclass
class PredictJob:
    """A model stage as the driver sees it, no model loaded: what it reads, what its output depends on, and `make`,
    which builds the PredictTask (and its model) inside each actor."""

    name: str
    input_stage: str
    input_kind: str
    config: dict[str, Any]
    inputs: list[str]
    make: Callable[[], PredictTask]
    # the task's own precision (PredictTask.precision) where it does not run in trainer.precision
    precision: Optional[str] = None

    @classmethod
    def of(cls, task: PredictTask) -> "PredictJob":
        """A job whose actors run `task` itself (it is shipped to them, model included): for a task built around a
        model in memory rather than one named by the config."""
        return cls(task.name, task.input_stage, task.input_kind, task.stage_config(), task.stage_inputs(),
                   lambda: task, task.precision)

    def stage(self, work_dir: str | Path, trainer_precision: str) -> Stage:
        """The stage directory of this job: its config plus the precision it runs in and its weights' content
        identity. Weights not readable here (or not when the directory was begun) take the identity it recorded:
        what cannot be compared is not a change."""
        recorded = Stage(work_dir, self.name, {}).recorded().get(WEIGHTS) or {}
        weights = weights_identity(self.config)
        for location, digest in weights.items():
            if location in recorded and (digest is None or recorded[location] is None):
                weights[location] = recorded[location]
        config = {**self.config, WEIGHTS: weights, PRECISION: str(self.precision or trainer_precision)}
        return Stage(work_dir, self.name, config, self.inputs)

    def agrees(self, task: PredictTask, work_dir: str | Path) -> bool:
        """Whether `task` (built in an actor) describes the stage as this job does: config_of and stage_config, and
        the job's inputs and the task's, must match."""
        return (Stage(work_dir, self.name, task.stage_config(), task.stage_inputs()).hash
                == Stage(work_dir, self.name, self.config, self.inputs).hash)

    def input_path(self, work_dir: Path, index: int) -> Path:
        return Path(work_dir) / self.input_stage / f"{self.input_kind}-{index:05d}.parquet"
