"""Stage directories, manifests and resume: the contract every build stage follows, whoever runs its units.

Layout of one stage (`<work_dir>/<stage>/`):
    _config.json             the stage's config + its inputs' fingerprints; a rerun with another config is refused
    {kind}-{i:05d}.parquet   record shards (records.py), {kind}-{i:05d}.npy + .ids.parquet array shards (arrays.py)
    _done/{i:05d}.json       shard i is complete: its Counts, seconds, the worker's peak memory and the unit's own
                             anonymous / file-backed peaks and I/O (memory.py); written after every file of shard i
    manifest.json            written once every shard is done: config, counts in/out/dropped-by-reason/produced,
                             per-shard counts, timings, package versions, "done": true
Rules
- Output shard i is made from input shard i only (per-shard stages), so shards are independent units of work,
  of resume and of distribution. Global stages (dedup, cluster, retrieve, balance) are a sequence of steps, each a
  sub-stage (`Stage.sub`, a directory inside the stage's) with its own units, markers and manifest.
- Every file is written to a temp name and renamed (records.py/arrays.py); the `_done` marker goes last. A killed
  stage rerun skips done shards and redoes the rest from scratch, so its output equals an uninterrupted run. The temp
  files a killed run left (and the directory a killed wipe moved aside) are removed when the stage begins, before any
  unit is handed out, and when it completes: never while a unit of it may be writing.
- A stage whose manifest says done (same config) is skipped.
- Model stages (predict.py) add to their config the content identity of their weights (`weights`) and the precision
  they run in (`predict_precision`): new weights at the same path, or another precision, refuse the old directory
  in one line saying which, as any other config change does.
- Fingerprint chain: a stage's hash covers its own config and the fingerprint (config hash) its direct inputs had
  when it was built; an input's own hash covers its inputs' the same way, so a change anywhere upstream reaches a
  stage through the manifests of the stages between, once those are rebuilt. Until then the check walks the chain:
  a stage whose input's fingerprint moved, or whose input is itself stale that way (recursively, reading only
  `_config.json` and manifests), is stale: not complete, and refused with a line naming the input and the chain.
  `force` wipes a directory (it leaves `_replaced.json` until the new manifest is written).
- Units run as Ray tasks or actor calls handed out by the driver (executor.py, actors.py); the unit's task writes its
  files and marker, the driver writes the manifest once every unit is done. Nothing here knows how many workers
  there are.
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
from typing import Any, Iterable, Optional, Sequence

from realsyn_pl.construct.engine.memory import METER
from realsyn_pl.construct.engine.records import atomic_write, remove_temps

MANIFEST = "manifest.json"
CONFIG = "_config.json"
REPLACED = "_replaced.json"  # this directory was wiped for a rebuild (force); removed with the new manifest
SPILL = "_spill"  # model stages: per-shard memory-mapped array outputs while a shard is being predicted
# keys a model stage's config gets from predict.PredictJob: its weights' content identity, its Trainer's precision
WEIGHTS, PRECISION = "weights", "predict_precision"
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


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (its own address space; ru_maxrss would also count the memory of
    the process it was forked from), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _io_total(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The units' /proc/self/io deltas summed (units that recorded none count nothing)."""
    total: dict[str, int] = {}
    for r in records:
        for k, v in r.get("unit_io_bytes", {}).items():
            total[k] = total.get(k, 0) + v
    return total


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


def config_hash(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):  # being replaced, or not ours
        return None


def fingerprint(stage_dir: str | Path) -> Optional[str]:
    """A stage directory's current fingerprint: the config hash of its done manifest, else of its `_config.json`
    (a build under way), else None (not built)."""
    d = Path(stage_dir)
    m = _read_json(d / MANIFEST)
    if m and m.get("done") and m.get("config_hash"):
        return m["config_hash"]
    return (_read_json(d / CONFIG) or {}).get("config_hash")


def changed_inputs(stage_dir: str | Path, work_dir: str | Path) -> Optional[dict[str, tuple[Optional[str],
                                                                                         Optional[str]]]]:
    """{input: (recorded, current fingerprint)} for the inputs of the build in `stage_dir` whose fingerprint moved
    since it began; every input when its build recorded none (older realsyn_pl). None when nothing is recorded."""
    cfg = (_read_json(Path(stage_dir) / CONFIG) or {}).get("config")
    if not isinstance(cfg, dict):
        return None
    recorded = cfg.get("input_fingerprints") or {}
    out = {}
    for name in cfg.get("inputs") or []:
        now = fingerprint(Path(work_dir) / name)
        if name not in recorded or recorded[name] != now:
            out[name] = (recorded.get(name), now)
    return out


