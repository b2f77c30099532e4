"""Clustering + hierarchical retrieval on planted data: the planted texts come back, in order, and agree with the
exact brute-force mode where clusters are clean; the stages follow the framework's contracts (counts, resume)."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from planted import planted_work, set_dotted
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.pipeline import run_build
from realsyn_pl.construct.engine.records import iter_rows


def _cfg(work, **over):
    cfg = BuildConfig(work_dir=str(work), progress=False)
    cfg.cluster.k, cfg.cluster.train_sample, cfg.cluster.init = 8, 10_000, "kmeans++"
    cfg.retrieve.clusters_per_bucket = 3  # 8 clusters -> 3 buckets
    set_dotted(cfg, over)
    return cfg


def _retrieved(work):
    files = sorted((work / "retrieve").glob("retrieved-*.parquet"))
    return {r["id"]: r for r in iter_rows(files)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    work = tmp_path_factory.mktemp("planted")
    truth = planted_work(work)
    for stage in ("cluster", "retrieve"):
        run_build(_cfg(work, stage=stage))
    return work, truth


def test_cluster_sorted_shards_and_counts(planted):
    work, truth = planted
    m = json.loads((work / "cluster" / "manifest.json").read_text())
    total = sum(len(v) for v in [truth.texts])
    assert m["done"] and m["counts"]["n_in"] == m["counts"]["n_out"] == total
    assert m["kmeans"]["k"] == 8 and m["cluster_sizes"]["non_empty"] == 8
    for f in sorted((work / "cluster").glob("sentences-*.parquet")):
        cl = pq.read_table(f, columns=["cluster"]).column("cluster").to_numpy()
        assert (np.diff(cl) >= 0).all()  # the IVF layout retrieval relies on
    # planted sentences share their image's cluster, and each centre's sentences form one cluster
    cluster_of = {r["id"]: r["cluster"] for r in iter_rows(sorted((work / "cluster").glob("sentences-*.parquet")))}
    for sids in truth.truth.values():
        assert len({cluster_of[s] for s in sids}) == 1


def test_hierarchical_returns_planted_texts(planted):
    work, truth = planted
    got = _retrieved(work)
    assert set(got) == set(truth.image_ids)
    for iid, expect in truth.truth.items():
        row = got[iid]
        assert row["sentence_ids"] == expect, iid
        assert row["texts"] == [truth.texts[s] for s in expect]
        assert row["sims"] == sorted(row["sims"], reverse=True) and row["sims"][0] > 0.9
        assert len(set(row["clusters"])) == 1 and row["clusters"][0] == row["probe_cluster"]
    m = json.loads((work / "retrieve" / "manifest.json").read_text())
    assert m["counts"] == {"n_in": len(truth.image_ids), "n_out": len(truth.image_ids), "dropped": {},
                           "produced": {}}
    assert m["text1_similarity"]["min"] > 0.9


def test_exact_mode_agrees_where_clusters_are_clean(planted, tmp_path):
    work, truth = planted
    import shutil

    exact_work = tmp_path / "exact"
    for name in ("dedup_images", "dedup_sentences", "cluster"):
        shutil.copytree(work / name, exact_work / name)
    run_build(_cfg(exact_work, stage="retrieve", **{"retrieve.mode": "exact"}))
    exact, hier = _retrieved(exact_work), _retrieved(work)
    assert exact.keys() == hier.keys()
    for iid in exact:
        assert exact[iid]["sentence_ids"] == hier[iid]["sentence_ids"] == truth.truth[iid]
        np.testing.assert_allclose(exact[iid]["sims"], hier[iid]["sims"], rtol=1e-5)


def test_nprobe_and_k_beyond_cluster_size(planted, tmp_path):
    """k larger than a cluster: the image keeps what its probed clusters hold; more probes can only add texts."""
    work, truth = planted
    import shutil

    w2 = tmp_path / "k50"
    for name in ("dedup_images", "dedup_sentences", "cluster"):
        shutil.copytree(work / name, w2 / name)
    run_build(_cfg(w2, stage="retrieve", **{"retrieve.k": 50, "retrieve.nprobe": 2}))
    got = _retrieved(w2)
    m = json.loads((w2 / "retrieve" / "manifest.json").read_text())
    sizes = np.load(work / "cluster" / "cluster_sizes.npy")
    probes = np.concatenate([np.load(f) for f in sorted((w2 / "retrieve" / "_probe").glob("probe-*.npy"))])
    assert probes.shape == (len(got), 2)
    short = 0
    for row_probes, iid in zip(probes, truth.image_ids):  # image rows are numbered in shard order = planted order
        row = got[iid]
        assert row["sentence_ids"][:3] == truth.truth[iid]
        assert row_probes[0] == row["probe_cluster"]
        assert len(set(row["sentence_ids"])) == len(row["sentence_ids"])
        assert set(row["clusters"]) <= set(row_probes.tolist())
        expect = min(50, int(sizes[row_probes].sum()))
        assert len(row["texts"]) == expect
        short += expect < 50
    assert m["counts"]["produced"].get("fewer_than_k_texts", 0) == short > 0


def test_resume_after_partial_buckets(planted, tmp_path):
    """Remove one bucket and one merged shard (as a kill would leave them): a rerun completes identically."""
    work, _ = planted
    import shutil

    w2 = tmp_path / "resume"
    for name in ("dedup_images", "dedup_sentences", "cluster", "retrieve"):
        shutil.copytree(work / name, w2 / name)
    (w2 / "retrieve" / "manifest.json").unlink()
    (w2 / "retrieve" / "_buckets" / "manifest.json").unlink()
    (w2 / "retrieve" / "_buckets" / "_done" / "00001.json").unlink()
    (w2 / "retrieve" / "_buckets" / "cand-00001.parquet").unlink()
    (w2 / "retrieve" / "_done" / "00000.json").unlink()
    (w2 / "retrieve" / "retrieved-00000.parquet").unlink()
    run_build(_cfg(w2, stage="retrieve"))
    assert _retrieved(w2) == _retrieved(work)


def test_buckets_split_by_image_count_give_the_same_output(planted, tmp_path):
    """retrieve.bucket_images below the images probing a bucket: each bucket's probes are cut into several units,
    each holding at most that many images, and the retrieved shards are byte for byte those of whole buckets."""
    work, _ = planted
    import shutil

    w2 = tmp_path / "split"
    for name in ("dedup_images", "dedup_sentences", "cluster"):
        shutil.copytree(work / name, w2 / name)
    run_build(_cfg(w2, stage="retrieve", **{"retrieve.bucket_images": 7}))
    units = sorted((w2 / "retrieve" / "_buckets").glob("cand-*.parquet"))
    whole = sorted((work / "retrieve" / "_buckets").glob("cand-*.parquet"))
    assert len(units) > len(whole) and max(pq.read_metadata(u).num_rows for u in units) <= 7
    for f in sorted((work / "retrieve").glob("retrieved-*.parquet")):
        assert (w2 / "retrieve" / f.name).read_bytes() == f.read_bytes(), f.name


def test_similarity_histogram_merged_per_shard_gives_the_quantiles_to_one_bin():
    """The pool-sized summaries (text1 quantiles, the card's plots) are fixed-bin histograms merged per shard: the
    same counts as one histogram of everything, quantiles within one bin (1e-4) of numpy's, min and max exact."""
    from realsyn_pl.construct.engine.histogram import Histogram

    x = np.random.default_rng(0).beta(8, 3, 50_001) * 1.2 - 0.3
    parts = [Histogram().add(p) for p in np.array_split(x, 7)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    whole = Histogram().add(np.r_[x, np.nan, -np.inf])  # non-finite values are not counted
    np.testing.assert_array_equal(merged.counts, whole.counts)
    qs = [0.0, 0.05, 0.5, 0.95, 1.0]
    got = merged.quantiles(qs)
    np.testing.assert_allclose(got, np.quantile(x, qs), atol=1e-4)
    assert got[0] == x.min() and got[-1] == x.max() and merged.n == len(x)
    counts, edges = merged.coarse(50)
    assert counts.sum() == len(x) and len(edges) == len(counts) + 1 and edges[0] <= x.min() < x.max() <= edges[-1]
