"""Training samples/s of `python -m realsyn_pl fit` vs `python -m open_clip_train.main` (target: >= 1.0x).

    python benchmarks/fit_throughput.py [--samples 3072] [--batch-size 64] [--repeats 5] [--threads 2]

Same tiny CLIP (the demo's 8M-parameter student), same RealSyn-layout shards, same batch size, fp32, one loader
worker, same CPU. Each trainer's steady-state rate in a run is the mean of the rates it logs after its first logging
interval (both include data loading time). On a shared machine one run of each is noise (single pairs have given
0.62x and 1.93x): the two trainers run --repeats times, alternating, the one that goes first swapped every repeat
(ours, oc / oc, ours / ...), so a slow spell of the machine falls on both. Each repeat gives one ratio of the two
back-to-back runs; the table shows the median ratio and its range (min-max), and the median rate and wall time of
each trainer with their ranges. Prints the table and appends it to docs/benchmarks.md (not with BENCH_DRY=1).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
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
SHARDS = 8
# fit's OneCycle warm-up (10% of the steps) must be longer than one step; and two logging intervals at least,
# since the first is not counted
MIN_BATCHES = 20


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:6])} ...\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start, proc.stdout + proc.stderr


def steady(rates: list[float]) -> float:
    """The mean logged rate without the first interval (process start-up, first batches, loader warm-up)."""
    rates = rates[1:] if len(rates) > 1 else rates
    return sum(rates) / len(rates)


def ours_cmd(out: Path, urls: str, batch: int) -> list[str]:
    return [
        sys.executable, "-m", "realsyn_pl", "fit", f"output_dir={out}", f"model.name={NAME}",
        f"model.custom={json.dumps(TINY_CLIP)}", f"data.train=[{{urls: '{urls}'}}]", f"data.batch_size={batch}",
        "data.workers=1", "data.shuffle_buffer=1000", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.max_epochs=1", f"trainer.log_every_n_steps={LOG_EVERY}", "logging.wandb=disabled",
        "logging.progress_bar=false", "checkpoint.export_open_clip=false", "optim.lr=1e-3",
    ]


def ours_rate(cmd: list[str], out: Path, env: dict) -> tuple[float, float]:
    """(steady samples/s, wall s) of one `realsyn_pl fit` run, its rates read from the CSV log."""
    wall, _ = run(cmd, env)
    with open(next((out / "csv").glob("version_*/metrics.csv"))) as fh:
        rates = [float(r["perf/samples_per_s"]) for r in csv.DictReader(fh) if r.get("perf/samples_per_s")]
    if not rates:
        sys.exit(f"no perf/samples_per_s logged in {out / 'csv'}")
    return steady(rates), wall


def oc_cmd(model_json: Path, logs: Path, name: str, urls: str, samples: int, batch: int) -> list[str]:
    # open_clip_train knows models only from its config folder: register ours, then hand over to its main().
    launcher = (
        "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
        "from open_clip_train.main import main; main(sys.argv[2:])"
    )
    return [
        sys.executable, "-c", launcher, str(model_json), "--model", NAME, "--train-data", urls,
        "--train-num-samples", str(samples), "--dataset-type", "webdataset", "--batch-size", str(batch),
        "--workers", "1", "--epochs", "1", "--precision", "fp32", "--device", "cpu", "--lr", "1e-3", "--wd", "0.2",
        "--warmup", "3", "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
        "--log-every-n-steps", str(LOG_EVERY), "--logs", str(logs), "--name", name, "--seed", "0",
    ]


def oc_rate(cmd: list[str], batch: int, env: dict) -> tuple[float, float]:
    """(steady samples/s, wall s) of one open_clip_train run: it logs the mean batch time of each interval."""
    wall, log = run(cmd, env)
    rates = [batch / float(m) for m in re.findall(r"Batch \(t\): ([\d.]+),", log)]
    if not rates:
        sys.exit("no 'Batch (t)' lines in open_clip_train's log")
    return steady(rates), wall


def spread(values: list[float], fmt: str = ".1f") -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3072, help=f"training samples (in {SHARDS} shards), one epoch")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="runs of each trainer, alternating")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both trainers")
    args = ap.parse_args()
    if args.repeats < 1 or args.samples % SHARDS or args.samples // args.batch_size < MIN_BATCHES:
        ap.error(f"need --repeats >= 1, --samples a multiple of {SHARDS} (the shards) and at least {MIN_BATCHES} "
                 "batches (--samples / --batch-size)")
    tmp = scratch_dir("fit_bench_")
    shards = write_world_shards(tmp / "shards", args.samples, args.samples // SHARDS, seed=0, px=64)
    urls = f"{shards}/{{00000..{SHARDS - 1:05d}}}.tar"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), WANDB_MODE="disabled")
    model_json = tmp / f"{NAME}.json"
    model_json.write_text(json.dumps(TINY_CLIP))

    load_before = uptime()
    rates: dict[str, list[float]] = {"realsyn_pl": [], "open_clip": []}
    walls: dict[str, list[float]] = {"realsyn_pl": [], "open_clip": []}
    ratios = []
    for i in range(args.repeats):
        order = ["realsyn_pl", "open_clip"] if i % 2 == 0 else ["open_clip", "realsyn_pl"]
        for trainer in order:
            if trainer == "realsyn_pl":
                out = tmp / f"ours_{i}"  # a fresh output_dir: fit refuses one with checkpoints
                rate, wall = ours_rate(ours_cmd(out, urls, args.batch_size), out, env)
            else:
                cmd = oc_cmd(model_json, tmp / "oc", f"bench_{i}", urls, args.samples, args.batch_size)
                rate, wall = oc_rate(cmd, args.batch_size, env)
            rates[trainer].append(rate)
            walls[trainer].append(wall)
        ours, oc = rates["realsyn_pl"][-1], rates["open_clip"][-1]
        ratios.append(ours / oc)
        print(f"repeat {i + 1}/{args.repeats} ({' then '.join(order)}): realsyn_pl {ours:.1f} samples/s "
              f"({walls['realsyn_pl'][-1]:.0f} s), open_clip {oc:.1f} samples/s ({walls['open_clip'][-1]:.0f} s), "
              f"ratio {ours / oc:.2f}x", flush=True)
    load_after = uptime()

    ratio = statistics.median(ratios)
    rows = [f"| {label} | {statistics.median(rates[t]):.1f} | {spread(rates[t])} | {statistics.median(walls[t]):.1f} "
            f"| {spread(walls[t])} |" for t, label in (("realsyn_pl", "realsyn_pl fit"),
                                                     ("open_clip", "open_clip_train.main"))]
    table = "\n".join([
        "| trainer | samples/s (steady, median) | range | wall time (s, median) | range |",
        "|---|---|---|---|---|",
        *rows,
        f"| ratio (realsyn_pl / open_clip, per repeat) | **{ratio:.2f}x** (target >= 1.0x) | "
        f"{spread(ratios, '.2f')}x | | |",
    ])
    print(table)
    notes = (f"Tiny CLIP (8M params, 32 px), {args.samples} samples of the shape world at 64 px in {SHARDS} shards, "
             f"batch {args.batch_size}, fp32, 1 loader worker, OMP_NUM_THREADS={args.threads}, one epoch per run. "
             f"{args.repeats} repeats, the trainers alternating (the first of each pair swapped every repeat); the "
             f"ratio is the median of the per-repeat ratios, with their range. uptime before: {load_before}; after: "
             f"{load_after}. Target >= 1.0x: {'met' if ratio >= 1.0 else 'not met'}.")
    if os.environ.get("BENCH_DRY"):  # a trial run that leaves docs/benchmarks.md alone
        print(notes)
        return
    append_result("fit_throughput", table, notes)


if __name__ == "__main__":
    main()
