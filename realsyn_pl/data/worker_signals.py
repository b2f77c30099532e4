"""Stop signals in the training loader's worker processes.

Ctrl-C reaches the terminal's whole process group, torchrun signals each rank's process group and SLURM every
process of the job step: a loader worker that died of the signal would fail the main process's next fetch (or,
through torch's SIGCHLD handler, the main process anywhere) before it can save its checkpoint at a step boundary.
So a worker ignores SIGINT and SLURM's requeue signal (SIGUSR1), and outlives a SIGTERM that the training main
process got too; that process shuts its workers down once the checkpoint is saved. Any other SIGTERM (torch's
terminate() of a worker that would not stop, one outside training, `kill <worker>`) still ends the worker."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from types import FrameType
from typing import Optional

IDLE, TRAINING, STOPPING = 0, 1, 2
# The main process's state, shared with the workers it forks (inherited memory).
_MAIN = multiprocessing.RawValue("b", IDLE)
# How long a worker waits for the training main process to report the same signal: its handler runs only between
# Python bytecodes of its main thread, and a long C call (a GPU sync) delays it.
GRACE_S = 5.0


def set_main_state(state: int) -> None:
    _MAIN.value = state


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    deadline = time.monotonic() + GRACE_S
    while _MAIN.value == TRAINING and time.monotonic() < deadline:
        time.sleep(0.05)
    if _MAIN.value == STOPPING:
        return  # the main process got it too: it saves its checkpoint, then shuts this worker down
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def shield_worker() -> None:
    """Call in a loader worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGUSR1"):  # not on Windows
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
