"""Semantic dedup at scale: time and peak memory of faiss neighbour search + Union-Find + centroid keep.

python benchmarks/dedup_scale.py [--sizes 100000,1000000] [--dim 256] [--index ivf]
Each size runs in a fresh process (peak RSS is that process's). Vectors: random unit vectors with 10% planted
near-duplicates. Prints one table and appends it to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(n: int, dim: int, index: str) -> dict:
    import numpy as np

    from realsyn_pl.construct.extract.union_find import groups_and_keepers, near_duplicate_pairs

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    dup = n // 10
    x[n - dup:] = x[:dup] + rng.normal(scale=0.02, size=(dup, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.time()
    pairs = near_duplicate_pairs(x, 0.1, k=16, index=index, nlist=max(1, int(4 * n ** 0.5)), nprobe=16,
                                 chunk=65536)
    t1 = time.time()
    _, keep = groups_and_keepers(x, pairs)
    t2 = time.time()
    return {"n": n, "search_s": round(t1 - t0, 1), "union_find_s": round(t2 - t1, 1), "removed": int((~keep).sum()),
            "planted": dup, "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--index", default="ivf", choices=["flat", "ivf"])
    ap.add_argument("--one", type=int, default=0)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.dim, a.index)))
        return
    from _common import append_result

    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--dim", str(a.dim), "--index", a.index],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    head = "| vectors | dim | index | search s | union-find + keep s | removed | planted | peak RSS GiB |\n|---|---|---|---|---|---|---|---|"
    table = head + "".join(f"\n| {r['n']:,} | {a.dim} | {a.index} | {r['search_s']} | {r['union_find_s']} | "
                           f"{r['removed']:,} | {r['planted']:,} | {r['peak_rss_gib']} |" for r in rows)
    print(table)
    append_result("Semantic dedup scale (faiss k=16, cosine distance < 0.1, Union-Find)", table,
                  "IVF: nlist = 4*sqrt(n), nprobe 16. `removed` can differ from `planted` where random pairs fall "
                  "under the threshold or IVF misses a neighbour.")


if __name__ == "__main__":
    main()