Chain = tuple[list[str], dict[str, tuple[Optional[str], Optional[str]]]]


def stale_chain(stage_dir: str | Path, work_dir: str | Path, memo: Optional[dict[str, Optional[Chain]]] = None
                ) -> Optional[Chain]:
    """Why the build in `stage_dir` is stale, or None: (via, moved), `moved` as changed_inputs gives it for the last
    stage of `via` (the chain of stale inputs it reads, first input first), or for this build itself when `via` is
    empty. Direct changes win; then inputs are walked in order. `memo` (per call) reads each directory once."""
    memo = {} if memo is None else memo
    key = str(Path(stage_dir))
    if key in memo:
        return memo[key]
    memo[key] = None  # guards against a cycle of hand-edited configs
    moved = changed_inputs(stage_dir, work_dir)
    found: Optional[Chain] = ([], moved) if moved else None
    if found is None:
        cfg = (_read_json(Path(stage_dir) / CONFIG) or {}).get("config")
        found = stale_input(cfg.get("inputs") or [] if isinstance(cfg, dict) else [], work_dir, memo)
    memo[key] = found
    return found


def stale_input(inputs: Iterable[str], work_dir: str | Path, memo: dict[str, Optional[Chain]]) -> Optional[Chain]:
    """(via, moved) for the first of `inputs` that is stale itself (stale_chain), `via` starting at that input."""
    for name in inputs:
        if (up := stale_chain(Path(work_dir) / name, work_dir, memo)) is not None:
            return [name, *up[0]], up[1]
    return None


def is_stale(stage_dir: str | Path, work_dir: str | Path) -> bool:
    """True when the build in `stage_dir` was made from inputs that changed since, directly or anywhere upstream
    (see stale_chain), or is being replaced now."""
    return (Path(stage_dir) / REPLACED).is_file() or stale_chain(stage_dir, work_dir) is not None


def _moved(changes: dict[str, tuple[Optional[str], Optional[str]]]) -> tuple[list[str], dict[str, str], str]:
    """The changed inputs, how each changed, and that said in a few words ("'a' and 'b' were rebuilt")."""
    names = list(changes)
    state = {n: "removed" if now is None else "built" if was is None else "rebuilt" for n, (was, now) in
             changes.items()}
    if len(set(state.values())) == 1:
        said = f"{' and '.join(repr(n) for n in names)} {'was' if len(names) == 1 else 'were'} {state[names[0]]}"
    else:
        said = ", ".join(f"{n!r} {state[n]}" for n in names)
    return names, state, said


