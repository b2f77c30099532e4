import math

import torch
from torch.optim.lr_scheduler import OneCycleLR

from realsyn_pl.config import OptimConfig
from realsyn_pl.training.optim import build_optimizer, build_scheduler


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    m.logit_scale = torch.nn.Parameter(torch.ones([]))
    return m


def test_onecycle_lr_matches_torch_every_step():
    cfg = OptimConfig()
    total = 57
    ours_opt = build_optimizer(_model(), cfg)
    ours = build_scheduler(ours_opt, cfg, total)
    ref_opt = torch.optim.AdamW(_model().parameters(), lr=cfg.lr)
    ref = OneCycleLR(ref_opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1, cycle_momentum=False)
    for step in range(total):
        assert math.isclose(ours_opt.param_groups[0]["lr"], ref_opt.param_groups[0]["lr"], rel_tol=1e-12), step
        assert ours_opt.param_groups[1]["lr"] == ours_opt.param_groups[0]["lr"]
        ours_opt.step(), ref_opt.step()
        ours.step(), ref.step()
    # warm-up peaks at 10 % of the steps, starts at lr/25, betas stay as configured (no momentum cycling)
    lrs = []
    opt = build_optimizer(_model(), cfg)
    sched = build_scheduler(opt, cfg, 100)
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs.index(max(lrs)) == 9 and math.isclose(lrs[0], cfg.lr / 25)
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)


def test_weight_decay_exclusions_follow_open_clip():
    model = _model()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.2))
    exempt, decay = opt.param_groups
    assert exempt["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"0.weight"}
    assert {names[id(p)] for p in exempt["params"]} == {"0.bias", "1.weight", "1.bias", "logit_scale"}


def test_cosine_with_warmup():
    cfg = OptimConfig(scheduler="cosine", warmup_steps=10, lr=1.0)
    opt = build_optimizer(_model(), cfg)
    sched = build_scheduler(opt, cfg, 110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert math.isclose(lrs[0], 0.1) and math.isclose(lrs[9], 1.0) and math.isclose(lrs[60], 0.5, abs_tol=1e-9)
    assert lrs[-1] < 1e-3
