"""A reduced `realsyn_pl demo`: the numbers in its report are real, its counts conserve, the orderings the full demo
shows hold, and it is deterministic."""
import json
import re

import pytest

from realsyn_pl.cli import main

REDUCED = ["corpus.documents=400", "teacher_pairs=1200", "teacher_epochs=5", "student.trainer.max_epochs=5",
           "student.data.batch_size=64", "balance_cap=20", "eval_train=120", "eval_test=96",
           "variants=[realsyn,realsyn_text1,random_pairing]"]
VARIANT_ROW = re.compile(r"\| (realsyn|realsyn_text1|realsyn_text1_3|realsyn_random_sampling|random_pairing|adjacent_text) "
                         r"\| (.*) \|$")


def _table(report: str) -> dict[str, list[str]]:
    rows = {}
    for line in report.splitlines():
        m = VARIANT_ROW.match(line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


@pytest.mark.slow
def test_reduced_demo_beats_chance_and_random_pairing_and_is_deterministic(tmp_path):
    out = tmp_path / "a"
    assert main(["demo", f"output_dir={out}", *REDUCED]) == 0
    report = (out / "report.md").read_text()
    rows = _table(report)
    zero_shot = {name: float(cells[2]) for name, cells in rows.items()}
    assert set(zero_shot) == {"realsyn", "realsyn_text1", "random_pairing"}
    assert all(re.fullmatch(r"[\d.]+", rows[name][c]) for name in rows for c in (4, 5))  # head / tail zero-shot
    # Orderings: RealSyn above random pairing, which holds at this size. Not asserted: the full demo's text1-3 above
    # text1 (19.6 vs 15.0 over 240 held-out images, ~1.3 standard errors) and RealSyn above adjacent text do not
    # hold reliably at this size (377 pairs, 96 test images); syn_text on top of text1-3 and balance above random
    # sampling on accuracy, two claims of the paper, do not hold in the full demo either.
    assert zero_shot["realsyn"] > 3 * 100 / 24, report  # chance is 4.2 %
    assert zero_shot["realsyn"] > zero_shot["random_pairing"], report
    # the text-ablation table beside the paper's own Table 6 rows, and a per-text accuracy line for every variant
    for label, paper in (("text1", "70.3 | 42.4 | 25.7"), ("text1-3 \\+ syn_text", "71.4 | 47.9 | 31.5")):
        assert re.search(rf"^\| {label} \| [\d.]+ \| [\d.]+ \| .* \| {paper} \|$", report, re.M), label
    accuracy = {m.group(1): dict((k, float(v)) for k, v in re.findall(r"(\w+) ([\d.]+)%", m.group(2)))
                for m in re.finditer(r"^- (realsyn\w*|adjacent_text|random_pairing): (.*)$", report, re.M)}
    assert {k: sorted(v) for k, v in accuracy.items()} == {
        "realsyn": ["syn_text", "text1", "text2", "text3"], "realsyn_text1": ["text1"], "random_pairing": ["text1"]}
    # confident tags only: syn_text no longer names the object far less often than text1 (top-3 tags: half as often)
    tag = json.loads((out / "build" / "tag" / "manifest.json").read_text())
    assert tag["config"]["select"] == "margin" and tag["counts"]["produced"]["no_confident_tags"] > 0
    assert accuracy["realsyn"]["syn_text"] > accuracy["realsyn"]["text1"] - 5, report
    # balance sampling gives the tail concepts a larger share than random sampling at equal size
    from realsyn_pl.demo import baselines
    from realsyn_pl.demo.report import text_accuracy
    from realsyn_pl.demo.run import DemoConfig, head_tail

    corpus = baselines.Corpus(out / "corpus")
    tail = frozenset(head_tail(DemoConfig())[1])
    balanced = text_accuracy(out / "build" / "write", corpus, tail)
    drawn = baselines.random_sample_shards(out / "build" / "balance", out / "build" / "dedup_images",
                                           balanced["n"], 0, tmp_path / "random_sampling")
    assert balanced["tail_share"] > text_accuracy(drawn, corpus, tail)["tail_share"]
    assert "**NO**" not in report  # every stage: kept + dropped = in
    for manifest in (out / "build").glob("*/manifest.json"):
        c = json.loads(manifest.read_text())["counts"]
        assert c["n_in"] == c["n_out"] + sum(c["dropped"].values()), manifest
    # the dataset card puts each filtering step's removal beside the paper's
    from realsyn_pl.construct.release.card import PAPER_REMOVAL

    card = (out / "build" / "write" / "card.md").read_text()
    for label, stages, paper in PAPER_REMOVAL:
        row = rf"\| {re.escape(label)} \| {', '.join(stages)} \| \d+ \| [\d.]+% \| {paper:.1%} \|"
        assert re.search(row, card), label

    # Same seed, fresh folder: the same teacher and RealSyn shards, byte for byte (no students this time).
    again = tmp_path / "b"
    assert main(["demo", f"output_dir={again}", *REDUCED[:-1], "variants=[]"]) == 0
    assert not _table((again / "report.md").read_text())
    first = sorted((out / "build" / "write").glob("*.tar"))
    assert first and [p.read_bytes() for p in first] == \
        [p.read_bytes() for p in sorted((again / "build" / "write").glob("*.tar"))]
