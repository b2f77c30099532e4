"""The train loader alone (read, decode, augment, tokenize, batch; no model): realsyn_pl's shard reader vs
open_clip_train's own webdataset pipeline (get_wds_dataset) on the same shards, workers and batch size.
Targets: >= 1.0x open_clip's samples/s, <= 1.1x its peak RSS. Also: time to the first batch after a mid-epoch
resume at 90 % of an epoch vs a cold start (the skipped batches are passed over at the tar-member level).

    python benchmarks/loader_throughput.py [--samples 3000] [--batch 64] [--workers 2] [--px 256]

Each measurement runs in a fresh process; peak RSS is the sampled maximum of the summed RSS of the process and its
loader workers. Both loaders shuffle with a 5000-sample buffer (open_clip's fixed _SAMPLE_SHUFFLE_SIZE), read the
.txt caption, apply open_clip's ViT-B-32 train transform (224 px RandomResizedCrop) and its tokenizer.
Prints one table and appends it to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUFFER = 5000


class PeakRSS:
    """Samples the RSS of this process plus its children every 20 ms."""

    def __init__(self) -> None:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                total = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(True))
            except Exception:  # a worker exiting between listing and reading
                total = 0
            self.peak = max(self.peak, total)
            time.sleep(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30


def transform_and_tokenizer():
    import open_clip

    transform = open_clip.image_transform(224, is_train=True)
    return transform, open_clip.get_tokenizer("ViT-B-32")


def ours(shards: str, batch: int, workers: int, skip_fraction: float) -> dict:
    from realsyn_pl.config import DataConfig, SourceConfig
    from realsyn_pl.data.shards import ClipShardDataset, ShardLoader, plan_batches, resolve_sources
    from realsyn_pl.data.texts import TextChooser

    transform, tokenizer = transform_and_tokenizer()
    cfg = DataConfig(train=[SourceConfig(urls=shards)], text_keys=["text1"], batch_size=batch, workers=workers,
                     shuffle_buffer=BUFFER)
    sources = resolve_sources(cfg)
    per_worker = plan_batches(sum(s.num_samples for s in sources), 1, workers, batch)
    ds = ClipShardDataset(sources, transform, tokenizer, TextChooser.create(cfg.text_keys, None), batch, per_worker,
                          0, 1, False, BUFFER, 0, cfg.image_keys)
    length = per_worker * max(1, workers)
    skip = int(length * skip_fraction)
    loader = ShardLoader(ds, workers, length, lambda: 0, resume={"epoch": 0, "batches_done": skip} if skip else None)
    return measure(loader, batch)


def open_clip_loader(shards: str, batch: int, workers: int, num_samples: int) -> dict:
    from open_clip_train.data import get_wds_dataset

    transform, tokenizer = transform_and_tokenizer()
    args = SimpleNamespace(train_data=shards, val_data=None, dataset_resampled=False, train_num_samples=num_samples,
                           train_data_upsampling_factors=None, seed=0, batch_size=batch, world_size=1,
                           workers=workers)
    info = get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer)
    return measure(info.dataloader, batch)


def measure(loader, batch: int) -> dict:
    rss = PeakRSS()
    start = time.perf_counter()
    first, n = None, 0
    for b in loader:
        if first is None:
            first = time.perf_counter() - start
        n += int(b[0].shape[0] if isinstance(b, (list, tuple)) else b["image"].shape[0])
    total = time.perf_counter() - start
    return {"samples": n, "first_batch_s": round(first or 0.0, 2), "wall_s": round(total, 2),
            "samples_per_s": round(n / total, 1), "peak_rss_gib": round(rss.stop(), 2)}


LOADED_NOTE = " (loaded: other jobs shared the cores, so the times are noisy)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--one", default="")
    ap.add_argument("--shards", default="")
    ap.add_argument("--skip", type=float, default=0.0)
    a = ap.parse_args()
    if a.one == "ours":
        print(json.dumps(ours(a.shards, a.batch, a.workers, a.skip)))
        return
    if a.one == "open_clip":
        print(json.dumps(open_clip_loader(a.shards, a.batch, a.workers, a.samples)))
        return
    from _common import append_result, scratch_dir

    from realsyn_pl.demo.world import write_world_shards

    per_shard = max(1, a.samples // 16)
    folder = write_world_shards(scratch_dir("loader_bench_") / "shards", a.samples, per_shard, seed=0, px=a.px)
    n_shards = len(json.loads((folder / "sizes.json").read_text()))
    urls = f"{folder}/{{00000..{n_shards - 1:05d}}}.tar"
    load_before = os.getloadavg()[0]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def child(which: str, skip: float = 0.0) -> dict:
        cmd = [sys.executable, __file__, "--one", which, "--shards", urls, "--batch", str(a.batch), "--workers",
               str(a.workers), "--samples", str(a.samples), "--skip", str(skip)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(out.stderr[-4000:])
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = {"open_clip_train get_wds_dataset": child("open_clip"), "realsyn_pl ClipShardDataset": child("ours"),
            "realsyn_pl, resumed at 90 % of the epoch": child("ours", 0.9)}
    load_after = os.getloadavg()[0]
    ref, mine = rows["open_clip_train get_wds_dataset"], rows["realsyn_pl ClipShardDataset"]
    head = ("| loader | samples | first batch s | wall s | samples/s | peak RSS GiB |\n|---|---|---|---|---|---|")
    table = head + "".join(f"\n| {k} | {r['samples']:,} | {r['first_batch_s']} | {r['wall_s']} | {r['samples_per_s']} | "
                           f"{r['peak_rss_gib']} |" for k, r in rows.items())
    ratio_speed = mine["samples_per_s"] / max(ref["samples_per_s"], 1e-9)
    ratio_rss = mine["peak_rss_gib"] / max(ref["peak_rss_gib"], 1e-9)
    resumed = rows["realsyn_pl, resumed at 90 % of the epoch"]
    table += (f"\n\nrealsyn_pl / open_clip_train: {ratio_speed:.2f}x samples/s (target >= 1.0), {ratio_rss:.2f}x peak "
              f"RSS (target <= 1.1). First batch after a resume at 90 %: {resumed['first_batch_s']} s vs "
              f"{mine['first_batch_s']} s cold.")
    notes = (f"{a.samples} samples of {a.px} px JPEGs in {n_shards} shards, batch {a.batch}, {a.workers} worker(s), "
             f"shuffle buffer {BUFFER}, .txt captions, open_clip ViT-B-32 train transform + tokenizer, one epoch each. "
             f"open_clip_train rolls its epoch up to whole batches per worker (ceil), realsyn_pl down (floor), so the "
             f"sample counts differ slightly; samples/s is per loader. Load average before/after: {load_before:.2f} / "
             f"{load_after:.2f} on {os.cpu_count()} cores{LOADED_NOTE if load_before > 0.5 * os.cpu_count() else ' (idle)'}."
             " The resumed row counts only the batches after the skip.")
    print(table)
    print(notes)
    append_result("Train loader throughput (benchmarks/loader_throughput.py)", table, notes)


if __name__ == "__main__":
    main()
