"""Thresholds calibrated by removal: an absolute balance window or dedup distance whose removal is outside 0.5x-2x the
paper's stops its stage in one line (similarity quantiles / distances, both keys out), on a similarity scale where it
matches the paper it passes, quantile mode gives the paper's fraction on either scale; the card shows each threshold
both ways and warns; balance.window_text_tags=strip embeds syn_text without its tags."""
import json

import numpy as np
import pytest

from realsyn_pl.construct import calibration
from realsyn_pl.construct.balance import sampler, window
from realsyn_pl.construct.balance.syn_embed import SynTextEmbedTask, strip_tags
from realsyn_pl.construct.engine.config import BuildConfig, DedupConfig, WindowConfig
from realsyn_pl.construct.engine.stage import StageError
from realsyn_pl.construct.extract import dedup
from realsyn_pl.construct.extract import semdedup as sd
from realsyn_pl.construct.release.card import _thresholds
from realsyn_pl.construct.release.card_notes import removal_warnings


# ---- balance window ------------------------------------------------------------------------------------------
def window_sims(tmp_path, scale: str) -> list:
    """2,000 sims in two files: 'eva' puts 10 % below 0.51 and 5 % above 0.61 (the paper's 15 %); 'clip' is the same
    shape at a CLIP-class scale (matching pairs near 0.28), wholly below 0.51."""
    s = np.concatenate([np.linspace(0.40, 0.505, 200), np.linspace(0.511, 0.609, 1700), np.linspace(0.615, 0.70, 100)])
    if scale == "clip":
        s = 0.28 + (s - 0.56) / 2
    s = np.random.default_rng(0).permutation(s).astype(np.float32)
    paths = [tmp_path / f"{scale}-{i}.npy" for i in range(2)]
    for p, part in zip(paths, np.array_split(s, 2)):
        np.save(p, part)
    return paths


def removed(paths, lo, hi) -> float:
    below, above, n = window.side_counts(paths, lo, hi)
    return (below + above) / n


def test_absolute_window_passes_on_the_paper_scale_and_stops_in_one_line_on_another(tmp_path):
    paper = window_sims(tmp_path, "eva")
    assert sampler.window_bounds(WindowConfig(), paper) == (0.51, 0.61)
    assert removed(paper, 0.51, 0.61) == pytest.approx(0.15, abs=0.001)
    clip = window_sims(tmp_path, "clip")
    with pytest.raises(StageError) as err:
        sampler.window_bounds(WindowConfig(), clip)
    line = str(err.value)
    sims = np.concatenate([np.load(p) for p in clip])
    assert "\n" not in line and line.startswith("balance: the window [0.5100, 0.6100] removes 100.0% of the 2000 pairs")
    assert "the paper 15.0%, accepted 7.5%-30.0%" in line
    listed = dict(kv.split("=") for kv in line.split("similarity quantiles ")[1].split(";")[0].split())
    assert list(listed) == ["q0.05", "q0.10", "q0.25", "q0.50", "q0.75", "q0.90", "q0.95"]
    for q, v in listed.items():
        assert float(v) == pytest.approx(np.quantile(sims, float(q[1:])), abs=6e-5)
    assert "balance.window.mode=quantile" in line and "balance.window.accept_removal=true" in line
    assert sampler.window_bounds(WindowConfig(accept_removal=True), clip) == (0.51, 0.61)


@pytest.mark.parametrize("scale", ["eva", "clip"])
def test_quantile_window_removes_the_paper_fraction_on_either_scale(tmp_path, scale):
    paths = window_sims(tmp_path, scale)
    lo, hi = sampler.window_bounds(WindowConfig(mode="quantile"), paths)  # q_low 0.10, q_high 0.95
    assert removed(paths, lo, hi) == pytest.approx(calibration.WINDOW, abs=0.01)


