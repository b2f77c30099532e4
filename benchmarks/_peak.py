"""Run `python -m realsyn_pl ...` and write this process's own peak RSS (VmHWM, bytes) to $PEAK_FILE at exit.

A child's rusage ru_maxrss also counts the memory of the parent it was forked from (Linux keeps the high-water
mark across exec), so a benchmark holding a large pool would inflate every stage's number; VmHWM belongs to the
new program's address space only.
"""
import atexit
import os
import runpy
import sys


def _report() -> None:
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_FILE"], "w") as fh:
        fh.write(str(kib * 1024))


atexit.register(_report)
sys.argv = ["realsyn_pl", *sys.argv[1:]]
runpy.run_module("realsyn_pl", run_name="__main__", alter_sys=True)
