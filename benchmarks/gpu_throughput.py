"""Throughput of every GPU stage of the build at the paper's model sizes on one GPU, and the GPU-hours of the paper's
build these numbers give.

    python benchmarks/gpu_throughput.py              # one GPU: ~8 minutes on an H100, appended to docs/benchmarks.md
    python benchmarks/gpu_throughput.py --dry-run    # CPU, tiny shapes, every part: the code path, no measurement
    [--parts embed,perplexity,caption,rewrite,vllm,fit,dedup,retrieval] [--budget-s 15]

Parts (benchmarks/_gpu_parts.py), each with random weights built from a config (nothing is downloaded at run time):
EVA02-E-14-plus image and text embedding (bf16-mixed, 16-mixed), GPT-2-large perplexity (fp32 against
bf16-fp32-logits), a BLIP-base captioner, a Llama-3-8B-shaped rewriter (HF generate; vLLM where it imports),
ViT-B/32 `fit` against `open_clip_train` (same GPU, shards, batch), dedup pair blocks and retrieval buckets. Each
measurement: one warm-up call, then timed calls until 5 of them or --budget-s seconds. A part whose package is
missing, or that fails (out of memory, say), is a row with the reason, and the others still run. Then the
projection (_gpu_projection.py): each stage's item count in the paper over the measured rate.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from _common import append_result, scratch_dir  # noqa: E402
from _gpu_parts import PARTS, Plan, Row, finite, paper_sizes  # noqa: E402
from _gpu_projection import PAPER, anchors_table, projection_table  # noqa: E402

DRY_MARK = "dry run (CPU, tiny shapes): not a measurement"


def make_plan(dry: bool, budget_s: float, scratch: Optional[Path] = None) -> Plan:
    import torch

    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_throughput: no CUDA device; --dry-run runs the parts on the CPU at tiny shapes")
    return Plan(dry=dry, device="cpu" if dry else "cuda", warmup=1, iters=2 if dry else 5,
                budget_s=budget_s, scratch=scratch or scratch_dir("gpu_bench_"))


def device_name(plan: Plan) -> str:
    import torch

    return "CPU (dry run)" if plan.dry else torch.cuda.get_device_name(0)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"failed: {type(err).__name__}: {text[:200]}"


def run_parts(plan: Plan, parts: list[str]) -> tuple[list[Row], dict[str, float]]:
    """Every part's rows (a failed part: one row saying why) and each part's wall seconds."""
    import gc

    import torch

    rows, walls = [], {}
    for name in parts:
        t0 = time.perf_counter()
        try:
            rows += PARTS[name](plan)
        except Exception as err:  # one part's failure (out of memory, a missing package) must not stop the others
            rows.append(Row(name, "", "", "", None, "", one_line(err)))
        walls[name] = time.perf_counter() - t0
        print(f"{name}: {walls[name]:.0f} s", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows, walls


def fmt(x: float) -> str:
    return f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


def table(rows: list[Row], gpu: str) -> str:
    lines = ["| part | model / shape | precision | batch | throughput | unit | device |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = fmt(r.value) if finite(r.value) else f"skipped: {r.skip}"
        lines.append(f"| {r.part} | {r.model} | {r.precision} | {r.batch} | {value} | {r.unit} | {gpu} |")
    return "\n".join(lines)


def report(rows: list[Row], walls: dict[str, float], plan: Plan, sizes: dict[str, int]) -> tuple[str, str]:
    """(the tables, the notes) of one run."""
    gpu = device_name(plan)
    text = (table(rows, gpu) + "\n\nGPU-hours of the paper's build from these rates:\n\n" + projection_table(rows, gpu)
            + "\n\nPublic anchors beside this run:\n\n" + anchors_table(rows, gpu))
    built = ", ".join(f"{k} {v / 1e9:.2f}B" for k, v in sizes.items())
    notes = [f"Wall time per part (s): {', '.join(f'{k} {v:.0f}' for k, v in walls.items())}; in all "
             f"{sum(walls.values()) / 60:.1f} min. Paper-size models, random weights from their configs (parameters, "
             f"as built on the meta device): {built}.", *PAPER]
    if plan.dry:
        text = f"**{DRY_MARK}**\n\n{text}"
    return text, "\n\n".join(notes)


def main(argv: Optional[list[str]] = None) -> tuple[list[Row], str, str]:
    """Runs the parts; returns (rows, tables, notes) as printed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the code path, not a measurement; "
                    "docs/benchmarks.md is left alone")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=15.0, help="timed seconds per measurement at most")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    plan = make_plan(args.dry_run, args.budget_s)
    rows, walls = run_parts(plan, parts)
    text, notes = report(rows, walls, plan, paper_sizes())
    print(text + "\n\n" + notes)
    if not plan.dry:
        append_result(f"gpu_throughput on {device_name(plan)}", text, notes)
    return rows, text, notes


if __name__ == "__main__":
    main()
