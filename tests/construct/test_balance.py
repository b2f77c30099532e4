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
from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES, RETRIEVED

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
    b.window.accept_removal = True  # [0.4, 0.7] of sims uniform in [0.3, 0.8] removes 40 %, above 2x the paper's 15 %
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


# ---- the map-reduce stage writes what the rank-0 stage it replaced wrote ----------------------------------------
def write_syn_stages(work, holes=False):
    """syn_text records + embeddings at cosines uniform in [0.2, 0.9] from each image (as the test above). holes:
    every 7th record has an empty syn_text, every 5th is absent, every 11th has no embedding, shard 1's records are
    in reverse order."""
    import pyarrow as pa

    from realsyn_pl.construct.engine.arrays import read_array_shard

    rng = np.random.default_rng(5)
    schema = pa.schema([("id", pa.string()), ("syn_text", pa.string())])
    shards, embs = [], []
    for j in range(3):
        ids, img = read_array_shard(work / "dedup_images", "emb", j)
        rows, vecs = [], []
        for i, v in zip(ids, np.asarray(img, np.float32)):
            s = float(rng.uniform(0.2, 0.9))
            ortho = unit(rng.normal(size=v.shape) - (rng.normal(size=v.shape) @ v) * v)
            ortho = unit(ortho - (ortho @ v) * v)
            vecs.append(unit(s * v + np.sqrt(1 - s * s) * ortho))
            rows.append({"id": i, "syn_text": f"synthetic {i}"})
        shards.append(rows)
        embs.append(np.asarray(vecs))
    if not holes:
        _write_stage(work, "syn_text", "syn", schema, shards, embs)
        shutil.copytree(work / "syn_text", work / "embed_syn_text")
        return
    rec = [[dict(r, syn_text="" if n % 7 == 3 else r["syn_text"]) for n, r in enumerate(rows) if n % 5 != 2]
           for rows in shards]
    rec[1] = rec[1][::-1]
    _write_stage(work, "syn_text", "syn", schema, rec, [np.zeros((len(r), 16)) for r in rec])
    keep = [[n for n in range(len(rows)) if n % 11 != 4] for rows in shards]
    _write_stage(work, "embed_syn_text", "syn", schema, [[shards[j][n] for n in keep[j]] for j in range(3)],
                 [embs[j][keep[j]] for j in range(3)])


