"""`build all` runs stage 3 (mine_tags, caption, tag, syn_text) between retrieve and balance, and the released
shards carry the syn_text the rewriter wrote for their image."""
import base64
import json

import pytest

from generate_support import ROOT, stage3_overrides, stage_rows, tiny_captioner
from realsyn_pl.cli import main
from realsyn_pl.construct.engine.records import iter_rows
from support import build_overrides, png, tiny_lm


@pytest.mark.slow
def test_build_all_runs_stage3_between_retrieve_and_balance(tmp_path, capsys):
    docs = [{"texts": [f"A man riding a red bike on the street number {k}.",
                       f"Two dogs play in the green park near house {k}.",
                       "A woman holding an umbrella walks down the road."],
             "images": [{"bytes": base64.b64encode(png(120 + k, 110, (k * 5 % 255, 40, 90))).decode()}]}
            for k in range(24)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    work = tmp_path / "work"
    # the preset's model stages turned back on with local models, as its header says
    ov = build_overrides(work, [corpus], **{"perplexity.model": str(tiny_lm(tmp_path / "lm")),
                                            "perplexity.enabled": "true"})
    s3 = stage3_overrides(work, tiny_captioner(tmp_path / "cap"), **{"rewrite.backend": "template",
                                                                      "caption.enabled": "true"})[2:]
    assert main(["build", "all", "--config", str(ROOT / "configs/build/tiny_cpu.yaml")] + ov + s3 +
                ["sentence_filter.cat_rule='off'", "entropy.threshold=0", "mine_tags.min_count=1",
                 "dedup.semantic=false"]) == 0
    order = [line.split(":")[0].split("] ")[1] for line in capsys.readouterr().out.splitlines()
             if line.startswith("[build] ") and ": in " in line]
    assert order.index("retrieve") < order.index("mine_tags") < order.index("caption") < order.index("tag") \
        < order.index("syn_text") < order.index("embed_syn_text") < order.index("balance")
    syn = {r["id"]: r["syn_text"] for r in stage_rows(work, "syn_text", "images")}
    assert len(syn) == 24
    written = list(iter_rows(sorted((work / "write").glob("*.parquet"))))
    assert written and all(r["syn_text"] in syn.values() for r in written)
