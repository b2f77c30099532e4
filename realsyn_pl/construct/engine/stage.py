"""Stage directories, manifests, resume and RANK/WORLD_SIZE sharding: the contract every build stage follows.

Layout of one stage (`<work_dir>/<stage>/`):
    _config.json             the stage's config (+ its inputs); a rerun with another config is refused
    {kind}-{i:05d}.parquet   record shards (records.py), {kind}-{i:05d}.npy + .ids.parquet array shards (arrays.py)
    _done/{i:05d}.json       shard i is complete: its Counts and seconds; written after every file of shard i
    manifest.json            written once every shard is done: config, counts in/out/dropped-by-reason/produced,
                             per-shard counts, timings, package versions, "done": true
Rules
- Output shard i is made from input shard i only (per-shard stages), so shards are independent units of work,
  of resume and of distribution. Global stages (dedup) keep their own resumable steps but write the same files.
- Every file is written to a temp name and renamed (records.py/arrays.py); the `_done` marker goes last. A killed
  stage rerun skips done shards and redoes the rest from scratch, so its output equals an uninterrupted run.
- A stage whose manifest says done (same config) is skipped.
- Rank r of WORLD_SIZE w (torchrun RANK/WORLD_SIZE, else SLURM_PROCID/SLURM_NTASKS, else 0/1) takes the shards with
  i % w == r. The rank that finds every shard done writes the manifest (identical content from any rank).
- Counts must balance: n_in == n_out + sum(dropped). `mark_shard_done` refuses a shard that does not.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from realsyn_pl.construct.engine.records import tmp_name

MANIFEST = "manifest.json"
PACKAGES = ("realsyn_pl", "torch", "lightning", "open_clip_torch", "transformers", "faiss-cpu", "pyarrow", "pysbd",
            "numpy", "pillow")


Extra = Optional[Any]  # dict, or Callable[[Stage], dict]


class StageError(RuntimeError):
    """A stage cannot run (missing input, config changed, ...); the message is one line for the user."""


@dataclass
class Counts:
    n_in: int = 0
    n_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # Things a stage makes besides its kept inputs (extract: images and sentences from documents).
    produced: dict[str, int] = field(default_factory=dict)

    def keep(self, n: int = 1) -> None:
        self.n_in += n
        self.n_out += n

    def drop(self, reason: str, n: int = 1) -> None:
        self.n_in += n
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def produce(self, kind: str, n: int = 1) -> None:
        self.produced[kind] = self.produced.get(kind, 0) + n

    def add(self, other: "Counts") -> None:
        self.n_in += other.n_in
        self.n_out += other.n_out
        for k, v in other.dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + v
        for k, v in other.produced.items():
            self.produced[k] = self.produced.get(k, 0) + v

    def balanced(self) -> bool:
        return self.n_in == self.n_out + sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dropped"] = dict(sorted(d["dropped"].items()))
        d["produced"] = dict(sorted(d["produced"].items()))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Counts":
        return cls(int(d["n_in"]), int(d["n_out"]), dict(d.get("dropped", {})), dict(d.get("produced", {})))


def rank_world() -> tuple[int, int]:
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            return int(os.environ[r]), int(os.environ[w])
    return 0, 1


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def config_hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    """One stage's directory under the build's work_dir."""

    def __init__(self, work_dir: str | Path, name: str, config: dict[str, Any], inputs: Sequence[str] = ()):
        self.name = name
        self.dir = Path(work_dir) / name
        self.config = {"stage": name, "inputs": list(inputs), **config}
        self.hash = config_hash(self.config)

    # ---- paths
    def path(self, kind: str, index: int, ext: str = "parquet") -> Path:
        return self.dir / f"{kind}-{index:05d}.{ext}"

    def marker(self, index: int) -> Path:
        return self.dir / "_done" / f"{index:05d}.json"

    # ---- state
    def manifest(self) -> Optional[dict[str, Any]]:
        p = self.dir / MANIFEST
        return json.loads(p.read_text()) if p.is_file() else None

    def is_complete(self) -> bool:
        m = self.manifest()
        return bool(m and m.get("done") and m.get("config_hash") == self.hash)

    def shard_done(self, index: int) -> bool:
        return self.marker(index).is_file()

    def shard_counts(self, index: int) -> Counts:
        return Counts.from_dict(json.loads(self.marker(index).read_text())["counts"])

    def begin(self, force: bool = False) -> None:
        """Claim the directory for this config. A directory built with another config is refused; `force` wipes
        it first (run force only from one process: the other ranks may already be writing)."""
        cfg_file = self.dir / "_config.json"
        if force and self.dir.exists():
            shutil.rmtree(self.dir)
        if cfg_file.is_file():
            old = json.loads(cfg_file.read_text())
            if old.get("config_hash") != self.hash:
                raise StageError(f"stage {self.name!r} in {self.dir} was built with another config; "
                                 "delete it or rerun with force=true")
        else:
            write_json(cfg_file, {"config_hash": self.hash, "config": self.config})

    def pending(self, indices: Iterable[int], rank: Optional[int] = None, world: Optional[int] = None) -> list[int]:
        """This rank's shards that are not done yet (rank/world from the environment unless given)."""
        if rank is None or world is None:
            rank, world = rank_world()
        return [i for i in indices if i % world == rank and not self.shard_done(i)]

    def mark_shard_done(self, index: int, counts: Counts, seconds: float) -> None:
        if not counts.balanced():
            raise StageError(f"stage {self.name} shard {index}: counts do not balance: {counts.to_dict()}")
        write_json(self.marker(index), {"counts": counts.to_dict(), "seconds": round(seconds, 3)})

    def finalize(self, indices: Sequence[int], started: float, extra: Extra = None) -> bool:
        """Write the manifest if every shard is done; True when the stage is complete. `extra` (a dict, or a
        function of the stage called once every shard is done) adds stage-specific summaries."""
        if self.is_complete():
            return True
        if not all(self.shard_done(i) for i in indices):
            return False
        total, shards, seconds = Counts(), {}, 0.0
        for i in indices:
            rec = json.loads(self.marker(i).read_text())
            total.add(Counts.from_dict(rec["counts"]))
            shards[f"{i:05d}"] = rec
            seconds += rec["seconds"]
        manifest = {
            "stage": self.name, "done": True, "config_hash": self.hash, "config": self.config,
            "counts": total.to_dict(), "num_shards": len(indices), "shards": shards,
            "timings": {"shard_seconds_total": round(seconds, 3), "finished_unix": round(time.time(), 3),
                        "this_run_seconds": round(time.time() - started, 3)},
            "versions": versions(), **((extra(self) if callable(extra) else extra) or {}),
        }
        write_json(self.dir / MANIFEST, manifest)
        c = total
        drops = ", ".join(f"{k} {v}" for k, v in sorted(c.dropped.items())) or "none"
        made = "".join(f", made {k} {v}" for k, v in sorted(c.produced.items()))
        print(f"[build] {self.name}: in {c.n_in}, kept {c.n_out}, dropped {sum(c.dropped.values())} ({drops}){made}",
              flush=True)
        return True

    def wait_complete_any(self, timeout_s: float = 86400.0, poll_s: float = 2.0) -> None:
        """Wait for a done manifest whatever its config (used by ranks that only know the stage's name)."""
        deadline = time.time() + timeout_s
        while not (self.manifest() or {}).get("done"):
            if time.time() > deadline:
                raise StageError(f"timed out waiting for stage {self.name!r} to complete")
            time.sleep(poll_s)

    def skip_complete(self, force: bool) -> bool:
        """True (and says so) when this stage already completed with the same config and inputs and force is off."""
        if force or not self.is_complete():
            return False
        print(f"[build] {self.name}: complete, skipped", flush=True)
        return True

    def wait_complete(self, timeout_s: float = 86400.0, poll_s: float = 2.0) -> None:
        """For ranks that do not take part in a global stage: wait until the stage's manifest says done."""
        deadline = time.time() + timeout_s
        while not self.is_complete():
            if time.time() > deadline:
                raise StageError(f"timed out waiting for stage {self.name!r} to complete")
            time.sleep(poll_s)


