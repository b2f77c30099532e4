"""Two-level k-means (construct/clustering/twolevel.py): it recovers planted clusters about as well as flat k-means, its
assignment agrees with exact search, a killed fit resumes at the last finished sub-clustering with the same bytes,
and configurations that cannot run at large k are refused (or reported) before any work."""
import json
import shutil

import numpy as np
import pytest

from planted import planted_work, set_dotted
from realsyn_pl.config import ConfigError
from realsyn_pl.construct.clustering import centroids, kmeans, twolevel
from realsyn_pl.construct.clustering.topk import topk_rows
from realsyn_pl.construct.engine.arrays import ArrayReader, write_array_shard
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.pipeline import run_build
from realsyn_pl.construct.engine.stage import Stage, StageError


def _planted_arrays(folder, n_centres=512, per=40, d=32, noise=0.25, seed=0):
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(n_centres, d))
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    lab = np.repeat(np.arange(n_centres), per)
    x = cent[lab] + rng.normal(scale=noise / np.sqrt(d), size=(len(lab), d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(x))
    x, lab = x[perm], lab[perm]
    for i, s in enumerate(np.array_split(np.arange(len(x)), 3)):
        write_array_shard(folder, "emb", i, [str(j) for j in s], x[s], "float16")
    return ArrayReader.open(folder, "emb"), lab


def _fit(ex, work, reader, method, **over):
    spec = twolevel.Spec(method=method, **{"k": 512, **over})
    st = Stage(work, method, {})
    st.dir.mkdir(parents=True)
    info = centroids.fit_centroids(ex, st, reader, spec, False)
    return st, spec, info


def _quality(st, spec, x, lab):
    labels = centroids.assigner_for(st.dir, spec, False).search(x, 1)[0][:, 0]
    exact, sims = kmeans.Assigner(np.load(st.dir / "centroids.npy")).search(x, 1)
    majority = {c: np.bincount(labels[lab == c]).argmax() for c in np.unique(lab)}
    purity = float(np.mean(labels == np.array([majority[c] for c in lab])))
    return purity, len(set(majority.values())), float(sims.mean()), float(np.mean(exact[:, 0] == labels))


@pytest.fixture(scope="module")
def fits(tmp_path_factory, ex):
    work = tmp_path_factory.mktemp("twolevel")
    reader, lab = _planted_arrays(work / "emb")
    x = reader.load()[1]
    return {m: _fit(ex, work, reader, m) for m in ("flat", "two_level")}, x, lab


def test_two_level_recovers_planted_clusters_like_flat(fits):
    runs, x, lab = fits
    (flat_st, flat_spec, _), (two_st, two_spec, info) = runs["flat"], runs["two_level"]
    assert info["method"] == "two_level" and info["k"] == 512 and info["coarse_k"] == 23
    assert info["points_per_centre"] >= 39 and "thin_sample" not in info
    assert np.load(two_st.dir / "parent.npy").shape == (512,)
    p_flat, n_flat, cos_flat, _ = _quality(flat_st, flat_spec, x, lab)
    p_two, n_two, cos_two, agree = _quality(two_st, two_spec, x, lab)
    # each planted cluster lands (almost) whole in one centre, and most centres are a planted cluster
    assert p_two >= 0.95 and n_two >= 0.85 * 512
    assert cos_two >= 0.98 * cos_flat  # mean cosine to the assigned centre within 2% of flat k-means
    assert agree >= 0.95 and info["assign_agreement_top1"] >= 0.95  # default coarse probe (8)
    assert p_flat >= 0.95 and n_flat >= 0.85 * 512


def test_two_level_assignment_on_overlapping_clusters_agrees_with_exact(tmp_path, ex):
    """Clusters that overlap (noise as large as the signal): the two-level assignment still matches exact search
    on >= 95% of points at the default coarse probe, and more probes can only help."""
    reader, _ = _planted_arrays(tmp_path / "emb", n_centres=256, noise=1.0, seed=1)
    x = reader.load()[1].astype(np.float32)
    st, spec, info = _fit(ex, tmp_path, reader, "two_level", k=256)
    cents, coarse, parent = (np.load(st.dir / f) for f in ("centroids.npy", "coarse.npy", "parent.npy"))
    exact = kmeans.Assigner(cents).search(x, 1)[0][:, 0]
    agree = {p: float(np.mean(twolevel.TwoLevelAssigner(coarse, cents, parent, p).search(x, 1)[0][:, 0] == exact))
             for p in (1, 8, len(coarse))}
    assert agree[8] >= 0.95 and agree[1] <= agree[8] and agree[len(coarse)] == 1.0
    # top-3 through the two levels = exact top-3 when every coarse centre is probed
    full = twolevel.TwoLevelAssigner(coarse, cents, parent, len(coarse)).search(x[:500], 3)[0]
    np.testing.assert_array_equal(full, topk_rows(x[:500] @ cents.T, 3)[0])


def test_allocation_is_proportional_and_sums_to_k():
    n_c = np.array([1000, 10, 0, 1, 500, 2489])
    k_c = twolevel.allocate(400, n_c)
    assert k_c.sum() == 400 and k_c[2] == 0 and k_c[3] == 1 and (k_c <= n_c).all()
    assert abs(k_c[5] / k_c[0] - 2.489) < 0.1


def test_sample_does_not_depend_on_the_shard_split():
    thr = twolevel.threshold(300, 1000)
    whole = twolevel.picked(0, 1000, None, 7, thr)
    parts = np.concatenate([twolevel.picked(o, 250, None, 7, thr) + o for o in range(0, 1000, 250)])
    np.testing.assert_array_equal(whole, parts)
    assert 240 <= len(whole) <= 360


def _cfg(work, **over):
    cfg = BuildConfig(work_dir=str(work), progress=False)
    cfg.cluster.k, cfg.cluster.method, cfg.cluster.coarse_k = 8, "two_level", 3
    cfg.retrieve.clusters_per_bucket = 3
    set_dotted(cfg, over)
    return cfg


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and "_done" not in p.parts}