def test_the_accept_key_is_not_in_the_balance_fingerprint():
    a, b = BuildConfig().balance, BuildConfig().balance
    b.window.accept_removal, b.window_text_tags = True, "strip"  # strip reaches balance through embed_syn_text's hash
    assert sampler.stage_config(a) == sampler.stage_config(b) and "accept_removal" not in sampler.stage_config(a)
    assert dedup.stage_config(DedupConfig()) == dedup.stage_config(DedupConfig(accept_removal=True))


# ---- dedup ---------------------------------------------------------------------------------------------------
N_ITEMS, N_EXACT = 1000, 20  # 980 exact survivors: 490 pairs of near copies


def near_pairs(scale: float, d: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(positions, unit rows) of 490 pairs, pair k at cosine distance scale * (k + 0.5) / 305; random directions in
    256 dimensions are ~1 +- 0.06 apart, so no other pair comes near."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(490, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    ortho = rng.normal(size=(490, d))
    ortho -= (ortho * base).sum(1, keepdims=True) * base
    ortho /= np.linalg.norm(ortho, axis=1, keepdims=True)
    cos = 1 - scale * (np.arange(490) + 0.5) / 305
    x = np.empty((980, d))
    x[0::2], x[1::2] = base, base * cos[:, None] + ortho * np.sqrt(1 - cos ** 2)[:, None]
    return np.arange(N_EXACT, N_ITEMS), x.astype(np.float32)


def semantic_step(tmp_path, d: DedupConfig, scale: float, name: str) -> dict:
    """The stage's pair search (one cluster, threshold or max_threshold), its forest and reduce, on near_pairs."""
    pos, x = near_pairs(scale)
    quantile = d.mode == "quantile"
    pairs = sd.cluster_pairs(pos, x, np.zeros(0, np.int64), x[:0], d.max_threshold if quantile else d.threshold,
                             d.block)
    forest = tmp_path / f"forest-{scale}.npy"
    np.save(forest, sd.spanning_forest(pairs, by_distance=quantile))
    out = tmp_path / f"reduce-{scale}-{d.mode}"
    out.mkdir()
    dedup._reduce([forest], d, N_ITEMS, N_ITEMS - N_EXACT, 1, out, {"mode": d.mode}, dedup.PAPER[name])
    return json.loads((out / dedup.SEMANTIC).read_text())


@pytest.mark.parametrize("name,key", [("dedup_images", "dedup"), ("dedup_sentences", "dedup_text")])
def test_absolute_distance_passes_on_the_paper_scale_and_stops_in_one_line_on_another(tmp_path, name, key):
    d = DedupConfig(threshold=0.1)
    paper = dedup.PAPER[name]
    info = semantic_step(tmp_path, d, 0.1, name)  # 305 pairs under 0.1: (20 + 305) / 1000 = 32.5 %
    assert info["edges"] == 305 and dedup.removal_stop(d, key, name, N_ITEMS, N_EXACT, info) is None
    info = semantic_step(tmp_path, d, 0.5, name)  # 5x the distances: 61 pairs under 0.1, 8.1 %
    line = dedup.removal_stop(d, key, name, N_ITEMS, N_EXACT, info)
    assert "\n" not in line and line.startswith(f"{name}: cosine distance < 0.1 ({key}.mode=absolute) removes 8.1% "
                                                "of 1000 items (exact 2.0% + semantic 6.1%")
    assert f"the paper {paper:.1%}" in line and f"{key}.mode=quantile ({key}.quantile={paper})" in line
    assert f"{key}.accept_removal=true" in line
    assert line.count("at distance above 0.1 (not searched)") == 3  # 0.5x, 1x, 2x the paper's all need more pairs
    assert dedup.removal_stop(DedupConfig(threshold=0.1, accept_removal=True), key, name, N_ITEMS, N_EXACT,
                              info) is None
    if name == "dedup_sentences":  # on dedup's settings (dedup_text null): the way out must not move the images'
        line = dedup.removal_stop(d, "dedup", name, N_ITEMS, N_EXACT, info)
        assert "dedup_text={mode: quantile, quantile: 0.276}" in line and "dedup.mode=quantile" not in line
        assert "dedup.accept_removal=true" in line


@pytest.mark.parametrize("scale", [0.1, 0.5])
@pytest.mark.parametrize("name", ["dedup_images", "dedup_sentences"])
def test_quantile_distance_removes_the_paper_fraction_on_either_scale(tmp_path, name, scale):
    paper = dedup.PAPER[name]
    d = DedupConfig(mode="quantile", quantile=paper, max_threshold=0.8)
    info = semantic_step(tmp_path, d, scale, name)
    assert (N_EXACT + info["edges"]) / N_ITEMS == pytest.approx(paper, abs=0.01)
    assert 0 < info["threshold"] < 0.8 and "removal_at" not in info
    assert dedup.removal_stop(d, "dedup", name, N_ITEMS, N_EXACT, info) is None  # quantile mode is never stopped


def test_removal_distances_known_exact_alone_and_beyond_the_search():
    dist = np.arange(1, 31, dtype=np.float32) / 100  # 30 forest edges at 0.01 .. 0.30 among 90 survivors of 100
    at = dedup.removal_distances(100, 90, dist, [0.05, 0.20, 0.50])
    assert at[0] == 0.0  # the 10 exact duplicates alone remove 5 %
    assert at[1] == pytest.approx(0.10, abs=1e-6) and at[1] > dist[9]  # 10 more: just above the 10th edge
    assert at[2] is None  # 40 more would need edges the search did not find


# ---- the card ------------------------------------------------------------------------------------------------
def test_card_shows_thresholds_both_ways_and_warns_naming_the_keys():
    manifests = {
        "entropy": {"counts": {"n_in": 1000, "n_out": 950, "dropped": {"low_entropy": 50}},
                    "entropy_threshold": {"mode": "absolute", "log_base": "10", "threshold": 0.3}},
        "perplexity": {"counts": {"n_in": 950, "n_out": 900, "dropped": {"ppl_out_of_range": 50}},
                       "config": {"enabled": True, "min_ppl": 30.0, "max_ppl": 200.0}},
        "dedup_images": {"counts": {"n_in": 1000, "n_out": 700, "dropped": {"exact_duplicate": 100,
                                                                             "near_duplicate": 200}},
                         "semantic_threshold": {"mode": "quantile", "threshold": 0.0421}},
        "balance": {"window": {"mode": "absolute", "low": 0.51, "high": 0.61, "below_low": 0.6, "above_high": 0.0,
                               "outside_of_sims": 0.6, "accept_removal": True, "removed_fraction": 0.6}},
    }
    lines = _thresholds(manifests)
    assert "- entropy (absolute, log base 10): drop theta < 0.3000: dropped 5.0% of its input" in lines
    assert "- perplexity: keep 30 <= PPL <= 200: dropped 5.3% of its input" in lines
    assert ("- dedup_images (quantile): cosine distance < 0.0421: removed 30.0% of its input (exact 10.0% + semantic "
            "20.0%)") in lines
    assert ("- balance window (absolute): similarity [0.5100, 0.6100] = quantiles [0.600, 1.000] of the pairs' "
            "similarities: 60.0% below, 0.0% above, removed 60.0%") in lines
    warn = removal_warnings(manifests)
    assert len(warn) == 2  # dedup's 30 % is the paper's; entropy + perplexity 10 % and the window 60 % are not
    assert warn[0].startswith("sentences: semantic (entropy, perplexity) removed 10.0% (the paper 36.3%")
    assert "entropy.log_base" in warn[0] and "perplexity.min_ppl" in warn[0]
    assert "kept by balance.window.accept_removal=true" in warn[1] and "balance.window.mode" in warn[1]


# ---- the window's text without its tags ----------------------------------------------------------------------
def test_strip_removes_the_images_own_tags_as_whole_phrases():
    text = "A Red Bike leans on the glass window, by a window-sill; a redbike is not a tag."
    out = strip_tags(text, ["bike", "red bike", "glass window", "window", ""])
    assert out == "A leans on the, by a window-sill; a redbike is not a tag."
    assert all(t not in out.lower().split() for t in ("bike", "window", "glass"))


def test_strip_changes_what_embed_syn_text_embeds_and_its_fingerprint():
    from realsyn_pl.construct.engine.predict import SkipRow

    cfg = BuildConfig()
    keep = SynTextEmbedTask.config_of(cfg)
    cfg.balance.window_text_tags = "strip"
    assert SynTextEmbedTask.config_of(cfg) == {**keep, "window_text_tags": "strip"}
    task = SynTextEmbedTask.__new__(SynTextEmbedTask)  # the text path only: no model built
    task.strip, task.text_column, task.modality = True, "syn_text", "sentences"
    seen = []
    task.bundle = type("B", (), {"tokenizer": staticmethod(lambda texts: seen.extend(texts) or [0])})()
    task.load({"id": "a", "syn_text": "A dog on grass.", "tags": ["dog", "grass"]})
    assert seen == ["A on."]
    with pytest.raises(SkipRow, match="only_tags"):
        task.load({"id": "b", "syn_text": "Dog, grass", "tags": ["dog", "grass"]})
    cfg.balance.window_text_tags = "drop"
    with pytest.raises(StageError, match="balance.window_text_tags must be keep or strip"):
        SynTextEmbedTask.job(cfg)


# ---- the stop inside a stage run, and the rerun that accepts --------------------------------------------------
def test_dedup_stops_before_done_and_a_rerun_that_accepts_resumes_from_the_done_units(tmp_path, capsys):
    from realsyn_pl.cli import main
    from test_extract_dedup import dedup_fixture

    work = tmp_path / "w"
    dedup_fixture(work, "images")  # 120 items, 10 removed at distance 0.1: 8.3 %, below half the paper's 30.5 %
    args = ["build", "dedup_images", f"work_dir={work}", "progress=false", "ray.in_process=true"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dedup_images: cosine distance < 0.1 (dedup.mode=absolute) removes 8.3%" \
        in err and "dedup.accept_removal=true" in err
    out = work / "dedup_images"
    assert not (out / "manifest.json").exists() and not list(out.glob("images-*.parquet"))
    done = {p.name: p.stat().st_mtime_ns for p in (out / "_pairs" / "_done").glob("*.json")}
    assert done
    assert main(args + ["dedup.accept_removal=true"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "_pairs" / "_done").glob("*.json")} == done
    m = json.loads((out / "manifest.json").read_text())
    assert m["done"] and sum(m["counts"]["dropped"].values()) == 10 and "accept_removal" not in m["config"]


def test_a_quantile_threshold_under_the_floor_stops_in_one_line(tmp_path):
    """dedup.quantile_floor: pairs under it only connect; where they alone already remove the target, the threshold
    lies where distances were not ranked, and the stage stops naming the key; under the threshold it passes."""
    low = DedupConfig(mode="quantile", quantile=0.305, max_threshold=0.3, quantile_floor=0.05)
    info = semantic_step(tmp_path, low, 0.1, "dedup_images")  # target: 285 of the 490 pairs, up to ~0.093
    assert 0.05 < info["threshold"] < 0.1 and dedup.floor_stop(low, "dedup", "dedup_images", info) is None
    assert info["removal_at_floor"] == pytest.approx((N_EXACT + 152) / N_ITEMS, abs=0.002)  # 152 pairs under 0.05
    high = DedupConfig(mode="quantile", quantile=0.305, max_threshold=0.3, quantile_floor=0.095)
    (tmp_path / "h").mkdir()
    line = dedup.floor_stop(high, "dedup_text", "dedup_sentences", semantic_step(tmp_path / "h", high, 0.1,
                                                                                  "dedup_images"))
    assert line is not None and "\n" not in line
    assert line.startswith("dedup_sentences: the pairs closer than dedup_text.quantile_floor=0.095 already remove ")
    assert line.endswith("lower dedup_text.quantile_floor (0 ranks every pair)")
    with pytest.raises(StageError, match="dedup.quantile_floor must be >= 0 and below dedup.max_threshold=0.3"):
        dedup.check(DedupConfig(mode="quantile", quantile_floor=0.3))