def expand_paths(patterns: Sequence[str], key: str) -> list[Path]:
    """The sorted, de-duplicated files matching the glob patterns of config key `key`; a pattern matching nothing is
    an error (a typo would otherwise build an empty dataset)."""
    import glob

    files: set[str] = set()
    for pat in patterns:
        hits = glob.glob(pat)
        if not hits:
            raise StageError(f"{key}: nothing matches {pat!r}")
        files.update(hits)
    return [Path(f) for f in sorted(files)]


def run_sharded(stage: Stage, indices: Sequence[int], work: Callable[[int], Counts], progress: bool = True,
                force: bool = False, extra: Extra = None) -> bool:
    """Run `work(i)` (which writes output shard i and returns its Counts) for this rank's pending shards, mark each
    done, then write the manifest if this was the last rank to finish. Returns True when the stage is complete."""
    started = time.time()
    if stage.skip_complete(force):
        return True
    stage.begin(force)
    todo = stage.pending(indices)
    from tqdm.auto import tqdm

    for i in tqdm(todo, desc=stage.name, unit="shard", disable=not progress or not todo):
        t0 = time.time()
        counts = work(i)
        stage.mark_shard_done(i, counts, time.time() - t0)
    return stage.finalize(list(indices), started, extra)


def input_indices(stage_dir: Path, kind: str) -> list[int]:
    """Shard indices of a completed input stage (from its manifest; the files are checked to exist)."""
    m_path = stage_dir / MANIFEST
    if not m_path.is_file() or not json.loads(m_path.read_text()).get("done"):
        raise StageError(f"input stage {stage_dir.name!r} is not complete (no done manifest in {stage_dir}); run it first")
    m = json.loads(m_path.read_text())
    return [int(k) for k in sorted(m["shards"])]
