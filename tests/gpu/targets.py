"""Where the GPU checks run: `cpu-dry` (tiny shapes on the CPU, always, in the default suite, so the GPU code paths
cannot rot) and `cuda` (marked gpu: `pytest -m gpu` runs exactly these; skipped where CUDA is absent)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Target:
    name: str         # cpu-dry | cuda
    device: str       # torch device
    accelerator: str  # Lightning accelerator

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


CPU_DRY = Target("cpu-dry", "cpu", "cpu")
CUDA = Target("cuda", "cuda", "gpu")
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
TARGETS = [pytest.param(CPU_DRY, id="cpu-dry"), pytest.param(CUDA, id="cuda", marks=[pytest.mark.gpu, NO_CUDA])]
