"""The build's driver side of Ray: one task per unit, handed out as workers free up, retried, collected with ray.wait.

`run_sharded(ex, stage, units, work)` is a whole per-unit stage or step: skip it when complete, claim its directory,
run its units, write its manifest. `Executor.map(stage, units, work)` runs `work(unit)` for every unit of a step that
is not done yet, one Ray task each with the step's declared resources; the task writes the unit's files and then its
`_done` marker, so a unit finished before a crash or a kill of the driver is never run again.
`Executor.call(stage, name, fn, ...)` runs one function as a task and returns its (small) result: the reductions and
fits between steps, waited on by the driver, never by a worker. Model stages run on actors (engine/actors.py).

Failures: a unit whose task raises, or whose worker, actor or node is lost, is submitted again up to
`ray.max_retries` times (each retry is printed); a StageError (a config or input that cannot work) is not retried. A
unit that still fails does not stop the others: the step finishes every unit it can, then the build stops with one
line naming the stage, the unit and the error, the traceback saved in `<stage>/_errors/`; the CLI exits 2 and a rerun
redoes only what is not done.
Threads: each task runs with its BLAS, OpenMP, torch and faiss threads set to the CPUs it was given.
Open files: each worker raises its soft limit to the hard limit before its first task (runtime.py).
With `ray.in_process=true` every unit runs in the driver process, one after another (retried alike).
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from realsyn_pl.construct.engine.config import RayConfig
from realsyn_pl.construct.engine.progress import Progress
from realsyn_pl.construct.engine.runtime import GB, Session, connect, raise_open_files_limit
from realsyn_pl.construct.engine.stage import Counts, Extra, Stage, StageError

ERRORS = "_errors"


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: Optional[float] = None

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_gb:
            out["memory"] = int(self.memory_gb * GB)
        return out

    def threads(self) -> int:
        return max(1, int(self.cpus))


@contextmanager
def thread_limits(n: int) -> Iterator[None]:
    """BLAS / OpenMP (threadpoolctl), torch and faiss threads = n while a task runs; subprocesses inherit
    OMP_NUM_THREADS."""
    from threadpoolctl import threadpool_limits

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(n)
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        if torch is not None and before is not None:
            torch.set_num_threads(before)


def run_unit(work: Callable[[int], Counts], stage: Stage, unit: int, threads: int) -> None:
    """The body of one unit's task: its files, then its `_done` marker (last, so a lost task leaves no marker)."""
    # silent: a worker of a cluster started by hand may have the low soft limit; once per worker process
    raise_open_files_limit(say=None)
    with thread_limits(threads):
        t0 = time.time()
        counts = work(unit)
        stage.mark_shard_done(unit, counts, time.time() - t0)


def run_call(fn: Callable[..., Any], args: tuple, threads: int) -> Any:
    raise_open_files_limit(say=None)  # as in run_unit
    with thread_limits(threads):
        return fn(*args)


def _task_error() -> type:
    from ray.exceptions import RayTaskError

    return RayTaskError


def cause_of(err: BaseException) -> BaseException:
    """The exception a task raised (Ray wraps it), or `err` itself (a lost worker, actor or node; in-process runs)."""
    if isinstance(err, _task_error()) and err.cause is not None:
        return err.cause
    return err


def error_line(err: BaseException) -> str:
    """One line for an error that came back from a task: the original exception's type and first line, or what Ray
    says was lost (worker, actor, node)."""
    cause = cause_of(err)
    if isinstance(cause, _task_error()):  # the original exception could not be rebuilt here
        text = str(cause).strip().splitlines()
        return text[-1] if text else type(cause).__name__
    first = (str(cause).strip().splitlines() or [""])[0]
    if isinstance(cause, StageError):
        return first
    if len(first) > 160 and ". " in first:  # Ray's lost-node errors go on for several sentences: the first says it
        first = first[:first.index(". ") + 1]
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


