"""Eval progress that suits where it goes: a bar on a terminal, plain lines in a log file, nothing when off.

A bar redraws itself with carriage returns, which a log file (SLURM, nohup, `> log`) keeps as one unreadable line;
so a bar is drawn only when stdout and stderr are both terminals. Otherwise a line is printed every `every_s`
seconds, as the build's progress does. clip-benchmark's metric code wraps its own loops in tqdm bars, which are
routed through here too (`clip_benchmark_loops`): with progress off they draw nothing.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterable, Iterator, Optional


def terminal() -> bool:
    """True when a bar can be redrawn in place: stdout and stderr both go to a terminal."""
    return all(bool(getattr(s, "isatty", lambda: False)()) for s in (sys.stdout, sys.stderr))


def _secs(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s / 3600:.1f} h"


def length(iterable: Any) -> Optional[int]:
    try:
        return len(iterable)
    except TypeError:  # an IterableDataset's loader, a generator
        return None


class Lines:
    """Iterates `iterable`, printing `eval: <desc>: i/total <unit>, elapsed, ETA` on stdout every `every_s` seconds."""

    def __init__(self, iterable: Iterable, desc: str, unit: str, total: Optional[int], every_s: float):
        self.iterable, self.desc, self.unit, self.total, self.every_s = iterable, desc, unit, total, every_s

    def line(self, done: int, elapsed: float) -> str:
        parts = [f"{done}/{self.total} {self.unit}" if self.total else f"{done} {self.unit}", _secs(elapsed)]
        if self.total and done < self.total:
            parts.append(f"ETA {_secs(elapsed / done * (self.total - done))}")
        return f"eval: {self.desc}: {', '.join(parts)}"

    def __iter__(self) -> Iterator:
        start = last = time.time()
        for done, item in enumerate(self.iterable, 1):
            yield item
            now = time.time()
            if now - last >= self.every_s:
                print(self.line(done, now - start), flush=True)
                last = now


class EvalProgress:
    """One run's progress mode, decided once: "off" (progress_bar=false, or a rank other than 0), "bar" (a
    terminal) or "lines" (a log file)."""

    def __init__(self, enabled: bool, every_s: float, rank: int = 0):
        self.every_s = every_s
        self.mode = "off" if not enabled or rank != 0 else ("bar" if terminal() else "lines")

    def track(self, iterable: Iterable, desc: str, unit: str = "batches", total: Optional[int] = None) -> Iterable:
        if total is None:
            total = length(iterable)
        if self.mode == "off":
            return iterable
        if self.mode == "bar":
            from tqdm import tqdm

            return tqdm(iterable, desc=desc, unit=f" {unit}", total=total, leave=False)  # tqdm glues the unit to the count
        return Lines(iterable, desc, unit, total, self.every_s)

    @contextlib.contextmanager
    def clip_benchmark_loops(self, desc: str) -> Iterator[None]:
        """clip-benchmark's zero-shot code calls `tqdm(...)` on its loops (class names, feature batches) with no way
        to turn the bars off: route those calls through `track` while its code runs."""
        from clip_benchmark.metrics import zeroshot_classification as cb

        def routed(iterable: Iterable, *args: Any, **kwargs: Any) -> Iterable:
            return self.track(iterable, desc, "class names" if isinstance(iterable, list) else "batches")

        original = cb.tqdm
        cb.tqdm = routed
        try:
            yield
        finally:
            cb.tqdm = original
