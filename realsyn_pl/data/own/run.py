"""`python -m realsyn_pl shards input=<folder or table> output_dir=<dir>`: check the output folder, read the input,
write the tars and sizes.json, print the summary and the `fit` command."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from realsyn_pl.config import ConfigError, ShardsConfig
from realsyn_pl.construct.engine.config import DownloadConfig
from realsyn_pl.construct.engine.stage import StageError, write_json
from realsyn_pl.construct.extract import img2dataset_run as i2d
from realsyn_pl.data.own.fetch import write_builtin, write_img2dataset
from realsyn_pl.data.own.inputs import read_inputs
from realsyn_pl.data.own.report import skipped, summary

# What this command (and img2dataset under it) writes in output_dir: all that overwrite=true may delete.
_OURS = re.compile(r"^(\d+\.tar|\d+\.parquet|\d+_stats\.json|sizes\.json|_tmp|\..+\.tmp)$")


def prepare_output(out: Path, overwrite: bool) -> None:
    """An empty output_dir, or with overwrite=true one whose earlier shards are deleted; anything else in it is
    never deleted (a mistyped output_dir must not cost the user a folder)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file: give a folder")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ConfigError(f"output_dir {out} is not empty: give a new folder, or overwrite=true to replace the "
                          "shards in it")
    foreign = [p.name for p in entries if not _OURS.match(p.name)]
    if foreign:
        raise ConfigError(f"output_dir {out} holds {foreign[0]}, which is not a shard: overwrite=true replaces "
                          "shards only; give a new folder")
    for p in entries:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _use_img2dataset(d: DownloadConfig) -> bool:
    try:
        use = i2d.use_img2dataset(d)
        if use:
            i2d.check(d)
    except StageError as err:
        raise ConfigError(str(err)) from None
    if not use and d.fetcher == "auto":
        print('shards: img2dataset is not installed (pip install -e ".[download]"): using the builtin fetcher',
              flush=True)
    return use


def run_shards(cfg: ShardsConfig) -> None:
    out = Path(cfg.output_dir).expanduser().absolute()
    prepare_output(out, cfg.overwrite)
    print(f"shards: reading {cfg.input}", flush=True)
    inputs = read_inputs(cfg)
    if not inputs.rows:
        raise ConfigError(f"input {cfg.input} holds no image with a caption ({skipped(inputs.skips)})")
    print(f"shards: {len(inputs.rows)} images with captions ({inputs.skips.total()} skipped so far); local images "
          f"are read under {inputs.root}", flush=True)
    d = DownloadConfig(image_root=str(inputs.root), threads=cfg.threads, processes=cfg.processes,
                       fetcher=cfg.fetcher, image_size=cfg.image_size)
    use = _use_img2dataset(d)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if use:
            sizes = write_img2dataset(inputs.rows, out, cfg, d, inputs.extra_cols, inputs.skips)
        else:
            sizes = write_builtin(inputs.rows, out, cfg, d, inputs.skips, lambda line: print(line, flush=True))
        write_json(out / "sizes.json", sizes)
    except StageError as err:  # a full disk while writing a tar or sizes.json
        raise ConfigError(str(err)) from None
    for line in summary(out, sizes, inputs.skips, "img2dataset" if use else "builtin", inputs.extra_cols):
        print(line, flush=True)
    if not sum(sizes.values()):
        raise ConfigError(f"no image of {cfg.input} could be read ({skipped(inputs.skips)}); nothing for fit "
                          "to train on")
