"""How many nodes and devices the launcher (torchrun, SLURM, or none) gave us, so configs need not repeat it."""
from __future__ import annotations

import os
from typing import Any, Optional

from realsyn_pl.config import ConfigError


def launcher_nodes() -> Optional[int]:
    if "LOCAL_WORLD_SIZE" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return max(1, int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"]))
    if "SLURM_NNODES" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_NNODES"])
    return None


def launcher_devices() -> Optional[int]:
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if "SLURM_NTASKS_PER_NODE" in os.environ:
        return int(os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0])
    if "SLURM_NTASKS" in os.environ and "SLURM_NNODES" in os.environ:
        return int(os.environ["SLURM_NTASKS"]) // int(os.environ["SLURM_NNODES"])
    return None


def resolve_topology(devices: Any, num_nodes: Optional[int]) -> tuple[Any, int]:
    """'auto' / null take the launcher's numbers; explicit values must agree with the launcher, or every process
    would train alone on the whole data and write over the others' checkpoints."""
    started, nodes = launcher_devices(), launcher_nodes()
    if devices in (None, "auto"):
        devices = started or "auto"
    elif started is not None and isinstance(devices, int) and devices != started:
        raise ConfigError(f"trainer.devices={devices} but the launcher started {started} process(es) per node; "
                          "use trainer.devices=auto")
    if num_nodes is None:
        num_nodes = nodes or 1
    elif nodes is not None and num_nodes != nodes:
        raise ConfigError(f"trainer.num_nodes={num_nodes} but the launcher runs {nodes} node(s); leave it unset")
    return devices, num_nodes


def close_process_group() -> None:
    """Tear the default process group down before the interpreter exits. Left to interpreter shutdown, gloo's
    worker threads can be destroyed while joinable, and a rank that finished cleanly then dies in SIGABRT
    ("terminate called without an active exception"), which torchrun reports as a failed job."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
