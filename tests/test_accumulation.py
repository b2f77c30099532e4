"""Contrastive accumulation (open_clip's --accum-freq feature caching): k micro-batches of b train exactly like one
batch of k x b under 2-process DDP (gloo). The 1-process case runs in process on the CPU and on CUDA:
tests/gpu/test_gpu_fit.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "ddp_step.py"


def _step(out: Path, accum: int, nproc: int = 1, port: int = 29671) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCUM=str(accum), LOCAL_LOSS="1")
    cmd = [sys.executable, str(SCRIPT), str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=True)


def _assert_same_step(got: dict, ref: dict) -> None:
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=0, atol=1e-5)
    assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) > 10
    for name in ref["grads"]:
        torch.testing.assert_close(got["grads"][name], ref["grads"][name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_two_process_accumulation_equals_one_process_big_batch(tmp_path):
    ref = _step(tmp_path / "one.pt", accum=1)
    # 2 ranks x 2 micro-batches of 2 = the same global batch of 8.
    _assert_same_step(_step(tmp_path / "ddp.pt", accum=2, nproc=2), ref)
