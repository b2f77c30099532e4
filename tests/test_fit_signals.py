"""Stopping `fit` with SIGTERM (SLURM, Kubernetes) or Ctrl-C: a checkpoint at the step reached, summary.json marked
interrupted, one resume line, exit 143 / 130; `resume=last` continues from that step to the end. The same runs
check that a tiny fit's log holds none of the known third-party noise and that console and CSV count steps alike."""
import csv
import json
import os
import re
import signal
import subprocess

import pytest
import torch

from fit_helpers import REPO, fit_cmd, write_fit_config
from realsyn_pl.cli import main
from realsyn_pl.training import fit  # noqa: F401 - Lightning's log handler bound now, not to a test's (later closed) capsys

# Messages a tiny fit used to print that say nothing about the run.
NOISE = ("litlogger", "LeafSpec", "`__len__` defined", "No pretrained weights loaded", "anonymous setting",
         "Loading `train_dataloader`", "ended before the epoch ended", "Traceback", "graceful shutdown")
HINT = re.compile(r"^interrupted at step (\d+); checkpoint saved to (\S+); resume with .*`python -m realsyn_pl fit "
                  r"--config \S+/config\.yaml resume=last`$", re.M)


def _interrupt_group(cfg, signum):
    """Run fit in its own process group until it has logged step 2, then signal the whole group (its loader worker
    too) as torchrun and SLURM do; return (exit code, stdout, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(fit_cmd(cfg), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step 2 "):
                os.killpg(proc.pid, signum)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, "".join(seen) + out, err


def _csv(out):
    with open(out / "csv" / "version_0" / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_sigterm_saves_the_step_reached_and_resume_last_continues_to_the_end(world_shards, tmp_path, capsys):
    out = tmp_path / "run"
    # 10 steps per epoch, 2 epochs: stopped at step 3 or so, mid-epoch.
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, out, **{"trainer.max_epochs": 2, "data.workers": 1})
    code, stdout, stderr = _interrupt_group(cfg, signal.SIGTERM)
    assert code == 143, stderr[-3000:]
    hint = HINT.search(stderr)
    assert hint and hint.group(2) == str(out / "checkpoints" / "last.ckpt"), stderr[-3000:]
    step = int(hint.group(1))
    assert 2 <= step < 10
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == step and ckpt["ShardDataModule"]["batches_done"] == step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["global_step"] == step
    log = stdout + stderr
    assert not [n for n in NOISE if n in log], log

    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "resume=last"]) == 0
    printed = capsys.readouterr().out
    assert f"training to step 20 from step {step}," in printed
    console = {int(m[0]): float(m[1]) for m in re.findall(r"^step (\d+) epoch [\d.]+ loss ([\d.]+) ", printed, re.M)}
    assert sorted(console) == list(range(step + 1, 21))
    rows = _csv(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 21))  # one row per step, numbered as the console does
    by_step = {int(r["step"]): float(r["train/loss"]) for r in rows}
    assert all(abs(by_step[s] - loss) < 1e-4 for s, loss in console.items())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 20 and summary["interrupted"] is None

    # The run is finished: resuming it again says so instead of silently doing nothing.
    assert main(["fit", "--config", str(cfg), "resume=last"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"nothing to train: the checkpoint {out / 'checkpoints' / 'last.ckpt'} is at step 20 = the end of epoch 2 = "
        "trainer.max_epochs=2; raise trainer.max_epochs (or trainer.max_steps) to continue")
    assert main(["fit", "--config", str(cfg), "resume=last", "trainer.max_steps=20"]) == 0
    assert "is at step 20 = trainer.max_steps=20; raise trainer.max_steps" in capsys.readouterr().out


def test_wandb_is_started_without_the_setting_it_warns_about(tmp_path, monkeypatch):
    """wandb warns "The anonymous setting has no effect" whenever wandb.init gets `anonymous`, which Lightning
    always passes (starting W&B itself here would cost the test suite a W&B service process)."""
    import wandb

    from realsyn_pl.config import LoggingConfig
    from realsyn_pl.training.loggers import build_loggers

    class Started(Exception):
        pass

    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise Started

    monkeypatch.setattr(wandb, "init", init)
    with pytest.raises(Started):  # build_loggers logs the config, which starts the run
        build_loggers(LoggingConfig(wandb="offline", csv=False), tmp_path, {}, flush_every=1)
    assert seen["mode"] == "offline" and "anonymous" not in seen


def test_ctrl_c_saves_the_step_reached_and_exits_130(world_shards, tmp_path, capsys, monkeypatch):
    """In process (a second interpreter start is the slow part of the test above): the process signals itself once
    step 2 is logged, as a terminal's Ctrl-C arrives; step 3, then in progress, finishes and is saved."""
    from realsyn_pl.training.progress import PlainProgress

    logged = PlainProgress.on_train_batch_end

    def ctrl_c_at_step_2(self, trainer, *args):
        logged(self, trainer, *args)
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(PlainProgress, "on_train_batch_end", ctrl_c_at_step_2)
    before = signal.getsignal(signal.SIGINT)  # a test worker process may ignore SIGINT
    out = tmp_path / "run"
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, out, **{"trainer.max_epochs": 2})
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(cfg)])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    hint = HINT.search(err)
    assert hint and hint.group(1) == "3", err[-3000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert json.loads((out / "summary.json").read_text())["interrupted"] == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C is the user's again
