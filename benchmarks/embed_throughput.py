"""Embedding throughput: the build's Lightning predict loop (reading shards, writing fp16 arrays) vs a bare torch
loop over the same model and the same decoded, preprocessed images. Target: predict loop >= 0.95x bare.

python benchmarks/embed_throughput.py [--images 512] [--batch 64] [--model tiny|ViT-B-32] [--device cpu|cuda]
Prints one table and appends it to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


def corpus(folder: Path, n: int, files: int = 4) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        rows = []
        for i in range(n // files):
            buf = io.BytesIO()
            Image.new("RGB", (160, 120), ((f * 40) % 255, i % 255, 80)).save(buf, format="JPEG")
            rows.append({"texts": [], "images": [{"bytes": base64.b64encode(buf.getvalue()).decode()}]})
        p = folder / f"{f:03d}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths


def main() -> None:
    import torch
    import torch.nn.functional as F

    from realsyn_pl.config import load_config, to_object
    from realsyn_pl.construct.engine.config import BuildConfig
    from realsyn_pl.construct.engine.pipeline import run_build
    from realsyn_pl.construct.engine.records import iter_rows
    from realsyn_pl.construct.extract.model_stages import EmbedTask

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    from _common import scratch_dir
    tmp = scratch_dir("embed_bench_")
    paths = corpus(tmp / "corpus", a.images)
    ov = [f"work_dir={tmp / 'work'}", "input.paths=[" + ",".join(map(str, paths)) + "]", "progress=false",
          f"embed.batch_size={a.batch}", f"embed.workers={a.workers}", f"trainer.accelerator={a.device}",
          "embed.model.pretrained=null"]
    ov += (["embed.model.name=realsyn-bench-tiny", f"embed.model.custom={json.dumps(TINY)}"] if a.model == "tiny"
           else [f"embed.model.name={a.model}"])
    cfg = to_object(load_config(BuildConfig, [], ov))
    for st in ("extract", "download", "image_filter"):
        cfg.stage = st
        run_build(cfg)
    task = EmbedTask(cfg, "embed_images")
    shards = sorted((tmp / "work" / "image_filter").glob("images-*.parquet"))
    model = task.bundle.model.to(a.device).eval()
    # bare loop: decode + preprocess + forward + normalise + copy to host, same batches, no Lightning, no writing
    t0, n = time.time(), 0
    with torch.inference_mode():
        for path in shards:  # the bytes live in the download shard of the same index (src_row)
            task.begin_shard(int(path.stem.split("-")[1]), path)
            rows = list(iter_rows(path, task.columns))
            n += len(rows)
            for i in range(0, len(rows), a.batch):
                x = torch.stack([task.load(r) for r in rows[i:i + a.batch]]).to(a.device)
                F.normalize(model.encode_image(x).float(), dim=-1).cpu().numpy()
    bare = time.time() - t0
    cfg.stage = "embed_images"
    t0 = time.time()
    run_build(cfg)
    loop = time.time() - t0
    table = ("| model | device | images | batch | bare torch img/s | predict loop img/s | ratio |\n|---|---|---|---|---|---|---|"
             f"\n| {a.model} | {a.device} | {n} | {a.batch} | {n / bare:.1f} | {n / loop:.1f} | {bare / loop:.2f} |")
    print(table)
    from _common import append_result

    append_result("Embedding predict loop vs bare torch loop", table,
                  "The predict-loop time is the stage as `build` runs it: Ray's start, the model actors' start "
                  "(imports, model load), Trainer start-up, reading shards, DataLoader workers and writing fp16 arrays "
                  "+ ids + markers; the bare loop decodes in the main process and writes nothing.")


if __name__ == "__main__":
    main()