def test_killed_two_level_fit_resumes_with_the_same_bytes(tmp_path):
    """What a kill between sub-clusterings leaves (some `_sub` units done, no centroids, no assignment): the rerun
    trains only the missing sub-clusterings and writes the same bytes as the uninterrupted run."""
    work = tmp_path / "w"
    truth = planted_work(work, n_centres=8, per_cluster=30)
    run_build(_cfg(work, stage="cluster"))
    clean = _tree(work / "cluster")
    m = json.loads((work / "cluster" / "manifest.json").read_text())
    assert m["kmeans"]["method"] == "two_level" and m["kmeans"]["k"] == 8
    assert m["counts"]["n_out"] == len(truth.texts)
    d = work / "cluster"
    for f in ["manifest.json", "centroids.npy", "parent.npy", "coarse.npy", "_kmeans.json", "_kmeans/_sub/sub-00002.npy",
              "_kmeans/_sub/_done/00002.json", "_kmeans/_sub/_done/00001.json"]:
        (d / f).unlink()
    for p in list(d.glob("sentences-*.parquet")) + list(d.glob("emb-*")):
        p.unlink()
    shutil.rmtree(d / "_done")
    kept = (d / "_kmeans" / "_sub" / "sub-00000.npy").stat().st_mtime_ns
    run_build(_cfg(work, stage="cluster"))
    assert (d / "_kmeans" / "_sub" / "sub-00000.npy").stat().st_mtime_ns == kept  # not retrained
    assert _tree(d) == clean


