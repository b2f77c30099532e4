"""data_build/launch/ray_slurm.sbatch with fake `srun` and `scontrol` on PATH: the head's and workers' `ray start`
lines, one driver with RAY_ADDRESS, and a requeue when the time-limit signal arrives."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data_build" / "launch" / "ray_slurm.sbatch"


def fakes(tmp_path: Path) -> dict:
    """srun and scontrol that log their arguments; srun answers `hostname --ip-address` with 127.0.0.1, and a fake
    python driver that logs its arguments and RAY_ADDRESS (and sleeps for DRIVER_SLEEP seconds)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "scontrol").write_text(f"""#!/usr/bin/env bash
echo "scontrol $*" >> {log}
if [[ "$1 $2" == "show hostnames" ]]; then printf 'gpu-001\\ngpu-002\\ngpu-003\\n'; fi
""")
    (bin_dir / "srun").write_text(f"""#!/usr/bin/env bash
echo "srun $*" >> {log}
if [[ "$*" == *"hostname --ip-address"* ]]; then echo "127.0.0.1"; fi
""")
    (bin_dir / "fake_python").write_text(f"""#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then exec {sys.executable} "$@"; fi
echo "driver RAY_ADDRESS=$RAY_ADDRESS RAY_AUTH_MODE=$RAY_AUTH_MODE args: $*" >> {log}
sleep "${{DRIVER_SLEEP:-0}}"
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-[001-003]", "SLURM_CPUS_PER_TASK": "32", "SLURM_GPUS_ON_NODE": "8",
           "RAY_HEAD_WAIT_S": "0", "RAY_WORKER_WAIT_S": "0", "PYTHON": str(bin_dir / "fake_python")}
    env.pop("RAY_ADDRESS", None)
    return {"env": env, "log": log}


ARGS = ["build", "all", "--config", "configs/build/paper_obelics.yaml", "work_dir=/shared/build"]


def test_dry_run_prints_the_cluster_and_the_one_driver_it_would_start(tmp_path):
    f = fakes(tmp_path)
    proc = subprocess.run(["bash", str(SCRIPT), *ARGS], env={**f["env"], "RAY_SLURM_DRY_RUN": "1"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("+ ")]
    head = [ln for ln in lines if "--head" in ln]
    workers = [ln for ln in lines if "ray start --address=127.0.0.1:6379" in ln]
    drivers = [ln for ln in lines if "-m realsyn_pl" in ln]
    assert head == ["+ srun --nodes=1 --ntasks=1 -w gpu-001 ray start --head --node-ip-address=127.0.0.1 --port=6379 "
                    "--num-cpus=32 --num-gpus=8 --include-dashboard=false --block"]
    assert sorted(ln.split(" -w ")[1].split()[0] for ln in workers) == ["gpu-002", "gpu-003"]
    assert all("--num-cpus=32 --num-gpus=8 --block" in ln for ln in workers)
    assert drivers == [f"+ {f['env']['PYTHON']} -m realsyn_pl {' '.join(ARGS)}"]
    assert "head gpu-001 (127.0.0.1:6379), 3 node(s), 32 CPUs and 8 GPUs each" in proc.stdout
    calls = f["log"].read_text()
    assert "ray start" not in calls and "driver" not in calls  # a dry run starts nothing


def test_run_starts_ray_on_every_node_then_one_driver_joined_to_it(tmp_path):
    f = fakes(tmp_path)
    proc = subprocess.run(["bash", str(SCRIPT), *ARGS], env=f["env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = f["log"].read_text().splitlines()
    starts = [c for c in calls if "ray start" in c]
    assert len(starts) == 3 and sum("--head" in c for c in starts) == 1
    (driver,) = [c for c in calls if c.startswith("driver ")]
    assert driver == f"driver RAY_ADDRESS=127.0.0.1:6379 RAY_AUTH_MODE=token args: -m realsyn_pl {' '.join(ARGS)}"
    assert "[ray_slurm] driver exited with 0" in proc.stdout


def test_the_time_limit_signal_requeues_the_job_and_the_driver_goes_on(tmp_path):
    f = fakes(tmp_path)
    proc = subprocess.Popen(["bash", str(SCRIPT), *ARGS], env={**f["env"], "DRIVER_SLEEP": "3"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while "driver " not in (f["log"].read_text() if f["log"].exists() else ""):
        assert time.time() - t0 < 30 and proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGUSR1)  # what SLURM sends the batch shell (--signal=B:USR1@300)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "scontrol requeue 4242" in f["log"].read_text().splitlines()
    assert "time limit near: requeueing" in out and "[ray_slurm] driver exited with 0" in out
