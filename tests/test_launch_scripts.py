"""data_build/launch/slurm.sbatch (how `fit` and `eval` run under SLURM) with a fake `srun` on PATH: the step is
launched so that one dead rank ends it, and its exit code is the job's."""
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data_build" / "launch" / "slurm.sbatch"


def _run(tmp_path: Path, exit_code: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\necho \"srun $*\" >> {log}\nexit {exit_code}\n")
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(SCRIPT), "fit", "--config", "configs/fit/realsyn15m_vitb32.yaml", "resume=last"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_one_dead_rank_ends_the_step(tmp_path):
    proc, calls = _run(tmp_path, 0)
    assert proc.returncode == 0, proc.stderr
    # without --kill-on-bad-exit the other ranks wait in their next collective until its timeout (30 minutes)
    assert calls == ["srun --kill-on-bad-exit=1 python -m realsyn_pl fit --config configs/fit/realsyn15m_vitb32.yaml "
                     "resume=last"]


def test_the_steps_exit_code_is_the_jobs(tmp_path):
    proc, _ = _run(tmp_path, 3)
    assert proc.returncode == 3


def test_every_multi_task_srun_in_the_shipped_scripts_kills_on_a_bad_exit():
    """Every srun that starts several ranks of one program; one-task helpers (ray_slurm.sbatch's `ray start` and
    `hostname`, `--ntasks=1`) have no other ranks to end."""
    scripts = [p for p in (ROOT / "data_build" / "launch").iterdir() if p.suffix in (".sbatch", ".sh")]
    code = [ln.strip() for p in scripts for ln in p.read_text().splitlines() if not ln.strip().startswith("#")]
    multi = [ln for ln in code if re.search(r"(^|[\s(])srun\s", ln) and "--ntasks=1" not in ln]
    assert multi and all("--kill-on-bad-exit=1" in ln for ln in multi), multi
