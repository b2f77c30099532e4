import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.loss import ClipLoss

from realsyn_pl.models.loss import ContrastiveLoss


def _features(seed=0, n=12, d=16):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt, torch.tensor(14.2857)


def _loss_and_grads(loss_fn, img, txt, scale):
    img, txt, scale = img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone().requires_grad_()
    loss = loss_fn(img, txt, scale)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


def test_matches_open_clip_clip_loss_single_process():
    img, txt, scale = _features()
    ours = _loss_and_grads(ContrastiveLoss(), img, txt, scale)
    ref = _loss_and_grads(ClipLoss(), img, txt, scale)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ours[0].item() > 0


def _ddp_worker(rank, world, port, local_loss, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    img, txt, scale = _features()
    n = img.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    loss_fn = ContrastiveLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world)
    loss, gi, gt, gs = _loss_and_grads(loss_fn, img[sl], txt[sl], scale)
    # What DDP does to parameter gradients: average over ranks.
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss)
    gi_all = [torch.zeros_like(gi) for _ in range(world)]
    gt_all = [torch.zeros_like(gt) for _ in range(world)]
    dist.all_gather(gi_all, gi)
    dist.all_gather(gt_all, gt)
    dist.all_reduce(gs)
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "gi": torch.cat(gi_all) / world, "gt": torch.cat(gt_all) / world,
                    "gs": gs / world}, out_path)
    dist.destroy_process_group()


@pytest.mark.parametrize("local_loss", [True, False])
def test_two_rank_gloo_equals_one_process_on_global_batch(tmp_path, local_loss):
    out = tmp_path / "ddp.pt"
    port = 29500 + (os.getpid() % 1000) + (7 if local_loss else 0)
    mp.spawn(_ddp_worker, args=(2, port, local_loss, str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    img, txt, scale = _features()
    loss, gi, gt, gs = _loss_and_grads(ContrastiveLoss(), img, txt, scale)
    # Parameters see (1/world) * sum over ranks of d loss_r / d feature, i.e. the averaged feature gradients.
    torch.testing.assert_close(ddp["loss"], loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(ddp["gi"], gi, rtol=0, atol=1e-5)
    torch.testing.assert_close(ddp["gt"], gt, rtol=0, atol=1e-5)
    torch.testing.assert_close(ddp["gs"], gs, rtol=0, atol=1e-5)


@pytest.mark.slow
# local_loss=1 (the presets'): the Trainer's DDP wiring is what this adds; both loss modes across two ranks are
# test_two_rank_gloo_equals_one_process_on_global_batch's
@pytest.mark.parametrize("local_loss", ["1"])
def test_lightning_ddp_step_equals_single_process_on_global_batch(tmp_path, local_loss):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = repo / "tests" / "scripts" / "ddp_step.py"
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", LOCAL_LOSS=local_loss)
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    for cmd in ([sys.executable, str(script), str(single)],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(29650 + int(local_loss)), str(script), str(ddp)]):
        proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = torch.load(single, weights_only=True), torch.load(ddp, weights_only=True)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=0, atol=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for name in a["grads"]:
        torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=1e-4, atol=1e-5, msg=name)
