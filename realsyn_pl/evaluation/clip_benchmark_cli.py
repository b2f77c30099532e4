"""Run clip-benchmark's own CLI with custom open_clip architectures registered first.

    python -m realsyn_pl.evaluation.clip_benchmark_cli --model-config NAME=CONFIG.json [...] -- eval --model NAME ...

clip-benchmark creates models by open_clip name; a custom architecture (e.g. a tiny test model) only exists once its
config is registered, which this does before handing the remaining arguments to `clip_benchmark.cli.main`.
Used by the tests and benchmarks/eval_speed.py to compare against the reference implementation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(spec: str) -> None:
    from realsyn_pl.models.factory import register_model_config

    name, _, path = spec.partition("=")
    if not name or not path:
        raise SystemExit(f"error: --model-config wants NAME=CONFIG.json, got {spec!r}")
    register_model_config(name, json.loads(Path(path).read_text()))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m realsyn_pl.evaluation.clip_benchmark_cli --model-config NAME=CFG.json -- eval ...")
    cut = argv.index("--")
    ours, rest = argv[:cut], argv[cut + 1:]
    i = 0
    while i < len(ours):
        if ours[i] == "--model-config" and i + 1 < len(ours):
            register(ours[i + 1])
            i += 2
        else:
            raise SystemExit(f"error: unexpected argument {ours[i]!r}")
    from clip_benchmark import cli

    sys.argv = ["clip_benchmark"] + rest
    cli.main()


if __name__ == "__main__":
    main()
