"""Shared by the benchmark scripts: the machine line and appending a result table to docs/benchmarks.md."""
from __future__ import annotations

import atexit
import datetime as dt
import os
import platform
import shutil
import tempfile
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        tv = torch.__version__
    except ImportError:  # pragma: no cover
        gpu, tv = "unknown", "n/a"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}, torch {tv}"


def scratch_dir(prefix: str) -> Path:
    """A temporary working folder removed when the script exits (set BENCH_KEEP=1 to keep it for inspection)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if not os.environ.get("BENCH_KEEP"):
        atexit.register(shutil.rmtree, path, True)
    return path


def append_result(title: str, table: str, notes: str = "") -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    if not DOC.exists():
        DOC.write_text("# Benchmarks\n\nEach section is appended by a script in `benchmarks/`.\n")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with DOC.open("a") as fh:
        fh.write(f"\n## {title} ({stamp})\n\nMachine: {machine()}\n\n{table}\n")
        if notes:
            fh.write(f"\n{notes}\n")