# Recorded from the rank-0 stage (sampler.py before the map-reduce rewrite) on these fixtures: sha256 of every
# output file and of the manifest's window/kmeans/caps/image_clusters/counts, and the readable part of it.
OLD = {
    "absolute": ({}, {
        "balanced-00000.parquet": "36c60095d73c43d30f7102043a54001968c336803580ae97fbae908a6e34b4e9",
        "balanced-00001.parquet": "5e21868cad8b56aaaecf58acd6ad54c81d49aa1c722d3ff5f57b62324f1acb10",
        "balanced-00002.parquet": "a8c92976d5fe5146ad929bf54f0da4c90e2ef539e7e14f9eb8d02da14f1017eb",
        "image_cluster_sizes.npy": "027a797824655af0489467d034338c0239955d6f43d52b61205630daac7e6009",
        "similarity.npy": "8a35a226d120673c69d65535c1cbb72787b3ee8677bcc23caf17ebff77155d8d",
        "summary": "1ce1e6bdb2677a7c671e384cb522be6770d26f7f5dd07f4e9b3beebb30a1da80"},
        ({"20": 65, "35": 95, "180": 247}, {"above_window": 101, "below_window": 107}, 0.4, 0.7, [8, 17, 42, 240])),
    "quantile": ({"balance.window.mode": "quantile", "balance.window.q_low": 0.10, "balance.window.q_high": 0.95}, {
        "balanced-00000.parquet": "99d7fd732a185539c843f4b4c81f82923bc85b9def6f6dd82e5fadce2e6c2f44",
        "balanced-00001.parquet": "be7fb345d6adb7856ca2f9d1352a5664caf3f76d8a15833dcb8332ac82575c7d",
        "balanced-00002.parquet": "63be45f82c94c4b7278d9ec426e5dd5fd87c04d3f43e85537710c59884d3f13b",
        "image_cluster_sizes.npy": "d8dfd7aceb656f9504d1c55ce51ac8f997dc32233f34047562ca81a803c7714d",
        "similarity.npy": "8a35a226d120673c69d65535c1cbb72787b3ee8677bcc23caf17ebff77155d8d",
        "summary": "6ef142fca474dd04137797db60a3ac8e60a130cf96a6c484867cd1d1fc38f7e8"},
        ({"20": 74, "35": 109, "180": 282}, {"above_window": 26, "below_window": 52}, 0.34775766134262087,
         0.768377125263214, [14, 25, 63, 335])),
    "syn_holes": ({"balance.similarity_text": "syn_text"}, {
        "balanced-00000.parquet": "efb9891f8820a3042bded88bdcaade3bf22f16492fd14f1a4418a2e20189b266",
        "balanced-00001.parquet": "c43e445e76cd21ebfe27fdc28df8ad9e42f9a3bda1e46264d389ac8a2f1ca448",
        "balanced-00002.parquet": "f152f9542b0df2404ed089b3e70557f5620d77e63b9f1289572005352677447f",
        "image_cluster_sizes.npy": "8e1430a4683f52e08b0fc37d37d5dc1e23d77decd29fac5d5e6859e9bd8d20c2",
        "similarity.npy": "8ef49a0262a60af314bb203dbe895bdcf795ddf611a6b0b8cd100b593a08e801",
        "summary": "6bb2707337103efc49d76e36bfbb1fe2d6cd343f6de40065070fb758e9c4fcb2"},
        ({"20": 58, "35": 88, "180": 128}, {"above_window": 100, "below_window": 93, "no_syn_text": 194}, 0.4, 0.7,
         [8, 10, 46, 64])),
    "two_level": ({"balance.method": "two_level", "balance.coarse_k": 2}, {
        "balanced-00000.parquet": "47401b10f118ff0361aebd1be5332e81399b5e01e0ce1d6e7afb698c5edcbe1c",
        "balanced-00001.parquet": "357b12c262d076094a3d299998ef0998612961c3f43f11c9712f186e47994b63",
        "balanced-00002.parquet": "7218d8c6daedd6a2ad5659ce03166e1927eda29bb61d86fb9f535e3cc3ccb8fc",
        "image_cluster_sizes.npy": "62716cd76699d1cb06f16ce08041f38b19a4930cc74d65261e966c9c1d69ba19",
        "similarity.npy": "8a35a226d120673c69d65535c1cbb72787b3ee8677bcc23caf17ebff77155d8d",
        "summary": "0a3e7db7ea9296feaebef6b5ffb3b3d6e56ec3b0f40ebd0563756ee51dbd3058"},
        ({"20": 80, "35": 140, "180": 307}, {"above_window": 101, "below_window": 107}, 0.4, 0.7, [65, 67, 86, 89])),
}


WINDOW_ADDED = ("below_low", "above_high", "outside_of_sims", "text_tags", "accept_removal")


def output_digests(d):
    import hashlib

    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(d.glob("balanced-*.parquet")) + [d / "image_cluster_sizes.npy", d / "similarity.npy"]}
    m = json.loads((d / "manifest.json").read_text())
    summary = {k: m[k] for k in ("window", "kmeans", "caps", "image_clusters", "counts")}
    # the removal fractions and the guard's settings came after the recording: checked apart (test_removal_guard)
    summary["window"] = {k: v for k, v in m["window"].items() if k not in WINDOW_ADDED}
    out["summary"] = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()
    return out, m


@pytest.mark.parametrize("variant,extra", [("absolute", {}), ("quantile", {}), ("syn_holes", {}),
                                           ("two_level", {}), ("absolute", {"balance.reduce_items": 50}),
                                           ("two_level", {"balance.reduce_items": 100})])
def test_outputs_equal_the_recorded_rank0_stage(tmp_path, variant, extra):
    """Same bytes as the old stage (every balanced shard, both side files, the manifest summary); the reducer
    count (reduce_items 50 -> 4 partitions instead of 1) changes none of them."""
    over, digests, (caps, dropped, low, high, sizes) = OLD[variant]
    planted_pairs(tmp_path)
    if variant == "syn_holes":
        write_syn_stages(tmp_path, holes=True)
    run_build(cfg_for(tmp_path, **over, **extra))
    got, m = output_digests(tmp_path / "balance")
    assert m["caps"] == caps and m["counts"]["dropped"] == dropped
    assert (m["window"]["low"], m["window"]["high"]) == (low, high)
    sims = np.load(tmp_path / "balance" / "similarity.npy").astype(np.float64)  # every image's, before the window
    sims = sims[np.isfinite(sims)]
    assert (m["window"]["below_low"], m["window"]["above_high"]) == (
        round(float((sims < low).mean()), 6), round(float((sims > high).mean()), 6)), m["window"]
    assert sorted(np.load(tmp_path / "balance" / "image_cluster_sizes.npy").tolist()) == sizes
    assert got == digests
    if "balance.reduce_items" in extra:
        assert (tmp_path / "balance" / "_rank-4").is_dir()


