"""Waiting for another rank's file, with a heartbeat line and a timeout (no rank waits silently for a day)."""
from __future__ import annotations

import time
from typing import Callable

from realsyn_pl.construct.engine.stage import StageError, rank_world


def wait_until(ready: Callable[[], bool], what: str, timeout_s: float, heartbeat_s: float = 60.0,
               key: str = "cluster.wait_timeout_s", poll_s: float = 1.0) -> None:
    """Poll `ready()` until true; print `[build] rank r waiting for <what> (Ns)` every `heartbeat_s` seconds and
    raise a one-line StageError naming `key` after `timeout_s`."""
    start = last = time.time()
    while not ready():
        now = time.time()
        if now - start > timeout_s:
            raise StageError(f"rank {rank_world()[0]} timed out after {timeout_s:.0f} s waiting for {what} "
                             f"(raise {key} if the other ranks are still working)")
        if now - last >= heartbeat_s:
            print(f"[build] rank {rank_world()[0]} waiting for {what} ({now - start:.0f} s)", flush=True)
            last = now
        time.sleep(poll_s)