class Attempts:
    """Tries per unit of one step; what failed for good, and the last error of each."""

    def __init__(self, max_retries: int, label: str, stage: Stage):
        self.max_tries, self.label, self.stage = max_retries + 1, label, stage
        self.tries: dict[Any, int] = {}
        self.retried = 0
        self.failed: dict[Any, str] = {}
        self.unsaved: dict[Any, str] = {}  # units whose traceback could not be written, and why
        self.errors = stage.dir / ERRORS
        self.stale = {p.stem for p in self.errors.glob("*.txt")}  # tracebacks an earlier run left

    def failure(self, unit: Any, err: BaseException) -> bool:
        """Record a failed try of `unit`; True when it is to be tried again."""
        n = self.tries[unit] = self.tries.get(unit, 0) + 1
        line = error_line(err)
        if n < self.max_tries and not isinstance(cause_of(err), StageError):
            self.retried += 1
            print(f"[build] {self.label}: unit {unit} failed (try {n} of {self.max_tries}), retrying: {line}",
                  flush=True)
            return True
        self.failed[unit] = f"failed after {n} tries: {line}" if n > 1 else f"failed: {line}"
        try:
            self.errors.mkdir(parents=True, exist_ok=True)
            (self.errors / f"{unit}.txt").write_text(f"{self.label} unit {unit}, try {n}:\n{err}\n")
        except OSError as why:  # the disk that failed the unit may be full: the one line still comes
            self.unsaved[unit] = why.strerror or str(why)
        return False

    def succeeded(self, unit: Any) -> None:
        if str(unit) in self.stale:  # an earlier run's traceback of this unit is out of date now
            (self.errors / f"{unit}.txt").unlink(missing_ok=True)
            self.stale.discard(str(unit))
            if not any(self.errors.iterdir()):
                self.errors.rmdir()

    def check(self) -> None:
        if not self.failed:
            return
        units = sorted(self.failed, key=str)
        first = units[0]
        more = (f"; {len(units) - 1} more failed too ({', '.join(map(str, units[1:6]))}"
                f"{', ...' if len(units) > 6 else ''})" if len(units) > 1 else "")
        trace = (f"its traceback could not be saved ({self.unsaved[first]})" if first in self.unsaved
                 else f"traceback in {self.errors / f'{first}.txt'}")
        raise StageError(f"{self.label}: unit {first} {self.failed[first]}{more}; {trace}; the units that finished "
                         f"are kept, rerun the same command to redo the rest")