def test_streamed_quantiles_equal_numpy(tmp_path):
    """Two histogram passes over shard files give np.quantile's linear interpolation bit for bit (ties, NaNs,
    negative values, a single value, the ends)."""
    from realsyn_pl.construct.balance.window import linear_quantiles

    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 2000))
        x = (rng.normal(size=n) * 10.0 ** int(rng.integers(-2, 3))).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x, 1).astype(np.float32)
        if trial % 4 == 0:
            x[rng.integers(0, n, size=n // 10 + 1)] = np.nan
        paths = []
        for i, part in enumerate(np.array_split(x, int(rng.integers(1, 5)))):
            paths.append(tmp_path / f"s{trial}-{i}.npy")
            np.save(paths[-1], part)
        qs = [float(rng.uniform()), 0.0, 1.0, 0.1, 0.95]
        finite = x[np.isfinite(x)]
        if len(finite):
            assert linear_quantiles(paths, qs) == [float(v) for v in np.quantile(finite, qs)]
        else:
            with pytest.raises(ValueError, match="no similarities"):
                linear_quantiles(paths, qs)


def test_image_without_embedding_is_a_one_line_error(tmp_path):
    from realsyn_pl.construct.engine.arrays import read_array_shard, write_array_shard

    planted_pairs(tmp_path)
    ids, arr = read_array_shard(tmp_path / "dedup_images", "emb", 1)
    write_array_shard(tmp_path / "dedup_images", "emb", 1, ids[1:], arr[1:])
    with pytest.raises(ConfigError, match=f"retrieve shard 1: 1 image\\(s\\) have no embedding .* first {ids[0]}"):
        run_build(cfg_for(tmp_path))


def test_batched_cosines_are_the_single_pair_dot_products():
    """The map's batched product gives the bits the per-row float32 dot products gave (rows gathered in any order,
    more rows than one chunk)."""
    from realsyn_pl.construct.balance import sampler

    rng = np.random.default_rng(1)
    for d in (16, 64, 768):
        a = rng.normal(size=(300, d)).astype(np.float16)
        b = rng.normal(size=(200, d)).astype(np.float16)
        ra, rb = rng.integers(0, 300, 5000), rng.integers(0, 200, 5000)
        want = np.array([float(np.asarray(a[i], np.float32) @ np.asarray(b[k], np.float32)) for i, k in zip(ra, rb)],
                        np.float32)
        old_chunk, sampler.CHUNK = sampler.CHUNK, 1024
        try:
            got = sampler.cosines(a, ra, b, rb)
        finally:
            sampler.CHUNK = old_chunk
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


# ---- balance.sampling=random: Table 5's ablation at the balanced sizes -------------------------------------------
@pytest.fixture(scope="module")
def built_random(tmp_path_factory):
    work = tmp_path_factory.mktemp("bal_random")
    planted_pairs(work)
    run_build(cfg_for(work, **{"balance.sampling": "random"}))
    return work


def random_sets(rows):
    return {t: {i for i, r in rows.items() if r["random_cap"] is not None and r["random_cap"] <= t}
            for t in (20, 35, 180)}


def test_random_sampling_has_the_balanced_sizes_nested_from_the_same_pool(built, built_random):
    built, _ = built
    bal, rnd = balanced(built), balanced(built_random)
    assert set(rnd) == set(bal)  # the same in-window pool, with the same balanced columns beside random_cap
    assert all(rnd[i]["cluster_rank"] == r["cluster_rank"] for i, r in bal.items())
    m = json.loads((built_random / "balance" / "manifest.json").read_text())
    assert m["sampling"] == "random" and json.loads((built / "balance" / "manifest.json").read_text())["sampling"] \
        == "balanced"
    sets = random_sets(rnd)
    for t in (20, 35, 180):
        want = {i for i, r in bal.items() if r["cluster_rank"] < t}
        assert len(sets[t]) == len(want) == m["caps"][str(t)] == m["random_caps"][str(t)]
        assert m["counts"]["produced"][f"random_cap_{t}"] == len(want)
        assert sets[t] != want
    assert sets[20] < sets[35] < sets[180] < set(rnd)
    assert {r["random_cap"] for r in rnd.values()} == {20, 35, 180, None}
    # uniform over the pool, not per cluster: the largest cluster (240 of the 307 in-window pairs) keeps far more
    # than the cap (binomial mean 65 * 240 / 307 = 51, sd 3.3)
    sizes = np.bincount([r["image_cluster"] for r in bal.values()])
    big = int(np.argmax(sizes))
    in_big = sum(rnd[i]["image_cluster"] == big for i in sets[20])
    assert sizes[big] == 240 and 40 <= in_big <= 62


def test_random_sampling_is_seeded_and_independent_of_reducers(built_random, tmp_path):
    first = random_sets(balanced(built_random))
    again, other = tmp_path / "again", tmp_path / "other"
    planted_pairs(again)
    run_build(cfg_for(again, **{"balance.sampling": "random", "balance.reduce_items": 50}))  # 4 reducers
    for a, b in zip(sorted((built_random / "balance").glob("balanced-*.parquet")),
                    sorted((again / "balance").glob("balanced-*.parquet"))):
        assert a.read_bytes() == b.read_bytes()
    planted_pairs(other)
    run_build(cfg_for(other, **{"balance.sampling": "random", "balance.seed": 1}))
    assert random_sets(balanced(other))[20] != first[20]


def test_write_writes_the_random_subset_in_the_official_text_style(built_random):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from realsyn_pl.construct.release.text_style import official_text

    cfg = cfg_for(built_random, **{"balance.sampling": "random", "stage": "write", "write.cap": 20,
                                   "write.samples_per_shard": 40, "write.text_style": "official"})
    run_build(cfg)
    out = built_random / "write"
    index = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("?????.parquet"))]).to_pylist()
    assert {r["image_id"] for r in index} == random_sets(balanced(built_random))[20] and len(index) == 65
    for r in index:
        assert r["text1"] == official_text(f"text one of {r['image_id']}") != f"text one of {r['image_id']}"
        assert r["text3"] == official_text(f"text three of {r['image_id']}")
    m = json.loads((out / "manifest.json").read_text())
    assert (m["sampling"], m["text_style"], m["samples"]) == ("random", "official", 65)
    card = (out / "card.md").read_text()
    assert "written: cap 20, random sampling" in card and "random sampling (Table 5's ablation" in card
    cfg = cfg_for(built_random, **{"stage": "write", "write.cap": 20})  # balance.sampling=balanced
    with pytest.raises(ConfigError, match="balance.sampling=balanced but the balance stage .* sampling=random"):
        run_build(cfg)


