"""A reduced `realsyn_pl demo`: the numbers in its report are real, its counts conserve, and it is deterministic."""
import json
import re

import pytest

from realsyn_pl.cli import main

REDUCED = ["corpus.documents=400", "teacher_pairs=1200", "teacher_epochs=5", "student.trainer.max_epochs=5",
           "student.data.batch_size=64", "balance_cap=40", "eval_train=120", "eval_test=96",
           "variants=[realsyn,random_pairing]"]


def _table(report: str) -> dict[str, list[str]]:
    rows = {}
    for line in report.splitlines():
        m = re.match(r"\| (realsyn|random_pairing|adjacent_text|realsyn_random_sampling) \| (.*) \|$", line)
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
    assert zero_shot["realsyn"] > 3 * 100 / 24, report  # chance is 4.2 %
    assert zero_shot["realsyn"] > zero_shot["random_pairing"], report
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
