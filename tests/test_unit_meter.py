"""The per-unit memory and I/O record of a `_done` marker (engine/memory.py): anonymous and file-backed peaks apart,
/proc/self/io deltas, a window opened by a task receiving its Stage."""
import json
import pickle
import sys
import time

import numpy as np
import pytest

from realsyn_pl.construct.engine.memory import UnitMeter
from realsyn_pl.construct.engine.stage import Counts, Stage

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_window_sees_a_peak_freed_before_its_end_and_the_bytes_written(tmp_path):
    meter = UnitMeter()
    assert meter.lap() is None  # no window was open: nothing to record
    base = meter.lap()["worker_peak_anon_mb"]  # the window lap() opened: the baseline
    block = np.ones(200 * 2 ** 20 // 8)  # 200 MiB of anonymous pages, freed before the window ends
    time.sleep(0.1)
    del block
    (tmp_path / "out.bin").write_bytes(b"x" * 2 ** 20)
    got = meter.lap()
    assert got["worker_peak_anon_mb"] >= base + 190
    assert got["worker_peak_file_mb"] > 0
    assert got["unit_io_bytes"]["wchar"] >= 2 ** 20
    assert meter.lap()["worker_peak_anon_mb"] < base + 100  # the next window starts after the free


def test_a_task_receiving_its_stage_opens_the_window_its_marker_closes(tmp_path):
    stage = pickle.loads(pickle.dumps(Stage(tmp_path, "s", {"a": 1})))  # what a Ray task does with its arguments
    block = np.ones(100 * 2 ** 20 // 8)
    time.sleep(0.1)
    del block
    c = Counts()
    c.keep(2)
    stage.mark_shard_done(0, c, 0.1)
    rec = json.loads(stage.marker(0).read_text())
    assert rec["worker_peak_anon_mb"] >= 100 and rec["worker_peak_rss_mb"] >= rec["worker_peak_anon_mb"]
    assert set(rec["unit_io_bytes"]) == {"rchar", "wchar", "read_bytes", "write_bytes"}
    stage.begin()
    assert stage.finalize([0], time.time())
    timings = json.loads((tmp_path / "s" / "manifest.json").read_text())["timings"]
    assert timings["worker_peak_anon_mb"] == rec["worker_peak_anon_mb"]
    assert "worker_peak_file_mb" in timings and "unit_io_bytes" in timings
