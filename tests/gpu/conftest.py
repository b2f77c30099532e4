"""The `target` fixture of the GPU checks (targets.py): each test runs as a CPU dry run and, marked gpu, on CUDA."""
import sys
from pathlib import Path

import pytest
import torch

from gpu.targets import TARGETS

# the construct tests' model builders (generate_support) live beside them, which is on sys.path only when pytest
# collected a test there first
CONSTRUCT = str(Path(__file__).resolve().parents[1] / "construct")
if CONSTRUCT not in sys.path:
    sys.path.append(CONSTRUCT)


@pytest.fixture(params=TARGETS)
def target(request):
    """A target, with TF32 off on CUDA: the checks compare fp32 on the GPU with fp32 on the CPU to ~1e-5, and TF32
    convolutions (cuDNN's default, open_clip's patch embedding) round to ~1e-3."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield request.param
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
