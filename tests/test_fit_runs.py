"""Runs as a researcher meets them on a cluster: extending a finished run, one CSV / W&B run across resumes,
refusing to start over silently, and plain progress lines when stdout is a file."""
import csv
import json
import re
import subprocess

import pytest
import torch

from fit_helpers import REPO, fit_cmd, write_fit_config
from realsyn_pl.cli import main


def _csv_rows(out):
    files = sorted((out / "csv").glob("version_*/metrics.csv"))
    assert [f.parent.name for f in files] == ["version_0"], files
    with open(files[0]) as fh:
        return [row for row in csv.DictReader(fh)]


def _by_step(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def test_extending_a_finished_run_continues_in_the_same_csv_and_wandb_run(world_shards, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no W&B credentials: offline runs in output_dir/wandb
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    common = {"trainer.max_epochs": 3, "logging.wandb": "offline"}
    ref_out = tmp_path / "ref"
    ref_cfg = write_fit_config(tmp_path / "ref.yaml", world_shards, ref_out,
                               **{**common, "trainer.max_steps": 20, "logging.wandb": "disabled"})
    assert main(["fit", "--config", str(ref_cfg)]) == 0
    ref_lr = _by_step(_csv_rows(ref_out), "train/lr")

    out = tmp_path / "run"
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, out, **{**common, "trainer.max_steps": 10})
    assert main(["fit", "--config", str(cfg)]) == 0
    first_id = (out / "wandb_run_id.txt").read_text().strip()
    # Extend the finished 10-step run to 20: the LR schedule is rebuilt for 20 steps, the rest continues.
    assert main(["fit", "--config", str(cfg), "resume=latest", "trainer.max_steps=20"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 20 and summary["epochs_completed"] == 2
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    assert all(int(s["step"]) == 20 for s in ckpt["optimizer_states"][0]["state"].values())  # Adam kept its moments
    rows = _csv_rows(out)
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(1, 21))  # one file, every step once, numbered by steps done (as the console)
    lr = _by_step(rows, "train/lr")
    for step in range(11, 21):  # from the resume on: the 20-step schedule's rates
        assert lr[step] == pytest.approx(ref_lr[step], rel=1e-9), step
    assert lr[10] != pytest.approx(ref_lr[10], rel=1e-6)  # the first part ran on the 10-step schedule
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith("-" + first_id) for r in runs)

    # Shrinking below the checkpoint's step is a one-line error, not a scheduler traceback.
    assert main(["fit", "--config", str(cfg), "resume=last", "trainer.max_steps=5"]) == 2
    # So is shrinking max_epochs below the 2 epochs the 20 steps (10 per epoch) have reached.
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg), "resume=last", "trainer.max_steps=30",
                 "trainer.max_epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: trainer.max_epochs=1 is below the 2 epoch(s)") and "\n" not in err


def test_file_stdout_gets_a_summary_and_one_line_per_interval_and_reruns_are_refused(world_shards, tmp_path):
    out = tmp_path / "run"
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, out,
                           **{"trainer.max_epochs": 2, "trainer.log_every_n_steps": 5, "logging.progress_bar": True,
                              "trainer.accumulate_grad_batches": 1})
    log = tmp_path / "stdout.txt"
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    import os

    env = dict(os.environ, **env)
    with open(log, "w") as fh:
        proc = subprocess.run(fit_cmd(cfg), cwd=REPO, env=env, stdout=fh, stderr=subprocess.PIPE, text=True,
                              timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = log.read_text()
    assert re.search(r"^fit: 8 shards, 80 samples/epoch, 10 steps/epoch; global batch 8 .*training to step 20 "
                     r"from step 0, LR schedule 20 steps \(onecycle, warm-up 6\)$", text, re.M), text
    lines = re.findall(r"^step (\d+) epoch ([\d.]+) loss ([\d.]+) lr (\d\.\d{3}e[-+]\d+) samples/s ([\d.]+)/device "
                       r"([\d.]+) total skipped (\d+)$", text, re.M)
    assert [int(m[0]) for m in lines] == [5, 10, 15, 20], text
    assert [float(m[1]) for m in lines] == [0.5, 1.0, 1.5, 2.0]
    assert all(float(m[4]) > 0 for m in lines)
    assert "open_clip.add_model_config(" in text and "create_model_and_transforms(" in text
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 2

    # The same command again would start over beside the checkpoints: refused in one line.
    proc = subprocess.run(fit_cmd(cfg), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error: output_dir=") and "resume=last" in err and "overwrite=true" in err
    assert "\n" not in err and "Traceback" not in err


def test_resume_last_takes_the_newest_checkpoint_slurm_hpc_included_and_overwrite_starts_over(tmp_path):
    import os

    from realsyn_pl.config import ConfigError
    from realsyn_pl.training.fit import prepare_output_dir, resolve_resume

    out = tmp_path / "run"
    assert resolve_resume("last", out) is None  # a first run under a requeueing scheduler starts fresh
    (out / "checkpoints").mkdir(parents=True)
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert resolve_resume("latest", out) == str(last)
    hpc = out / "hpc_ckpt_1.ckpt"  # what Lightning writes on SLURM's SIGUSR1, after the last periodic checkpoint
    hpc.write_bytes(b"x")
    os.utime(last, (1, 1))
    assert resolve_resume("last", out) == str(hpc)
    with pytest.raises(ConfigError, match="overwrite=true"):
        prepare_output_dir(out, None, overwrite=False)
    prepare_output_dir(out, "last", overwrite=False)  # continuing is fine
    (out / "csv" / "version_0").mkdir(parents=True)
    (out / "wandb_run_id.txt").write_text("abc\n")
    prepare_output_dir(out, None, overwrite=True)
    assert not last.exists() and not hpc.exists() and not (out / "csv").exists()
    assert not (out / "wandb_run_id.txt").exists()
