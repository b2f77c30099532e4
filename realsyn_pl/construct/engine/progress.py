"""One progress line per stage step: units done of total, running, retried, failed, elapsed, ETA.

On a terminal the line is rewritten in place; when stdout is a file (SLURM, nohup, CI) a full line is printed every
`every_s` seconds and once at the end, so a log shows how far a long step got and how fast it moves. A step resumed
after a kill first says how many of its units an earlier run finished, then counts the rest.
Other libraries' bars (img2dataset's tqdm, model downloads from the hub, transformers loading checkpoint shards) redraw
with a carriage return, which a log file keeps at every redraw: `third_party_bars` turns them off unless `build` runs
on a terminal with progress on, the same rule as `fit`'s progress bar.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from functools import partialmethod
from typing import Iterator, TextIO

# Environment variables that switch the other libraries' bars off: tqdm (>= 4.66) reads TQDM_* as its defaults, the
# hub and transformers read the second. Workers of an embedded Ray instance inherit them; runtime.py hands them to a
# cluster the build joins.
QUIET_BARS = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def stdout_is_terminal() -> bool:
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


@contextmanager
def _tqdm_off_here() -> Iterator[None]:
    """tqdm reads TQDM_DISABLE when it is imported, and in this process it may be already (Lightning imports it): its
    default `disable` is switched on for the block instead (a caller's explicit disable= still wins), so bars drawn in
    this process (ray.in_process=true runs every unit here) are off too."""
    std = sys.modules.get("tqdm.std")
    own = getattr(std, "tqdm", None)
    if own is None or "__init__" not in vars(own):
        yield
        return
    before = vars(own)["__init__"]
    own.__init__ = partialmethod(own.__init__, disable=True)
    try:
        yield
    finally:
        own.__init__ = before


@contextmanager
def third_party_bars(shown: bool) -> Iterator[None]:
    """Unless `shown`, QUIET_BARS are set in this process's environment for the block (before Ray starts, so its
    workers and their subprocesses get them) and tqdm's bars are off in this process; both restored after it."""
    if shown:
        yield
        return
    before = {k: os.environ.get(k) for k in QUIET_BARS}
    os.environ.update(QUIET_BARS)
    try:
        with _tqdm_off_here():
            yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _secs(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s / 3600:.1f} h"


class Progress:
    def __init__(self, label: str, total: int, every_s: float = 30.0, enabled: bool = True,
                 stream: TextIO | None = None, already: int = 0):
        """`total`: the units this run does; `already`: the step's units an earlier run finished (said once here)."""
        self.label, self.total, self.every_s, self.enabled = label, total, every_s, enabled
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.time()
        self.done = self.running = self.retried = self.failed = 0
        if enabled and already:
            print(f"[build] {label}: {already} of {already + total} units already done (kept from an earlier run); "
                  f"running the other {total}", file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.time() - self.start
        parts = [f"{self.done}/{self.total} units"]
        if self.running:
            parts.append(f"{self.running} running")
        if self.retried:
            parts.append(f"{self.retried} retried")
        if self.failed:
            parts.append(f"{self.failed} failed")
        parts.append(_secs(elapsed))
        left = self.total - self.done - self.failed
        if self.done and left > 0:
            parts.append(f"ETA {_secs(elapsed / self.done * left)}")
        return f"[build] {self.label}: {', '.join(parts)}"

    def update(self, done: int, running: int, retried: int, failed: int) -> None:
        self.done, self.running, self.retried, self.failed = done, running, retried, failed
        if not self.enabled:
            return
        now = time.time()
        if self.tty:
            self.stream.write("\r" + self.line().ljust(100))
            self.stream.flush()
        elif now - self.last >= self.every_s:
            print(self.line(), file=self.stream, flush=True)
            self.last = now

    def close(self) -> None:
        if not self.enabled:
            return
        self.running = 0
        print(("\r" if self.tty else "") + self.line().ljust(100 if self.tty else 0), file=self.stream, flush=True)