def test_random_cut_is_the_n_smallest_keys_by_key_then_position(tmp_path):
    """The streamed cut equals a full sort by (key, shard, row), also with many tied keys and empty shards."""
    from realsyn_pl.construct.balance.random_subset import cuts

    rng = np.random.default_rng(0)
    for trial in range(12):
        parts = []
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.integers(0, 200))
            tied = rng.integers(0, 4, n).astype(np.uint64) * np.uint64(2 ** 61) + np.uint64(trial)
            parts.append(tied if trial % 2 else rng.integers(0, 2 ** 64 - 1, n, dtype=np.uint64))
        paths = [tmp_path / f"{trial}-{s}.npy" for s in range(len(parts))]
        for p, k in zip(paths, parts):
            np.save(p, k)
        keys = np.concatenate(parts)
        shard = np.concatenate([np.full(len(k), s) for s, k in enumerate(parts)])
        row = np.concatenate([np.arange(len(k)) for k in parts])
        order = np.lexsort((row, shard, keys))
        sizes = sorted({0, len(keys), *rng.integers(0, len(keys) + 1, 3).tolist()})
        for n, cut in zip(sizes, cuts(paths, sizes)):
            want = np.zeros(len(keys), bool)
            want[order[:n]] = True
            got = np.concatenate([cut.inside(k, s) for s, k in enumerate(parts)])
            assert cut.size == n and np.array_equal(got, want)
