"""One progress line per stage step: units done of total, running, retried, failed, elapsed, ETA.

On a terminal the line is rewritten in place; when stdout is a file (SLURM, nohup, CI) a full line is printed every
`every_s` seconds and once at the end, so a log shows how far a long step got and how fast it moves.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _secs(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s / 3600:.1f} h"


class Progress:
    def __init__(self, label: str, total: int, every_s: float = 30.0, enabled: bool = True,
                 stream: TextIO | None = None):
        self.label, self.total, self.every_s, self.enabled = label, total, every_s, enabled
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.time()
        self.done = self.running = self.retried = self.failed = 0

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
