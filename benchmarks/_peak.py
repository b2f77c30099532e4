"""Run `python -m realsyn_pl ...` and write this process's own memory to $PEAK_FILE at exit, as JSON: `vmhwm_bytes`
(VmHWM: the high-water mark of everything resident, memory-mapped files included), `anon_mb` and `file_mb` (the
largest RssAnon and RssFile seen, sampled every 20 ms by realsyn_pl's unit meter over the whole run).

A child's rusage ru_maxrss also counts the memory of the parent it was forked from (Linux keeps the high-water
mark across exec), so a benchmark holding a large pool would inflate every stage's number; VmHWM and the Rss lines
belong to the new program's address space only.
"""
import atexit
import json
import os
import runpy
import sys

from realsyn_pl.construct.engine.memory import UnitMeter

_meter = UnitMeter()  # its own instance: the driver's units (ray.in_process) keep using the shared one


def _report() -> None:
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    got = _meter.lap() or {}
    with open(os.environ["PEAK_FILE"], "w") as fh:
        json.dump({"vmhwm_bytes": kib * 1024, "anon_mb": got.get("worker_peak_anon_mb", 0.0),
                   "file_mb": got.get("worker_peak_file_mb", 0.0)}, fh)


_meter.start()
atexit.register(_report)
sys.argv = ["realsyn_pl", *sys.argv[1:]]
runpy.run_module("realsyn_pl", run_name="__main__", alter_sys=True)
