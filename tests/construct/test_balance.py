"""Semantic balance sampling: the window is respected, no kept cluster exceeds its cap, caps 20/35/180 give nested
subsets, the same seed gives the same result, and syn_text is never silently replaced by text1."""
import json
import shutil

import numpy as np
import pytest

from planted import _write_stage, jpeg, set_dotted, unit
from realsyn_pl.config import ConfigError
from realsyn_pl.construct.balance.caps import cluster_ranks, draw_keys
from realsyn_pl.construct.engine.config import BuildConfig
from realsyn_pl.construct.engine.pipeline import run_build
from realsyn_pl.construct.engine.records import iter_rows
from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES
from realsyn_pl.construct.retrieve.hierarchical import RETRIEVED

SIZES = [15, 30, 70, 400]  # images per planted image cluster: below, between and above the caps


def planted_pairs(work, seed=0, d=16):
    """done dedup_images + retrieve stages: images around 4 centres, text1 similarity uniform in [0.3, 0.8]."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, len(SIZES))))[0].T.astype(np.float32)  # orthonormal centres
    images, embs, retrieved, centre_of = [], [], [], {}
    for c, n in enumerate(SIZES):
        for m in range(n):
            iid = f"doc-{c:05d}-{m:06d}/img-0"
            images.append({"id": iid, "doc_id": iid[:16], "url": f"http://x.invalid/{iid}", "path": None,
                           "bytes": jpeg((60 * c, m % 256, 90)), "width": 48, "height": 40, "sha256": iid})
            embs.append(unit(centres[c] + rng.normal(scale=0.1 / np.sqrt(d), size=d)))
            sim = float(rng.uniform(0.3, 0.8))
            retrieved.append({"id": iid, "doc_id": iid[:16], "url": f"http://x.invalid/{iid}",
                              "texts": [f"text one of {iid}", f"text two of {iid}", f"text three of {iid}"],
                              "sentence_ids": [f"doc-9/s-{k}" for k in range(3)], "sims": [sim, sim - 0.01, sim - 0.02],
                              "clusters": [c, c, c], "probe_cluster": c, "probe_sim": 0.5})
            centre_of[iid] = c
    order = rng.permutation(len(images))
    split = np.array_split(order, 3)
    embs = np.asarray(embs)
    _write_stage(work, "dedup_images", "images", FILTERED_IMAGES, [[images[i] for i in s] for s in split],
                 [embs[s] for s in split])
    _write_stage(work, "retrieve", "retrieved", RETRIEVED, [[retrieved[i] for i in s] for s in split],
                 [embs[s] for s in split])
    return centre_of, embs, [images[i]["id"] for i in range(len(images))]


def cfg_for(work, **over):
    cfg = BuildConfig(work_dir=str(work), progress=False, stage="balance")
    b = cfg.balance
    b.similarity_text, b.k, b.init, b.nredo, b.train_sample = "text1", 4, "kmeans++", 3, 100_000
    b.window.low, b.window.high = 0.4, 0.7
    set_dotted(cfg, over)
    return cfg


def balanced(work):
    return {r["id"]: r for r in iter_rows(sorted((work / "balance").glob("balanced-*.parquet")))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("bal")
    centre_of, _, _ = planted_pairs(work)
    run_build(cfg_for(work))
    return work, centre_of


def test_window_respected_and_counts_balance(built):
    work, centre_of = built
    rows = balanced(work)
    retrieved = {r["id"]: r for r in iter_rows(sorted((work / "retrieve").glob("retrieved-*.parquet")))}
    for iid, r in retrieved.items():
        inside = 0.4 <= r["sims"][0] <= 0.7
        assert (iid in rows) == inside
        if inside:
            assert rows[iid]["similarity"] == pytest.approx(r["sims"][0])
    m = json.loads((work / "balance" / "manifest.json").read_text())
    c = m["counts"]
    assert c["n_in"] == len(retrieved) == c["n_out"] + sum(c["dropped"].values())
    assert set(c["dropped"]) == {"below_window", "above_window"}
    assert c["dropped"]["below_window"] == sum(r["sims"][0] < 0.4 for r in retrieved.values())
    assert m["window"]["similarity_text"] == "text1" and "not to syn_text" in m["window"]["note"]


def test_image_clusters_follow_planted_centres(built):
    work, centre_of = built
    rows = balanced(work)
    pairs = {(centre_of[i], r["image_cluster"]) for i, r in rows.items()}
    assert len(pairs) == len(SIZES) == len({p[1] for p in pairs})  # a bijection centre <-> cluster


def test_caps_bound_clusters_and_are_nested(built):
    work, _ = built
    rows = balanced(work)
    m = json.loads((work / "balance" / "manifest.json").read_text())
    by_cluster = {}
    for r in rows.values():
        by_cluster.setdefault(r["image_cluster"], []).append(r)
    subsets = {}
    for t in (20, 35, 180):
        subset = {i for i, r in rows.items() if r["cluster_rank"] < t}
        subsets[t] = subset
        for members in by_cluster.values():
            kept = [r for r in members if r["cluster_rank"] < t]
            assert len(kept) == min(t, len(members))  # all if n <= t, else exactly t
            assert all(r["cluster_size"] == len(members) for r in members)
        assert m["caps"][str(t)] == len(subset) == m["counts"]["produced"][f"cap_{t}"]
    assert subsets[20] < subsets[35] < subsets[180] < set(rows)  # strictly nested: every cap bites here
    sizes = np.load(work / "balance" / "image_cluster_sizes.npy")
    assert sizes.max() > 180 and m["image_clusters"]["max_after_cap_20"] == 20


def test_same_seed_same_result_other_seed_other_sample(built, tmp_path):
    work, _ = built
    again = tmp_path / "again"
    planted_pairs(again)
    run_build(cfg_for(again))
    a, b = balanced(work), balanced(again)
    assert a == b
    other = tmp_path / "other"
    planted_pairs(other)
    run_build(cfg_for(other, **{"balance.seed": 1}))
    c = balanced(other)
    assert {i for i, r in a.items() if r["cluster_rank"] < 20} != {i for i, r in c.items() if r["cluster_rank"] < 20}


def test_ranks_do_not_depend_on_row_order():
    ids = [f"id-{i}" for i in range(500)]
    clusters = np.arange(500) % 7
    ranks = cluster_ranks(clusters, draw_keys(ids, 3))
    perm = np.random.default_rng(0).permutation(500)
    ranks_p = cluster_ranks(clusters[perm], draw_keys([ids[p] for p in perm], 3))
    np.testing.assert_array_equal(ranks[perm], ranks_p)


def test_quantile_window_removes_the_asked_fraction(tmp_path):
    planted_pairs(tmp_path)
    run_build(cfg_for(tmp_path, **{"balance.window.mode": "quantile", "balance.window.q_low": 0.10,
                                   "balance.window.q_high": 0.95}))
    m = json.loads((tmp_path / "balance" / "manifest.json").read_text())
    assert m["window"]["removed_fraction"] == pytest.approx(0.15, abs=0.01)
    sims = np.load(tmp_path / "balance" / "similarity.npy")
    assert m["window"]["low"] == pytest.approx(np.quantile(sims, 0.10))


def test_syn_text_is_never_silently_skipped(tmp_path):
    planted_pairs(tmp_path)
    with pytest.raises(ConfigError, match="similarity_text=text1"):
        run_build(cfg_for(tmp_path, **{"balance.similarity_text": "syn_text"}))
    assert not (tmp_path / "balance" / "manifest.json").exists()


def test_window_on_syn_text_embeddings(tmp_path):
    """With a syn_text stage and its embeddings, the window applies to cosine(image, syn_text)."""
    import pyarrow as pa

    from realsyn_pl.construct.engine.arrays import read_array_shard

    _, _, _ = planted_pairs(tmp_path)
    rng = np.random.default_rng(5)
    syn_schema = pa.schema([("id", pa.string()), ("syn_text", pa.string())])
    shards, embs, target = [], [], {}
    for j in range(3):
        ids, img = read_array_shard(tmp_path / "dedup_images", "emb", j)
        rows, vecs = [], []
        for i, v in zip(ids, np.asarray(img, np.float32)):
            s = float(rng.uniform(0.2, 0.9))  # a text vector at cosine s from the image
            ortho = unit(rng.normal(size=v.shape) - (rng.normal(size=v.shape) @ v) * v)
            ortho = unit(ortho - (ortho @ v) * v)
            vecs.append(unit(s * v + np.sqrt(1 - s * s) * ortho))
            rows.append({"id": i, "syn_text": f"synthetic {i}"})
            target[i] = float(np.asarray(v, np.float16).astype(np.float32) @ np.asarray(vecs[-1], np.float16).astype(np.float32))
        shards.append(rows)
        embs.append(np.asarray(vecs))
    _write_stage(tmp_path, "syn_text", "syn", syn_schema, shards, embs)
    shutil.copytree(tmp_path / "syn_text", tmp_path / "embed_syn_text")
    run_build(cfg_for(tmp_path, **{"balance.similarity_text": "syn_text"}))
    rows = balanced(tmp_path)
    assert rows and all(0.4 <= r["similarity"] <= 0.7 for r in rows.values())
    assert {i for i, s in target.items() if 0.4 + 1e-3 < s < 0.7 - 1e-3} <= set(rows)
    for i, r in rows.items():
        assert r["syn_text"] == f"synthetic {i}" and r["similarity"] == pytest.approx(target[i], abs=2e-3)
