"""What `shards` tells the user at the end: samples written, skips by reason with an example each, the shard
pattern, and the `fit` command that trains on them (sized so that fit's defaults accept this many shards and
samples on one device)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from realsyn_pl.config import DataConfig
from realsyn_pl.data.own.inputs import Skips

_PLAIN = re.compile(r"^[\w@%+=:,./{}\- ]*$")  # safe inside "..." in a shell and inside '...' in YAML


def shard_pattern(out: Path, tars: int) -> str:
    return f"{out}/{{00000..{max(tars - 1, 0):05d}}}.tar"


def fit_command(out: Path, tars: int, samples: int, extras: list[str]) -> str:
    pattern = shard_pattern(out, tars)
    train = f"data.train=[{{urls: '{pattern.replace(chr(39), chr(39) * 2)}'}}]"  # YAML doubles a quote in '...'
    parts = ["python", "-m", "realsyn_pl", "fit", f'"{train}"' if _PLAIN.match(pattern) else shlex.quote(train)]
    defaults = DataConfig()
    # fit without resampling needs a shard per loader worker and a whole batch per worker
    workers = min(defaults.workers, tars)
    if workers < defaults.workers:
        parts.append(f"data.workers={workers}")
    if samples < workers * defaults.batch_size:
        parts.append(f"data.batch_size={max(1, samples // max(1, workers))}")
    if extras:
        parts.append(f"data.text_keys=[text1,{','.join(extras)}]")
    return " ".join(parts)


def skipped(skips: Skips) -> str:
    """'skipped N: <reason> <count> (first: <item>); ...', with how to widen the image root when it refused some."""
    if not skips.total():
        return "skipped nothing"
    items = [f"{reason} {n} (first: {skips.first[reason]})" for reason, n in sorted(skips.counts.items())]
    line = f"skipped {skips.total()}: " + "; ".join(items)
    if skips.outside:
        line += f"; to read the images outside the image root, set image_root={skips.outside}"
    return line


def summary(out: Path, sizes: dict[str, int], skips: Skips, fetcher: str, extras: list[str]) -> list[str]:
    samples, tars = sum(sizes.values()), len(sizes)
    return [f"shards: wrote {samples} samples in {tars} tar(s) to {out} (fetcher: {fetcher}; counts: "
            f"{out / 'sizes.json'})",
            f"shards: {skipped(skips)}",
            f"shards: {shard_pattern(out, tars)}",
            f"next: {fit_command(out, tars, samples, extras)}"]
