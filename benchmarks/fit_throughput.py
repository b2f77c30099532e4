"""Training samples/s of `python -m realsyn_pl fit` vs `python -m open_clip_train.main` (target: >= 1.0x).

    python benchmarks/fit_throughput.py [samples] [batch_size]

Same tiny CLIP (the demo's 8M-parameter student), same RealSyn-layout shards, same batch size, fp32, one loader
worker, same CPU, run one after the other. Each trainer's steady-state rate is the mean of the rates it logs after
its first logging interval (both include data loading time); total wall time per process is shown too.
Prints one table and appends it to docs/benchmarks.md.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_result, scratch_dir  # noqa: E402

from realsyn_pl.demo.run import TINY_CLIP  # noqa: E402
from realsyn_pl.demo.world import write_world_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAME = "realsyn-tiny"
LOG_EVERY = 4


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start, proc.stdout + proc.stderr


def steady(rates: list[float]) -> float:
    rates = rates[1:] if len(rates) > 1 else rates
    return sum(rates) / len(rates)


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 3072
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    tmp = scratch_dir("fit_bench_")
    shards = write_world_shards(tmp / "shards", samples, samples // 8, seed=0, px=64)
    urls = f"{shards}/{{00000..00007}}.tar"
    env = dict(os.environ, OMP_NUM_THREADS="2", WANDB_MODE="disabled")
    model_json = tmp / f"{NAME}.json"
    model_json.write_text(json.dumps(TINY_CLIP))

    ours_cmd = [
        sys.executable, "-m", "realsyn_pl", "fit", f"output_dir={tmp / 'ours'}", f"model.name={NAME}",
        f"model.custom={json.dumps(TINY_CLIP)}", f"data.train=[{{urls: '{urls}'}}]", f"data.batch_size={batch}",
        "data.workers=1", "data.shuffle_buffer=1000", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.max_epochs=1", f"trainer.log_every_n_steps={LOG_EVERY}", "logging.wandb=disabled",
        "logging.progress_bar=false", "checkpoint.export_open_clip=false", "optim.lr=1e-3",
    ]
    ours_wall, _ = run(ours_cmd, env)
    with open(next((tmp / "ours" / "csv").glob("version_*/metrics.csv"))) as fh:
        import csv

        ours_rates = [float(r["perf/samples_per_s"]) for r in csv.DictReader(fh) if r.get("perf/samples_per_s")]

    # open_clip_train knows models only from its config folder: register ours, then hand over to its main().
    launcher = (
        "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
        "from open_clip_train.main import main; main(sys.argv[2:])"
    )
    oc_cmd = [
        sys.executable, "-c", launcher, str(model_json), "--model", NAME, "--train-data", urls,
        "--train-num-samples", str(samples), "--dataset-type", "webdataset", "--batch-size", str(batch),
        "--workers", "1", "--epochs", "1", "--precision", "fp32", "--device", "cpu", "--lr", "1e-3", "--wd", "0.2",
        "--warmup", "3", "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
        "--log-every-n-steps", str(LOG_EVERY), "--logs", str(tmp / "oc"), "--name", "bench", "--seed", "0",
    ]
    oc_wall, oc_log = run(oc_cmd, env)
    # open_clip logs the mean batch time over each logging interval: rate = batch / mean time.
    oc_rates = [batch / float(m) for m in re.findall(r"Batch \(t\): ([\d.]+),", oc_log)]
    if not oc_rates or not ours_rates:
        sys.exit("could not read the logged rates")

    ours, oc = steady(ours_rates), steady(oc_rates)
    table = (
        "| trainer | samples/s (steady) | wall time (s) |\n|---|---|---|\n"
        f"| realsyn_pl fit | {ours:.1f} | {ours_wall:.1f} |\n"
        f"| open_clip_train.main | {oc:.1f} | {oc_wall:.1f} |\n"
        f"| ratio (realsyn_pl / open_clip) | **{ours / oc:.2f}x** (target >= 1.0x) | |"
    )
    print(table)
    append_result(
        "fit_throughput",
        table,
        f"Tiny CLIP (8M params, 32 px), {samples} samples of the shape world at 64 px in 8 shards, batch {batch}, "
        "fp32, 1 loader worker, OMP_NUM_THREADS=2, one epoch each.",
    )


if __name__ == "__main__":
    main()
