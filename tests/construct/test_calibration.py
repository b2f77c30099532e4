"""Calibration against the paper's removal fractions: quantile modes for entropy and dedup reach the fraction asked
for, the log base scales theta as documented, and the dataset card puts every filter's removal beside the paper's."""
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from realsyn_pl.cli import main
from realsyn_pl.construct.extract.entropy import sentence_entropy
from realsyn_pl.construct.release.card import PAPER_REMOVAL, removal_rows, write_card


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from realsyn_pl.demo.corpus import CorpusConfig, write_corpus
    from support import IN_PROCESS, build_overrides

    root = tmp_path_factory.mktemp("calib")
    files = write_corpus(root / "corpus", CorpusConfig(documents=120, docs_per_file=60))
    work = root / "work"
    ov = build_overrides(work, files, fmt="obelics", **{
        "download.enabled": "false", "perplexity.enabled": "false", "sentence_filter.cat_rule": "approximate",
        "entropy.mode": "quantile", "entropy.quantile": 0.2, "dedup.mode": "quantile", "dedup.quantile": 0.3,
        "dedup.max_threshold": 1.0, "dedup_text": "{mode: quantile, quantile: 0.25, max_threshold: 1.0}",
        **IN_PROCESS})
    assert main(["build", "all", "until=dedup_sentences"] + ov) == 0
    return work


def manifest(work, stage):
    return json.loads((work / stage / "manifest.json").read_text())


def test_entropy_quantile_drops_the_asked_fraction(calibrated):
    m = manifest(calibrated, "entropy")
    c, t = m["counts"], m["entropy_threshold"]
    assert t["mode"] == "quantile" and t["sample"] == c["n_in"]  # the whole (small) pool is the sample
    dropped = c["dropped"].get("low_entropy", 0) / c["n_in"]
    assert 0.1 <= dropped <= 0.2  # the 20 % lowest, fewer where short sentences tie at the cut
    kept = [r for f in sorted((calibrated / "entropy").glob("sentences-*.parquet"))
            for r in pq.read_table(f).column("entropy").to_pylist()]
    assert min(kept) >= t["threshold"]


@pytest.mark.parametrize("stage,target", [("dedup_images", 0.3), ("dedup_sentences", 0.25)])
def test_dedup_quantile_removes_the_asked_fraction_with_the_smallest_threshold(calibrated, stage, target):
    m = manifest(calibrated, stage)
    c, t = m["counts"], m["semantic_threshold"]
    removed, exact = sum(c["dropped"].values()), c["dropped"].get("exact_duplicate", 0)
    assert t["mode"] == "quantile" and t["target_fraction"] == target
    if exact >= target * c["n_in"]:  # the demo world repeats sentences: exact duplicates alone pass the target
        assert t["threshold"] == 0.0 and "near_duplicate" not in c["dropped"]
    else:
        assert 0 < t["threshold"] < 1.0
        assert removed >= math.ceil(target * c["n_in"]) - 1  # exact + semantic together
        assert removed <= target * c["n_in"] + 0.1 * c["n_in"]  # not far past it: the threshold is the smallest


def test_card_lists_every_filter_beside_the_paper(calibrated, tmp_path):
    card = write_card(calibrated, tmp_path, cap=None).read_text()
    assert "## Filters: removal fractions beside the paper's" in card
    for label, stages, paper in PAPER_REMOVAL:
        ms = [manifest(calibrated, s)["counts"] for s in stages]
        here = 1 - ms[-1]["n_out"] / ms[0]["n_in"]
        note = "perplexity off" if "perplexity" in stages else ""  # the fixture builds with perplexity.enabled=false
        assert f"| {label} | {', '.join(stages)} | {ms[0]['n_in']} | {here:.1%} | {paper:.1%} | {note} |" in card
    assert "| sentence_filter | cat_rule |" in card and "entropy (quantile, log base e): drop theta <" in card
    assert "dedup_images (quantile): cosine distance <" in card


def test_removal_rows_skip_steps_that_did_not_run():
    rows = removal_rows({"image_filter": {"counts": {"n_in": 200, "n_out": 170, "dropped": {"too_small": 30}}}})
    assert rows[2] == "| images: quality (size, aspect, corrupt) | image_filter | 200 | 15.0% | 15.2% |  |"
    assert not any(r.startswith("| sentences:") for r in rows)
    assert "| image_filter | too_small | 30 | 15.0% |" in rows


@pytest.mark.parametrize("enabled, note", [(False, "perplexity off"), (True, "")])
def test_the_semantic_row_says_when_perplexity_was_off(enabled, note):
    rows = removal_rows({"entropy": {"counts": {"n_in": 100, "n_out": 80}, "config": {"stage": "entropy"}},
                         "perplexity": {"counts": {"n_in": 80, "n_out": 80 if not enabled else 70},
                                        "config": {"stage": "perplexity", "enabled": enabled}}})
    removed = "20.0%" if not enabled else "30.0%"
    assert rows[2] == f"| sentences: semantic (entropy, perplexity) | entropy, perplexity | 100 | {removed} | 36.3% | " \
        f"{note} |"


def test_log_base_scales_theta_by_ln_b():
    prob = {"a": 0.5, "b": 0.25, "c": 0.25}
    th = {b: sentence_entropy(["a", "b", "c", "a"], prob, b) for b in ("e", "2", "10")}
    assert th["2"] == pytest.approx(th["e"] / np.log(2)) and th["10"] == pytest.approx(th["e"] / np.log(10))
