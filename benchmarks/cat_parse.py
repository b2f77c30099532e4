"""The parser CAT rule (sentence_filter with cat_rule=parser): sentences per second per process, three sizes.

python benchmarks/cat_parse.py [--sizes 2000,8000,32000] [--processes 1]
Each size runs the stage's own shard function (`filter_shard`: cheap rules, then spaCy `nlp.pipe` on the
survivors, parquet in and out) over a generated shard of web-style sentences in a fresh process (its peak RSS is
that process's; pipeline load time is reported apart). Fits time ~ n^b and projects to the 2.13B sentences the
paper's quality filter reads. Prints one table and appends it to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PAPER_SENTENCES = 2.13e9

SUBJECTS = ["A young woman", "The old fisherman", "Two children", "Our team", "The museum", "A brown dog",
            "The city council", "Researchers at the institute", "My grandmother", "The new bakery"]
VERBS = ["carries", "opened", "painted", "discovered", "is holding", "built", "announced", "photographed"]
OBJECTS = ["a wooden boat", "the annual report", "a bowl of fresh fruit", "the small garden behind the house",
           "a new exhibition of modern art", "the red bicycle", "its quarterly results", "a rare species of frog"]
TAILS = ["", " on Tuesday", " near the river", " in the morning light", " for the local school"]
BOILER = ["Home | About Us | Contact", "Free shipping on all orders over $50", "Price: $19.99", "Read more",
          "All rights reserved.", "Thanks, that worked for me!"]


def sentences(n: int) -> list[str]:
    out = []
    for i in range(n):
        if i % 5 == 4:
            out.append(BOILER[i // 5 % len(BOILER)])
        else:
            out.append(f"{SUBJECTS[i % 10]} {VERBS[i // 10 % 8]} {OBJECTS[i // 80 % 8]}{TAILS[i // 640 % 5]}.")
    return out


def one(n: int, processes: int) -> dict:
    import tempfile

    from realsyn_pl.construct.engine.config import SentenceFilterConfig
    from realsyn_pl.construct.engine.records import write_records
    from realsyn_pl.construct.engine.schemas import SENTENCES
    from realsyn_pl.construct.extract.cat_parse import load_pipeline
    from realsyn_pl.construct.extract.sentence_stage import filter_shard

    f = SentenceFilterConfig(cat_processes=processes)
    tmp = Path(tempfile.mkdtemp(prefix="cat_parse_"))
    rows = [{"id": f"doc-00000-{i:06d}/s-0", "doc_id": f"doc-00000-{i:06d}", "text": t}
            for i, t in enumerate(sentences(n))]
    write_records(tmp / "in.parquet", rows, SENTENCES)
    t0 = time.time()
    nlp = load_pipeline(f.cat_model)
    t1 = time.time()
    counts = filter_shard(tmp / "in.parquet", tmp / "out.parquet", f, nlp)
    t2 = time.time()
    return {"n": n, "load_s": round(t1 - t0, 2), "run_s": round(t2 - t1, 2), "kept": counts.n_out,
            "cat_dropped": counts.dropped.get("cat_rule", 0),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,8000,32000")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--one", type=int, default=0)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.processes)))
        return
    from _common import append_result

    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--processes", str(a.processes)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    (n0, t0), (n1, t1) = (rows[0]["n"], rows[0]["run_s"]), (rows[-1]["n"], rows[-1]["run_s"])
    b = math.log(t1 / t0) / math.log(n1 / n0)
    rate = n1 / t1
    # Parsing is per sentence and the shard streams, so the work is linear by construction: the projection uses the
    # largest size's rate; the fitted exponent is the check (about 1 within this machine's noise), and where it
    # is above 1 the projection with it is given as the pessimistic bound.
    proj_h = PAPER_SENTENCES / rate / 3600
    bound_h = t1 * (PAPER_SENTENCES / n1) ** b / 3600
    head = ("| sentences | processes | load s | run s | sentences/s | per process | kept | cat_rule dropped | "
            "peak RSS GiB |\n|---|---|---|---|---|---|---|---|---|")
    table = head + "".join(
        f"\n| {r['n']:,} | {a.processes} | {r['load_s']} | {r['run_s']} | {r['n'] / r['run_s']:,.0f} | "
        f"{r['n'] / r['run_s'] / a.processes:,.0f} | {r['kept']:,} | {r['cat_dropped']:,} | {r['peak_rss_gib']} |"
        for r in rows)
    notes = (f"Fitted time ~ n^{b:.2f}. Projection to the paper's {PAPER_SENTENCES / 1e9:.2f}B sentences at the "
             f"largest size's rate ({rate:,.0f} sentences/s, {a.processes} parser process(es) on this 2-core "
             f"machine): {proj_h:,.0f} machine-hours, i.e. {proj_h / 64:,.1f} h on 64 such machines"
             + (f" (with the fitted exponent instead: {bound_h:,.0f} machine-hours)" if b > 1 else "") + ". "
             "Assumptions: the paper's sentences are as long as these (8-14 words; OBELICS sentences average "
             "about 20 words, so expect about 1.5x more), shards stream so memory stays one nlp.pipe batch per "
             "process (peak RSS is flat across sizes), and the stage is embarrassingly parallel over shards and "
             "ranks (no global step), so time divides by the number of parser processes.")
    print(table)
    print(notes)
    append_result("cat_parse: the parser CAT rule (sentence_filter, cat_rule=parser)", table, notes)


if __name__ == "__main__":
    main()
