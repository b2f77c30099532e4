"""Wall time of `python -m realsyn_pl eval` vs `clip_benchmark eval` on the same model and dataset (target: <= 1.0x).

    python benchmarks/eval_speed.py [--n-test 1000] [--px 64] [--workers 2] [--repeats 3]

Generates a 24-class classification set and a retrieval set (the shape world, clip-benchmark's wds layout), saves a
random-init tiny CLIP checkpoint, times both tools end to end (process start to exit, on CPU, same batch size and
workers) for zero-shot classification and retrieval, each with amp on (both tools' default autocast) and off
(`amp=false` vs `--no_amp`), checks the metrics agree, prints one table and appends it to docs/benchmarks.md with the
machine and date. The two tools alternate --repeats times and the table shows the median
wall time of each (shared CPUs make single runs noisy); every run's metrics must agree.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}
NAME = "realsyn-bench-tiny"


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:6])} ...\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import open_clip
    from _common import scratch_dir

    from realsyn_pl.evaluation import synthetic
    from realsyn_pl.models.factory import register_model_config
    work = scratch_dir("eval_speed_")
    cls = synthetic.write_classification(work / "shapes", {"test": args.n_test}, px=args.px, per_shard=250)
    ret = synthetic.write_retrieval(work / "captions", args.n_test, px=args.px, per_shard=250)
    register_model_config(NAME, TINY)
    torch.manual_seed(0)
    ckpt = work / "tiny.pt"
    torch.save(open_clip.create_model(NAME).state_dict(), ckpt)
    (work / "tiny.json").write_text(json.dumps(TINY))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    load_before = _uptime()
    rows = []
    for amp in (True, False):
        for key, root, task in [("shapes", cls, "zeroshot_classification"), ("captions", ret, "zeroshot_retrieval")]:
            rows.append(_compare(args, work, ckpt, key, root, task, amp, env))
    load_after = _uptime()
    header = ("| task | amp | images | realsyn_pl eval (s) | clip_benchmark eval (s) | ratio | same metrics | "
              "range ours / cb (s) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t} | {'on' if a else 'off (--no_amp)'} | {n} | {o:.1f} | {c:.1f} | {r:.2f}x | {s} | {rg} |"
              for t, a, n, o, c, r, s, rg in rows]
    table = "\n".join(lines)
    print(table)
    from _common import append_result

    notes = (f"CPU only (amp on = torch.autocast('cpu'), bf16, in both tools), {args.threads} threads, {args.workers} "
             f"loader workers, batch {args.batch_size}, tiny CLIP ({TINY['vision_cfg']['layers']}-layer towers), "
             f"{args.px}px images. Wall time per process, start to exit, median of {args.repeats} alternating runs; "
             f"realsyn_pl eval amp=<setting> against clip_benchmark eval with the same setting; target ratio <= 1.0x. "
             f"uptime before: {load_before}; after: {load_after}. ")
    worst = max(r[5] for r in rows)
    notes += f"target <= 1.0x: {'met' if worst <= 1.0 else 'not met'} (largest ratio {worst:.2f}x)."
    append_result("eval_speed", table, notes)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def _compare(args, work: Path, ckpt: Path, key: str, root: Path, task: str, amp: bool, env: dict) -> tuple:
    metric = "acc1" if task == "zeroshot_classification" else "recall"
    entry = f"{{key: {key}, dataset: wds/{key}, root: '{root}', tasks: [{task}], metric: {metric}}}"
    ours_out = work / f"ours_{key}_{amp}"
    ours_cmd = [sys.executable, "-m", "realsyn_pl", "eval", f"model.name={NAME}",
                f"model.custom={json.dumps(TINY)}", f"model.pretrained={ckpt}", f"datasets=[{entry}]",
                f"output_dir={ours_out}", f"workers={args.workers}", f"batch_size={args.batch_size}",
                "trainer.accelerator=cpu", "trainer.devices=1", f"amp={str(amp).lower()}"]
    cb_out = work / f"cb_{key}_{amp}.json"
    cb_cmd = [sys.executable, "-m", "realsyn_pl.evaluation.clip_benchmark_cli", "--model-config",
              f"{NAME}={work / 'tiny.json'}", "--", "eval", "--model", NAME, "--pretrained", str(ckpt),
              "--dataset", f"wds/{key}", "--dataset_root", str(root), "--task", task] + ([] if amp else ["--no_amp"]) + [
              "--num_workers", str(args.workers), "--batch_size", str(args.batch_size), "--recall_k", "1", "5",
              "10", "--output", str(cb_out), "--quiet"]
    ours_t, cb_t, same = [], [], True
    for _ in range(args.repeats):
        ours_t.append(timed(ours_cmd, env))
        cb_t.append(timed(cb_cmd, env))
        summary = json.loads((ours_out / "summary.json").read_text())
        a = json.loads(Path(summary["results"][0]["file"]).read_text())["metrics"]
        b = json.loads(cb_out.read_text())["metrics"]
        same = same and all(abs(a[k] - v) <= 1e-6 for k, v in b.items())
        print(f"{task} amp={amp}: realsyn_pl {ours_t[-1]:.1f}s, clip_benchmark {cb_t[-1]:.1f}s", flush=True)
    ours, cb = statistics.median(ours_t), statistics.median(cb_t)
    return (task, amp, args.n_test, ours, cb, ours / cb, "yes" if same else "NO",
            f"{min(ours_t):.1f}-{max(ours_t):.1f} / {min(cb_t):.1f}-{max(cb_t):.1f}")


if __name__ == "__main__":
    main()
