"""Shared helpers for tests that run `realsyn_pl fit` (in process or as a subprocess)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml  # pyyaml comes with omegaconf

from conftest import TINY_CLIP, TINY_NAME

REPO = Path(__file__).resolve().parents[1]


def write_fit_config(path: Path, shards: Path, out_dir: Path, **overrides) -> Path:
    n = len(json.loads((shards / "sizes.json").read_text()))
    cfg = {
        "output_dir": str(out_dir),
        "model": {"name": TINY_NAME, "custom": TINY_CLIP},
        "data": {"train": [{"urls": f"{shards}/{{00000..{n - 1:05d}}}.tar"}], "batch_size": 8, "workers": 0,
                 "shuffle_buffer": 16},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "log_every_n_steps": 1},
        "optim": {"pct_start": 0.3},
        "logging": {"wandb": "disabled", "progress_bar": False},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit_cmd(config: Path, *extra: str, launcher: list[str] | None = None) -> list[str]:
    base = launcher or [sys.executable, "-m"]
    return [*base, "realsyn_pl", "fit", "--config", str(config), *extra]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metrics(out_dir: Path) -> dict[int, dict[str, float]]:
    """step -> logged values, over every CSV version (a resumed run writes a new one)."""
    rows: dict[int, dict[str, float]] = {}
    for f in sorted((out_dir / "csv").glob("version_*/metrics.csv")):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                step = int(row["step"])
                rows.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"})
    return rows
