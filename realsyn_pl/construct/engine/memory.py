"""What one unit of work cost the process that ran it, for the unit's `_done` marker: the largest anonymous resident
memory seen (RssAnon, sampled every 20 ms by a daemon thread), the largest file-backed resident memory (RssFile) and
the bytes it read and wrote (/proc/self/io deltas).

VmHWM (stage.peak_rss_mb) is the high-water mark of the process's whole life and counts the file-backed pages of
memory-mapped shards with the rest; RssAnon is what a task needs of the node's memory, RssFile is page cache the kernel
can drop and refill, so the two are recorded apart, per unit.

A unit's window runs from the later of two moments to its marker: the last time a Stage was unpickled in this process
(a Ray task or actor call receiving its arguments, i.e. the start of the task) and the last marker this process wrote
(an actor's next shard). A process that has done neither (the first unit of `ray.in_process=true`) records nothing.
Linux only (/proc); elsewhere nothing is recorded.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

INTERVAL_S = 0.02
STATUS, IO = "/proc/self/status", "/proc/self/io"
IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes")


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def rss_kib(text: str) -> tuple[int, int]:
    """(RssAnon, RssFile) in KiB from the text of /proc/<pid>/status."""
    got = {}
    for line in text.splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            got[line.split(":")[0]] = int(line.split()[1])
    return got.get("RssAnon", 0), got.get("RssFile", 0)


def io_counters(text: str) -> dict[str, int]:
    """The counters of /proc/<pid>/io named in IO_KEYS."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in IO_KEYS:
            out[key] = int(value)
    return out


class UnitMeter:
    """Peaks of RssAnon and RssFile and /proc/self/io deltas over a window of this process's life."""

    def __init__(self, interval: float = INTERVAL_S) -> None:
        self.interval = interval
        self._reset_state()

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._open = False
        self._anon = self._file = 0
        self._io: dict[str, int] = {}
        self._own = 0  # bytes this meter read from /proc: they are in rchar, not the unit's

    def _proc(self, path: str) -> str:
        text = _read(path)
        self._own += len(text)
        return text

    def _sample(self) -> None:
        anon, file = rss_kib(self._proc(STATUS))
        self._anon, self._file = max(self._anon, anon), max(self._file, file)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                if self._open:
                    self._sample()

    def start(self) -> None:
        """Open a window now (the sampling thread starts on first use)."""
        if not os.path.exists(STATUS):
            return
        with self._lock:
            self._anon = self._file = 0
            self._sample()
            self._io = io_counters(self._proc(IO)) if os.path.exists(IO) else {}
            self._own, self._open = 0, True
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="unit-meter", daemon=True)
            self._thread.start()

    def lap(self) -> Optional[dict[str, Any]]:
        """The open window's record (None where none was open), and a new window from now."""
        with self._lock:
            was_open = self._open
            if was_open:
                self._sample()
                anon, file = self._anon, self._file
                now = io_counters(self._proc(IO)) if self._io else {}
                io = {k: now[k] - self._io[k] for k in IO_KEYS if k in now and k in self._io}
                if "rchar" in io:
                    io["rchar"] = max(0, io["rchar"] - self._own)
        self.start()
        if not was_open:
            return None
        return {"worker_peak_anon_mb": round(anon / 1024, 1), "worker_peak_file_mb": round(file / 1024, 1),
                "unit_io_bytes": io}

    def after_fork(self) -> None:
        """A forked child has no sampling thread and may have inherited a held lock: start afresh, closed."""
        self._reset_state()


METER = UnitMeter()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=METER.after_fork)