class Executor:
    """The build's connection to Ray and the loops that hand units out. A context manager: an embedded instance it
    started is stopped on exit."""

    def __init__(self, rc: Optional[RayConfig] = None, progress: bool = True):
        self.rc = rc or RayConfig()
        self.progress = progress
        self.session: Session = connect(self.rc)
        self.local = self.rc.in_process
        if not self.local:
            import ray

            self._unit = ray.remote(run_unit)
            self._call = ray.remote(run_call)
        self._actors: list[Any] = []  # model actors kept for the next model stage
        self._actor_res: Optional[Resources] = None
        # set by the driver before each stage: a model stage keeps its actors (their CPUs or GPUs) only for the next
        self.next_is_model_stage = False
        self._checked: set[tuple[str, Resources]] = set()

    def close(self) -> None:
        self.release_actors()
        self.session.close()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- model actors between stages
    def keep_actors(self, res: Resources, actors: list[Any]) -> None:
        self.release_actors()
        self._actors, self._actor_res = actors, res

    def take_actors(self, res: Resources, most: int) -> list[Any]:
        """Up to `most` kept actors if they have these resources; the rest are released."""
        taken = self._actors[:most] if res == self._actor_res else []
        self._actors = self._actors[len(taken):]
        self.release_actors()
        return taken

    def release_actors(self) -> None:
        """Give the kept actors' CPUs and GPUs back (a plain step needs them)."""
        self.release(self._actors)
        self._actors, self._actor_res = [], None

    @staticmethod
    def release(actors: list[Any]) -> None:
        if actors:
            import ray

            for a in actors:
                ray.kill(a)

    # ---- resources
    def resources(self, name: Optional[str] = None, gpu: bool = False, cpus: Optional[float] = None) -> Resources:
        """A task's resources for stage `name`: ray.stages[name] over `cpus` (default ray.task_cpus) and
        ray.task_memory_gb; `gpu` asks for one GPU (faiss or a model on a GPU)."""
        own = self.rc.stages.get(name) if name else None
        cpus = own.cpus if own is not None and own.cpus is not None else (cpus or self.rc.task_cpus)
        gpus = own.gpus if own is not None and own.gpus is not None else (1.0 if gpu else 0.0)
        memory = own.memory_gb if own is not None and own.memory_gb is not None else self.rc.task_memory_gb
        return Resources(cpus, gpus, memory)

    def slots(self, res: Resources) -> int:
        """How many tasks of this shape the cluster runs at once (at least 1)."""
        fits = [self.session.cpus / res.cpus] if res.cpus > 0 else []
        if res.gpus > 0:
            fits.append(self.session.gpus / res.gpus)
        return max(1, int(min(fits))) if fits else 1

    def check_fits(self, res: Resources, label: str, key: str) -> None:
        """A task shape no node can run would wait forever: on this machine's instance that is an error (one line
        naming `key`); on a cluster, which may grow, a warning."""
        if self.local or (label, res) in self._checked:
            return
        self._checked.add((label, res))
        import ray

        alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        cpus = max((n.get("CPU", 0.0) for n in alive), default=0.0)
        gpus = max((n.get("GPU", 0.0) for n in alive), default=0.0)
        if res.cpus <= cpus and res.gpus <= gpus:
            return
        what = (f"{label}: a task asks for {res.cpus:g} CPUs and {res.gpus:g} GPUs, but the largest node of the Ray "
                f"instance has {cpus:g} CPUs and {gpus:g} GPUs ({key})")
        if self.session.embedded:
            raise StageError(what)
        print(f"[build] warning: {what}; its tasks wait until the cluster has such a node", flush=True)

    # ---- plain tasks
    def map(self, stage: Stage, units: Sequence[int], work: Callable[[int], Counts],
            resources: Optional[Resources] = None) -> None:
        """Run `work(u)` as one task per unit of `units` not done yet; returns when every unit is done, or raises
        StageError (one line) once the others have finished when some unit failed for good."""
        import ray

        todo = [u for u in units if not stage.shard_done(u)]
        if not todo:
            return
        self.release_actors()
        res = resources or self.resources(stage.root)
        already = len(units) - len(todo)  # a resumed step: said once, the bar counts the rest
        if self.local:
            return self.serially(stage, todo, lambda u: run_unit(work, stage, u, res.threads()), already=already)
        self.check_fits(res, stage.label, f"ray.task_cpus or ray.stages.{stage.root}")
        work_ref = ray.put(work)
        window = 4 * self.slots(res) + 8  # submitted ahead of the free workers; the rest wait in the driver
        opts = {**res.options(), "max_retries": 0}
        pending, inflight = deque(todo), {}
        att = Attempts(self.rc.max_retries, stage.label, stage)
        bar = Progress(stage.label, len(todo), self.rc.progress_s, self.progress, already=already)
        done = 0
        while pending or inflight:
            while pending and len(inflight) < window:
                u = pending.popleft()
                inflight[self._unit.options(**opts).remote(work_ref, stage, u, res.threads())] = u
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                u = inflight.pop(ref)
                try:
                    ray.get(ref)
                    done += 1
                    att.succeeded(u)
                except ray.exceptions.RayError as err:
                    if att.failure(u, err):
                        pending.append(u)
            bar.update(done, len(inflight), att.retried, len(att.failed))
        bar.close()
        att.check()

    def call(self, stage: Stage, name: str, fn: Callable[..., Any], *args: Any,
             resources: Optional[Resources] = None) -> Any:
        """`fn(*args)` as one task (retried like a unit; `name` names it in messages and in `<stage>/_errors/`);
        its result, which should be small."""
        import ray

        self.release_actors()
        res = resources or self.resources(stage.root)
        if self.local:
            try:
                return run_call(fn, args, res.threads())
            except StageError:
                raise
            except Exception as err:
                raise StageError(f"{stage.label} {name} failed: {error_line(err)}") from err
        self.check_fits(res, f"{stage.label} {name}", f"ray.task_cpus or ray.stages.{stage.root}")
        att = Attempts(self.rc.max_retries, f"{stage.label} {name}", stage)
        while True:
            ref = self._call.options(**res.options(), max_retries=0).remote(fn, args, res.threads())
            try:
                out = ray.get(ref)
                att.succeeded(name)
                return out
            except ray.exceptions.RayError as err:
                if not att.failure(name, err):
                    if isinstance(cause_of(err), StageError):  # its own message is the build's last line
                        raise StageError(str(cause_of(err)).strip().splitlines()[0]) from None
                    att.check()

    def serially(self, stage: Stage, units: Sequence[Any], run_one: Callable[[Any], Any],
                 label: Optional[str] = None, already: int = 0) -> None:
        """The local loop: each unit in this process, retried like a task (`already`: as Progress takes it)."""
        att = Attempts(self.rc.max_retries, label or stage.label, stage)
        bar = Progress(label or stage.label, len(units), self.rc.progress_s, self.progress, already=already)
        pending, done = deque(units), 0
        while pending:
            u = pending.popleft()
            try:
                run_one(u)
            except Exception as err:
                if att.failure(u, err):
                    pending.append(u)
            else:
                done += 1
                att.succeeded(u)
            bar.update(done, 0, att.retried, len(att.failed))
        bar.close()
        att.check()


def run_sharded(ex: Executor, stage: Stage, indices: Sequence[int], work: Callable[[int], Counts],
                force: bool | str = False, extra: Extra = None, resources: Optional[Resources] = None) -> bool:
    """The whole of a per-unit stage or step: skip it when complete, claim its directory, run `work(i)` (which writes
    output unit i and returns its Counts) for every unit not done yet as Ray tasks, then write the manifest. `extra`
    (a dict, or a function of the stage) adds summaries; a function runs as a task, since it may read every unit."""
    started = time.time()
    if stage.skip_complete(force):
        return True
    stage.begin(force)
    ex.map(stage, list(indices), work, resources)
    return write_manifest(ex, stage, indices, started, extra)


def write_manifest(ex: Executor, stage: Stage, indices: Sequence[int], started: float, extra: Extra = None) -> bool:
    """The manifest of a stage whose units are all done; `extra` as in run_sharded."""
    if callable(extra) and not stage.is_complete():
        extra = ex.call(stage, "summary", extra, stage)
    return stage.finalize(list(indices), started, extra)
