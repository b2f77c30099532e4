"""How many nodes and devices the launcher (torchrun, SLURM, or none) gave us, so configs need not repeat it."""
from __future__ import annotations

import os
from typing import Any, Optional


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
    """Config values win; 'auto' / null take the launcher's numbers."""
    if devices in (None, "auto"):
        devices = launcher_devices() or "auto"
    if num_nodes is None:
        num_nodes = launcher_nodes() or 1
    return devices, num_nodes
