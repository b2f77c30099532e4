"""Joining or starting the Ray instance a build runs on.

Ray's own convention decides where: `ray.address` (config) or RAY_ADDRESS joins a running cluster (`ray start`
on SLURM nodes, KubeRay, a head started by hand; `auto` finds one started on this machine); without either, an
embedded instance starts on this machine, bound to 127.0.0.1 and sized by `ray.num_cpus` / `num_gpus` /
`object_store_gb` (default: the machine), and stops when the build ends. A process that already called ray.init()
(a notebook, the tests) is used as it is. `ray.in_process=true` uses no Ray at all: every unit runs in the driver,
one after another (a debugger, a profiler).
Open files: the driver and every worker raise their soft limit on open files to the hard limit once
(`raise_open_files_limit`): a global step reads thousands of shards, each memory map holding a file descriptor.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from realsyn_pl.construct.engine.config import RayConfig
from realsyn_pl.construct.engine.progress import QUIET_BARS

# Ray reads this when it is imported: 0 makes every node of an embedded instance advertise 127.0.0.1 instead of
# the machine's external address (one machine needs no open port beyond loopback)
LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
GB = 1024 ** 3
IN_PROCESS = "in-process"
_open_files_checked = False  # raise_open_files_limit ran in this process (a forked child inherits the limit too)


@dataclass
class Session:
    address: str          # the GCS address ("127.0.0.1:port" for an embedded instance)
    embedded: bool        # started here (and stopped by close())
    owned: bool           # this session called ray.init() (else it was already initialised)
    cpus: float
    gpus: float

    def close(self) -> None:
        if self.owned:
            import ray

            ray.shutdown()


def _print(line: str) -> None:
    print(line, flush=True)


def raise_open_files_limit(say: Optional[Callable[[str], None]] = _print) -> Optional[tuple[int, int]]:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) to its hard limit, once per process; later
    calls do nothing. A global step maps shards (a file descriptor each) and the usual soft limit of 1,024 is far
    below the hard limit most systems allow. Returns (old, new) soft limit when this call raised it, and passes
    `say` one line saying so (None: silent); nothing when it was already at the hard limit or cannot be raised."""
    global _open_files_checked
    if _open_files_checked:
        return None
    _open_files_checked = True
    try:
        import resource
    except ImportError:  # not a POSIX system: no such limit to raise
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # a hard limit the kernel will not grant as a soft one (macOS: above OPEN_MAX)
        return None
    if say is not None:
        shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        say(f"[build] open files: soft limit raised from {soft} to {shown} (hard limit)")
    return soft, hard


def target(rc: RayConfig) -> Optional[str]:
    """The cluster address to join, or None for an embedded instance."""
    return rc.address or os.environ.get("RAY_ADDRESS") or None


def connect(rc: RayConfig) -> Session:
    raise_open_files_limit()  # before Ray starts: an embedded instance's workers inherit the raised limit
    if rc.in_process:
        import torch

        return Session(address=IN_PROCESS, embedded=False, owned=False, cpus=float(os.cpu_count() or 1),
                       gpus=float(torch.cuda.device_count()))
    address = target(rc)
    if address is None:
        os.environ.setdefault(LOOPBACK, "0")
    import ray

    if address is None and os.environ[LOOPBACK] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # ray was imported before the variable was set: apply it anyway
    owned = not ray.is_initialized()
    if owned:
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True,
                                  "include_dashboard": False}
        if address is None:  # "local": a new instance, never one a `ray start` on this machine left running
            kwargs.update(address="local", num_cpus=rc.num_cpus, num_gpus=rc.num_gpus,
                          object_store_memory=None if rc.object_store_gb is None else int(rc.object_store_gb * GB))
        else:
            kwargs["address"] = address
            # a joined cluster's workers do not inherit this process's environment: hand on the bars switched off
            quiet = {k: os.environ[k] for k in QUIET_BARS if k in os.environ}
            if quiet:
                kwargs["runtime_env"] = {"env_vars": quiet}
        ray.init(**kwargs)
    res = ray.cluster_resources()
    return Session(address=ray.get_runtime_context().gcs_address, embedded=owned and address is None, owned=owned,
                   cpus=float(res.get("CPU", 0.0)), gpus=float(res.get("GPU", 0.0)))