FORCE_TRUE, FORCE_FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def parse_force(value: Any) -> bool | str:
    """`force` as given (bool, or a string from YAML / the command line): True, False or a stage name."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    s = str(value).strip()
    if s.lower() in FORCE_TRUE:
        return True
    if s.lower() in FORCE_FALSE:
        return False
    return s


class Stage:
    """One stage's directory under the build's work_dir."""

    def __init__(self, work_dir: str | Path, name: str, config: dict[str, Any], inputs: Sequence[str] = (),
                 label: Optional[str] = None, root: Optional[str] = None):
        """`inputs`: every stage directory under work_dir this stage reads; their current fingerprints (read now)
        are part of the hash, so a stage built from an input that was rebuilt since is not complete. `label` names
        it in progress and error lines, `root` is the stage whose resources its units get (both default to name)."""
        self.name = name
        self.label = label or name
        self.root = root or name
        self.work_dir = Path(work_dir)
        self.dir = self.work_dir / name
        self.config = {"stage": name, "inputs": list(inputs), **config}
        if inputs:
            self.config["input_fingerprints"] = {n: fingerprint(Path(work_dir) / n) for n in inputs}
        self.hash = config_hash(self.config)

    def sub(self, name: str, config: dict[str, Any], inputs: Sequence[str] = (), folder: str = "") -> "Stage":
        """A step of this stage: a stage directory inside this one (or inside its `folder`), named
        `<label>/<folder>/<name>` in messages."""
        where = self.dir / folder if folder else self.dir
        return Stage(where, name, config, inputs, label="/".join(p for p in (self.label, folder, name) if p),
                     root=self.root)

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
        return bool(m and m.get("done") and m.get("config_hash") == self.hash) and self.stale_input() is None

    def stale_input(self) -> Optional[Chain]:
        """(via, moved) for the first input that is stale itself (stale_chain), `via` starting at that input; its
        `_replaced.json` is not looked at: an input is complete before anyone reads it."""
        return stale_input(self.config["inputs"], self.work_dir, {})

    def check_inputs(self) -> None:
        """Refuse, in one line naming the chain, to reuse or build this stage from an input that is stale itself:
        neither its old files nor new ones made from that input match a build with the current config."""
        if (stale := self.stale_input()) is None:
            return
        via, moved = stale
        names, _, said = _moved(moved)
        raise StageError(f"stage {self.name!r} in {self.dir} reads a stale input: {said} since {via[-1]!r} was built "
                         f"from {'it' if len(names) == 1 else 'them'} (via {' <- '.join(via)}); rerun with "
                         f"force={names[0]} to rebuild it and every stage after it")

    def recorded(self) -> dict[str, Any]:
        """The config the build in this directory began with ({} when none began)."""
        cfg = (_read_json(self.dir / CONFIG) or {}).get("config")
        return cfg if isinstance(cfg, dict) else {}

    def shard_done(self, index: int) -> bool:
        return self.marker(index).is_file()

    def shard_counts(self, index: int) -> Counts:
        return Counts.from_dict(json.loads(self.marker(index).read_text())["counts"])

    def begin(self, force: bool | str = False) -> None:
        """Claim the directory for this config. A directory built with another config or from other inputs is
        refused (one line saying which); `force` wipes it first."""
        cfg_file = self.dir / CONFIG
        self.check_inputs()  # before a wipe: a refused stage keeps its files
        if self._force(force):
            self._wipe()
        old = _read_json(cfg_file)
        if old is not None:
            if old.get("config_hash") != self.hash:
                raise StageError(self._refusal(old.get("config")))
        else:
            write_json(cfg_file, {"config_hash": self.hash, "config": self.config})
        self._remove_debris()

    def _remove_debris(self) -> None:
        """What killed runs left: temp files of writes that never finished (no unit of this stage runs now: the driver
        calls this before it hands any out, or once all are done) and directories a killed wipe moved aside."""
        remove_temps(self.dir)
        shutil.rmtree(self.dir / SPILL, ignore_errors=True)
        for aside in self.dir.parent.glob(f".{self.dir.name}.replaced-*"):
            shutil.rmtree(aside, ignore_errors=True)

    def _force(self, force: bool | str) -> bool:
        f = parse_force(force)
        return f if isinstance(f, bool) else f == self.name

    def _wipe(self) -> None:
        """Move the old directory aside in one step (no reader sees it half deleted), mark the fresh one."""
        replaced = fingerprint(self.dir)
        aside = self.dir.with_name(f".{self.dir.name}.replaced-{os.getpid()}")
        if aside.exists():
            shutil.rmtree(aside)
        if self.dir.exists():
            os.replace(self.dir, aside)
        write_json(self.dir / REPLACED, {"replaced": replaced})
        if aside.exists():
            shutil.rmtree(aside)

    def _refusal(self, old: Any) -> str:
        """The one line that says why the directory cannot be reused: its own config, or which inputs changed."""
        where = f"stage {self.name!r} in {self.dir}"
        generic = f"{where} was built with another config; delete it or rerun with force=true"
        if not isinstance(old, dict):
            return generic
        new = json.loads(json.dumps(self.config, sort_keys=True, default=str))
        own = lambda c: {k: v for k, v in c.items() if k != "input_fingerprints"}  # noqa: E731
        if own(old) != own(new):
            return self._model_refusal(old, new) or generic
        was, now = old.get("input_fingerprints"), new.get("input_fingerprints") or {}
        if was is None:
            return (f"{where} was built by an older realsyn_pl that did not record its inputs' fingerprints; "
                    f"rerun with force={self.name} to rebuild it and every stage after it")
        changed, state, _ = _moved({n: (was.get(n), now.get(n)) for n in new["inputs"] if was.get(n) != now.get(n)})
        if not changed:
            return generic
        if len(changed) == 1:
            note = f"it was {state[changed[0]]} since"
        elif len(set(state.values())) == 1:
            note = f"they were {state[changed[0]]} since"
        else:
            note = ", ".join(f"{n!r} {state[n]}" for n in changed) + " since"
        names = " and ".join(repr(n) for n in changed)
        return (f"{where} was built from another {names} ({note}); rerun with force={changed[0]} to rebuild it and "
                f"every stage after it, or force={self.name}")

    def _model_refusal(self, old: dict[str, Any], new: dict[str, Any]) -> Optional[str]:
        """The line for a model stage whose only change is its weights' content or its precision; None otherwise."""
        changed = {k for k in {*old, *new} if k != "input_fingerprints" and old.get(k) != new.get(k)}
        if not changed or not changed <= {WEIGHTS, PRECISION}:
            return None
        where = f"stage {self.name!r} in {self.dir}"
        again = f"rerun with force={self.name} to rebuild it and every stage after it"
        if any(k not in old for k in changed):
            return (f"{where} was built by an older realsyn_pl that did not record its model weights' identity and "
                    f"precision; {again}")
        said = []
        if WEIGHTS in changed:
            was, now = old[WEIGHTS] or {}, new[WEIGHTS] or {}
            moved = [loc for loc in now if loc in was and was[loc] != now[loc]] or sorted({*was, *now})
            said.append(f"the model weights at {' and '.join(moved)} changed since it was built")
        if PRECISION in changed:
            said.append(f"it ran in precision {old[PRECISION]!r} and would now run in {new[PRECISION]!r}")
        return f"{where}: {'; '.join(said)}; {again}"

    def pending(self, indices: Iterable[int]) -> list[int]:
        """The shards that are not done yet."""
        return [i for i in indices if not self.shard_done(i)]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a Ray task or actor call receives its Stage when it starts: the unit's memory window opens here
        self.__dict__.update(state)
        METER.start()

    def mark_shard_done(self, index: int, counts: Counts, seconds: float) -> None:
        """Unit `index` is complete: its counts, seconds, and the peak memory of the process that ran it (its whole
        life's high-water mark: an upper bound on the unit's own, what a worker of this stage needs); where the unit's
        window was measured (memory.py), its own anonymous and file-backed peaks and the bytes it read and wrote."""
        if not counts.balanced():
            raise StageError(f"stage {self.name} shard {index}: counts do not balance: {counts.to_dict()}")
        write_json(self.marker(index), {"counts": counts.to_dict(), "seconds": round(seconds, 3),
                                        "worker_peak_rss_mb": round(peak_rss_mb(), 1), **(METER.lap() or {})})

    def finalize(self, indices: Sequence[int], started: float, extra: Optional[dict[str, Any]] = None) -> bool:
        """Write the manifest if every shard is done; True when the stage is complete. `extra` adds stage-specific
        summaries (run_sharded computes them in a task)."""
        if self.is_complete():
            return True
        if not all(self.shard_done(i) for i in indices):
            return False
        remove_temps(self.dir)  # every unit is done: what is left of a retried one's killed try goes
        shutil.rmtree(self.dir / SPILL, ignore_errors=True)
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
                        "this_run_seconds": round(time.time() - started, 3),
                        **{key: max((r.get(key, 0.0) for r in shards.values()), default=0.0)
                           for key in ("worker_peak_rss_mb", "worker_peak_anon_mb", "worker_peak_file_mb")},
                        "unit_io_bytes": _io_total(shards.values())},
            "versions": versions(), **(extra or {}),
        }
        write_json(self.dir / MANIFEST, manifest)
        (self.dir / REPLACED).unlink(missing_ok=True)  # the rebuild is done
        print(f"[build] {self.label}: {count_line(total)}", flush=True)
        return True

    def skip_complete(self, force: bool | str) -> bool:
        """True (and says so) when this stage already completed with the same config and inputs and force is off.
        A stale input is refused here, before any wipe."""
        self.check_inputs()
        if self._force(force):
            return False
        if not self.is_complete():
            return False
        print(f"[build] {self.name}: complete, skipped", flush=True)
        return True


def count_line(c: Counts) -> str:
    """What a stage or step did, in a few words. A step that filters records says in / kept / dropped; one that only
    makes things (keys, word counts, candidates: in and kept stay 0) says what it made instead of "in 0, kept 0"."""
    made = ", ".join(f"{k} {v}" for k, v in sorted(c.produced.items()))
    if not c.n_in and made:
        return f"made {made}"
    drops = ", ".join(f"{k} {v}" for k, v in sorted(c.dropped.items())) or "none"
    return f"in {c.n_in}, kept {c.n_out}, dropped {sum(c.dropped.values())} ({drops})" + (f", made {made}" if made else "")


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


def input_indices(stage_dir: Path, kind: str) -> list[int]:
    """Shard indices of a completed input stage (from its manifest; the files are checked to exist)."""
    m_path = stage_dir / MANIFEST
    if not m_path.is_file() or not json.loads(m_path.read_text()).get("done"):
        raise StageError(f"input stage {stage_dir.name!r} is not complete (no done manifest in {stage_dir}); run it first")
    m = json.loads(m_path.read_text())
    return [int(k) for k in sorted(m["shards"])]
