"""Run clip-benchmark's own CLI with custom open_clip architectures registered first.

    python -m realsyn_pl.evaluation.clip_benchmark_cli --model-config NAME=CONFIG.json [...] -- eval --model NAME ...

Everything after `--` is `clip_benchmark`'s own command line. clip-benchmark creates models by open_clip name; a
custom architecture (the demo's and tiny presets' `model.custom`; `fit` writes it as export/<name>.json beside
export/open_clip_model.pt) only exists once its config is registered, which this does before handing the remaining
arguments to `clip_benchmark.cli.main`. Used by the tests and benchmarks/eval_speed.py to compare against the
reference implementation; README.md (eval options) shows a full command.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

USAGE = ("usage: python -m realsyn_pl.evaluation.clip_benchmark_cli [--model-config NAME=CONFIG.json ...] -- "
         "eval --model NAME --pretrained WEIGHTS ...")


class UsageError(ValueError):
    """A wrong command line; the message is one line meant for the user."""


def read_model_config(spec: str) -> tuple[str, Any]:
    """`NAME=CONFIG.json` -> (NAME, the parsed open_clip model config)."""
    name, _, path = spec.partition("=")
    if not name or not path:
        raise UsageError(f"--model-config wants NAME=CONFIG.json, got {spec!r}")
    try:
        return name, json.loads(Path(path).read_text())
    except OSError as err:
        raise UsageError(f"--model-config {name}: cannot read {path} ({err.strerror or err})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--model-config {name}: {path} is not JSON ({err})") from None


def split_args(argv: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """The model configs to register (read and checked before anything runs) and clip_benchmark's arguments."""
    if "--" not in argv:
        raise UsageError("clip_benchmark's arguments go after `--` (" + USAGE.removeprefix("usage: ") + ")")
    cut = argv.index("--")
    ours, rest = argv[:cut], argv[cut + 1:]
    configs, i = [], 0
    while i < len(ours):
        if ours[i] == "--model-config" and i + 1 < len(ours):
            configs.append(read_model_config(ours[i + 1]))
            i += 2
        elif ours[i].startswith("--model-config="):
            configs.append(read_model_config(ours[i].split("=", 1)[1]))
            i += 1
        else:
            raise UsageError(f"unexpected argument {ours[i]!r} before `--` ({USAGE.removeprefix('usage: ')})")
    return configs, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    try:
        configs, rest = split_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from clip_benchmark import cli

    from realsyn_pl.models.factory import register_model_config

    for name, config in configs:
        register_model_config(name, config)
    sys.argv = ["clip_benchmark"] + rest
    cli.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