def test_large_k_seeded_init_is_refused_before_any_work(tmp_path):
    work = tmp_path / "w"
    planted_work(work)
    for over in ({"cluster.k": 2_000_000, "cluster.init": "afkmc2", "cluster.method": "flat"},
                 {"cluster.k": 2_000_000, "cluster.init": "kmeans++", "cluster.method": "two_level",
                  "cluster.coarse_k": 50_000}):
        with pytest.raises(ConfigError, match=r"cluster\.init=(afkmc2|kmeans\+\+) .*above 16384") as err:
            run_build(_cfg(work, stage="cluster", **over))
        assert "\n" not in str(err.value)
        assert not (work / "cluster").exists()
    # the default (auto) at the paper's k is two-level with seeded sub-clusterings: accepted
    assert twolevel.check(twolevel.Spec(k=2_000_000)) is True
    with pytest.raises(StageError, match="balance.init"):
        twolevel.check(twolevel.Spec(k=1_000_000, init="afkmc2", method="flat", key="balance"))


def test_thin_sample_is_reported_in_one_line_and_in_the_manifest(tmp_path, capsys):
    work = tmp_path / "w"
    planted_work(work)
    run_build(_cfg(work, stage="cluster", **{"cluster.method": "flat", "cluster.train_sample": 100}))
    line = [ln for ln in capsys.readouterr().out.splitlines() if "warning" in ln]
    assert len(line) == 1 and "below cluster.min_points_per_centre=40" in line[0] and "cluster.train_sample" in line[0]
    m = json.loads((work / "cluster" / "manifest.json").read_text())
    assert m["kmeans"]["n_train"] == 100 and m["kmeans"]["points_per_centre"] == 12.5
    assert "cluster.train_sample" in m["kmeans"]["thin_sample"]


def test_topk_rows_equals_a_stable_full_sort_including_ties():
    """argpartition top-k returns what a stable full sort would: best first, the lower column among equals."""
    rng = np.random.default_rng(0)
    for t in range(200):
        m, s, k = (int(v) for v in rng.integers(1, 25, 3))
        k = 1 + k % 5
        x = (rng.integers(0, 4, size=(m, s)) if t % 2 else rng.normal(size=(m, s))).astype(np.float32)
        idx, val = topk_rows(x, k, 7)
        kk = min(k, s)
        order = np.argsort(-x, axis=1, kind="stable")[:, :kk]
        np.testing.assert_array_equal(idx[:, :kk], order + 7)
        np.testing.assert_array_equal(val[:, :kk], np.take_along_axis(x, order, 1))
        assert (idx[:, kk:] == -1).all() and np.isneginf(val[:, kk:]).all()


def test_explicit_seeded_init_switched_to_random_in_a_large_cell_is_recorded(tmp_path, monkeypatch, capsys, ex):
    """check() bounds the mean sub-clustering; a cell given more centres than SEEDED_INIT_MAX_K runs random, and that
    is printed once and kept in _kmeans.json (the bound is lowered so the cells of a small fit cross it)."""
    reader, _ = _planted_arrays(tmp_path / "emb", n_centres=64, per=40, d=16)
    monkeypatch.setattr(kmeans, "SEEDED_INIT_MAX_K", 16)
    st, _, info = _fit(ex, tmp_path, reader, "two_level", k=64, coarse_k=4, init="afkmc2", niter=2)
    sub_k = np.bincount(np.load(st.dir / "parent.npy"))
    big = sub_k[sub_k > 16]
    assert len(big) >= 1
    assert info["init_fallback"] == {"random_sub_clusterings": len(big), "largest_k": int(big.max())}
    assert json.loads((st.dir / "_kmeans.json").read_text())["init_fallback"] == info["init_fallback"]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "seeded at random" in ln]
    assert len(lines) == 1 and "cluster.init=afkmc2" in lines[0] and f"largest {big.max()}" in lines[0]
    _, _, info2 = _fit(ex, tmp_path / "b", reader, "two_level", k=64, coarse_k=4, init="random", niter=2)
    assert "init_fallback" not in info2
