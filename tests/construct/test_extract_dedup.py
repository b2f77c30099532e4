"""Dedup: the key-range / cluster-bucket rewrite keeps what the former global stage kept (fixed expected rows,
captured from it before the rewrite), finds border-straddling pairs, has no k-NN cap; the Union-Find helpers group
planted near-duplicates exactly and keep the member nearest each group's centroid."""
import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from realsyn_pl.cli import main
from realsyn_pl.construct.clustering import kmeans
from realsyn_pl.construct.engine.arrays import ArrayReader, write_array_shard
from realsyn_pl.construct.engine.records import write_records
from realsyn_pl.construct.engine.schemas import FILTERED_IMAGES, PPL_SENTENCES
from realsyn_pl.construct.engine.stage import Counts, Stage
from realsyn_pl.construct.extract import semdedup as sd
from realsyn_pl.construct.extract.dedup import exact_keep, text_key
from realsyn_pl.construct.extract.union_find import (
    UnionFind,
    groups_and_keepers,
    near_duplicate_pairs,
    threshold_for_fraction,
)
from support import write_stage


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def planted(seed=0, n_base=60, d=64):
    rng = np.random.default_rng(seed)
    x = _unit(rng.normal(size=(n_base, d)))  # random directions: pairwise cosine ~ N(0, 1/d), far from 0.9
    groups = []
    rows = list(x)
    for g, size in enumerate([2, 3, 5]):
        members = [g]  # base vector g plus perturbed copies of it
        for _ in range(size - 1):
            rows.append(_unit(x[g] + rng.normal(scale=0.05, size=d)))
            members.append(len(rows) - 1)
        groups.append(sorted(members))
    return np.asarray(rows, dtype=np.float32), groups


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_planted_groups_found_exactly_and_centroid_member_kept(tmp_path, index):
    x, groups = planted()
    pairs = near_duplicate_pairs(x, threshold=0.1, k=8, index=index, nlist=2, nprobe=2, chunk=16,
                                 cache_dir=tmp_path / index)
    roots, keep = groups_and_keepers(x, pairs)
    found = {}
    for i, r in enumerate(roots):
        found.setdefault(int(r), []).append(i)
    multi = sorted(sorted(m) for m in found.values() if len(m) > 1)
    assert multi == sorted(groups)
    for g in groups:
        centroid = x[g].astype(np.float64).mean(0)
        expect = g[int(np.argmax(x[g].astype(np.float64) @ centroid))]
        assert [i for i in g if keep[i]] == [expect]
    assert keep.sum() == len(x) - sum(len(g) - 1 for g in groups)
    # the cached search chunks give the same pairs on a rerun
    again = near_duplicate_pairs(x, threshold=0.1, k=8, index=index, nlist=2, nprobe=2, chunk=16,
                                 cache_dir=tmp_path / index)
    np.testing.assert_array_equal(again, pairs)


def test_threshold_is_strict_cosine_distance():
    a = np.array([1.0, 0.0], np.float32)
    close = _unit(np.array([1.0, 0.40], np.float32))  # cos 0.928 -> distance 0.072
    far = _unit(np.array([1.0, 0.55], np.float32))    # cos 0.876 -> distance 0.124
    x = np.stack([a, close, far])
    assert near_duplicate_pairs(x, 0.1, k=2).tolist() == [[0, 1], [1, 2]]  # close-far: 7 degrees apart
    assert near_duplicate_pairs(x, 0.12, k=2).tolist() == [[0, 1], [1, 2]]
    assert near_duplicate_pairs(x, 0.13, k=2).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_union_find_transitive_and_exact_keys():
    uf = UnionFind(5)
    uf.union(3, 4)
    uf.union(1, 4)
    assert uf.roots().tolist() == [0, 1, 2, 1, 1]
    keep, rep = exact_keep(["a", "b", "a", "c", "b"])
    assert keep.tolist() == [True, True, False, True, False] and rep.tolist() == [0, 1, 0, 3, 1]
    assert text_key("A dog, running!") == text_key("a   DOG running") != text_key("a dog runs")


def test_pairs_carry_their_cosine_distance():
    x, _ = planted()
    pairs, dist = near_duplicate_pairs(x, threshold=0.1, k=8, with_distances=True)
    np.testing.assert_array_equal(pairs, near_duplicate_pairs(x, threshold=0.1, k=8))
    exact = 1.0 - np.einsum("ij,ij->i", x[pairs[:, 0]].astype(np.float64), x[pairs[:, 1]].astype(np.float64))
    np.testing.assert_allclose(dist, exact, atol=1e-5)


@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.1])
def test_quantile_threshold_removes_the_target_fraction_with_the_smallest_threshold(fraction):
    """Groups of growing spread: the threshold found is the smallest at which Union-Find removes the target, and a
    hair less removes fewer (brute-force Union-Find as the reference)."""
    rng = np.random.default_rng(1)
    base = _unit(rng.normal(size=(100, 64)))
    rows = list(base)
    for g in range(30):  # one perturbed copy of base[g], spread growing with g
        rows.append(_unit(base[g] + rng.normal(scale=0.01 + 0.004 * g, size=64)))
    x = np.asarray(rows, np.float32)
    pairs, dist = near_duplicate_pairs(x, threshold=0.5, k=8, with_distances=True)
    t, removed = threshold_for_fraction(len(x), pairs, dist, fraction)

    def uf_removed(th):
        return int((~groups_and_keepers(x, pairs[dist < th])[1]).sum())

    assert removed == uf_removed(t) >= np.ceil(fraction * len(x))
    assert uf_removed(float(np.nextafter(np.float32(t), np.float32(0))) - 1e-7) < np.ceil(fraction * len(x))


def test_quantile_threshold_when_the_pairs_cannot_reach_the_target():
    x, groups = planted()
    pairs, dist = near_duplicate_pairs(x, threshold=0.1, k=8, with_distances=True)
    t, removed = threshold_for_fraction(len(x), pairs, dist, 0.9)
    assert removed == sum(len(g) - 1 for g in groups) and t > dist.max()
    assert threshold_for_fraction(len(x), pairs, dist, 0.0) == (0.0, 0)


# ---- the stage -------------------------------------------------------------------------------------------------
WORDS = "red blue green dog cat bike road park tree sky sea sand hill house car boat".split()
PER = 40


PLANTED = [[3, 50], [7, 45, 100], [12, 60, 81, 115]]


def dedup_fixture(work, kind, shards=3, d=16, seed=0, groups=PLANTED):
    """Done record + embedding stages: 3 shards of 40, planted near-duplicate groups across shards, exact-key copies
    (45 -> 70 copies a member of a near-duplicate group; sentence copies differ in case and punctuation only)."""
    rng = np.random.default_rng(seed)
    n = shards * PER
    x = _unit(rng.normal(size=(n, d)))
    for g in groups:
        for m in g[1:]:
            x[m] = _unit(x[g[0]] + rng.normal(scale=0.03, size=d))
    keys = [f"k{j}" for j in range(n)]
    for a, b in [(5, 90), (5, 110), (45, 70), (20, 21)]:
        keys[b] = keys[a]
    ids = [f"doc-{j // PER:05d}-{j % PER:06d}/{'img' if kind == 'images' else 'sent'}-0" for j in range(n)]
    rec_name, emb_name = ("image_filter", "embed_images") if kind == "images" else ("perplexity", "embed_sentences")
    recs, emb = Stage(work, rec_name, {}), Stage(work, emb_name, {})

    def text(j):
        k = int(keys[j][1:])
        w = [WORDS[(k * 7 + t * 3) % len(WORDS)] for t in range(4)] + [f"n{k}"]
        return (" ".join(w).upper() + "!") if j != k else " ".join(w)

    def row(j):
        base = {"id": ids[j], "doc_id": ids[j].split("/")[0]}
        if kind == "images":
            return {**base, "url": f"http://x/{j}", "path": None, "bytes": bytes([j % 256]), "width": 64,
                    "height": 64, "sha256": hashlib.sha256(keys[j].encode()).hexdigest(), "src_row": j % PER}
        return {**base, "text": text(j), "entropy": 1.0 + j, "ppl": 10.0 + j}

    def rec_shard(i):
        write_records(recs.path(kind, i), [row(j) for j in range(i * PER, (i + 1) * PER)],
                      FILTERED_IMAGES if kind == "images" else PPL_SENTENCES)
        c = Counts()
        c.keep(PER)
        return c

    def emb_shard(i):
        write_array_shard(emb.dir, "emb", i, ids[i * PER:(i + 1) * PER], x[i * PER:(i + 1) * PER], "float16")
        c = Counts()
        c.keep(PER)
        return c
    write_stage(recs, range(shards), rec_shard)
    write_stage(emb, range(shards), emb_shard)
    return ids


# (row, E = exact_duplicate | N = near_duplicate, kept row): what the former global stage (faiss flat, k=16,
# Python Union-Find) wrote on dedup_fixture, captured before the rewrite; no item there has more than 6 neighbours
# within distance 0.5, so the k cap never bit.
FORMER = {
    "absolute": [(3, "N", 50), (21, "E", 20), (45, "N", 7), (60, "N", 12), (70, "E", 7), (81, "N", 12), (90, "E", 5),
                 (100, "N", 7), (110, "E", 5), (115, "N", 12)],
    "quantile": [(17, "N", 106), (21, "E", 20), (24, "N", 46), (25, "N", 13), (37, "N", 38), (45, "N", 7),
                 (48, "N", 13), (50, "N", 3), (55, "N", 14), (60, "N", 12), (61, "N", 54), (70, "E", 7),
                 (81, "N", 12), (83, "N", 112), (90, "E", 5), (92, "N", 18), (95, "N", 80), (98, "N", 38),
                 (100, "N", 7), (102, "N", 3), (104, "N", 75), (110, "E", 5), (111, "N", 11), (115, "N", 12)],
}
# the planted fixture removes ~8 % at 0.1, below half the paper's 30.5 %: accepted, as the guard would stop it
MODES = {"absolute": ["dedup.threshold=0.1", "dedup.accept_removal=true"],
         "quantile": ["dedup.mode=quantile", "dedup.quantile=0.2", "dedup.max_threshold=0.5"]}


def _run_fixture(tmp_path, kind, mode, *extra):
    work = tmp_path / f"{kind}-{mode}"
    ids = dedup_fixture(work, kind)
    stage = f"dedup_{kind}"
    assert main(["build", stage, f"work_dir={work}", "progress=false"] + MODES[mode] + list(extra)) == 0
    return work, work / stage, ids


@pytest.mark.parametrize("kind,mode", [("images", "absolute"), ("images", "quantile"), ("sentences", "absolute"),
                                       ("sentences", "quantile")])
def test_stage_keeps_and_removes_exactly_what_the_former_flat_search_did(tmp_path, kind, mode):
    work, out, ids = _run_fixture(tmp_path, kind, mode)
    removed = [r for i in range(3) for r in pq.read_table(out / f"removed-{i:05d}.parquet").to_pylist()]
    reason = {"E": "exact_duplicate", "N": "near_duplicate"}
    assert removed == [{"id": ids[j], "reason": reason[r], "kept_id": ids[k]} for j, r, k in FORMER[mode]]
    gone = {j for j, _, _ in FORMER[mode]}
    rec_dir = work / ("image_filter" if kind == "images" else "perplexity")
    kept_ids, x = ArrayReader.open(out, "emb").load()
    in_ids, x_in = ArrayReader.open(work / f"embed_{kind}", "emb").load()
    assert kept_ids == [i for j, i in enumerate(ids) if j not in gone]
    np.testing.assert_array_equal(x, x_in[[j for j in range(len(ids)) if j not in gone]])
    for i in range(3):  # every input column, the kept rows, in input order
        got = pq.read_table(out / f"{kind}-{i:05d}.parquet")
        want = pq.read_table(rec_dir / f"{kind}-{i:05d}.parquet")
        assert got.schema == want.schema
        assert got.to_pylist() == [r for r in want.to_pylist() if r["id"] not in {ids[j] for j in gone}]
    m = json.loads((out / "manifest.json").read_text())
    n_exact = sum(r == "E" for _, r, _ in FORMER[mode])
    assert m["removed_per_step"] == {"exact_duplicate": n_exact, "near_duplicate": len(gone) - n_exact}
    assert m["clusters"] == 1 and m["pairs"] > 0
    if mode == "quantile":  # the former stage's threshold, to float32 precision
        assert m["semantic_threshold"]["threshold"] == pytest.approx(0.36030575, abs=1e-6)


def test_many_clusters_and_key_partitions_find_the_same_planted_groups(tmp_path):
    """4 k-means clusters (each item also a guest of its second centre) and 3 key-range reducers: the planted
    groups and exact copies come out as with one cluster."""
    _, out, ids = _run_fixture(tmp_path, "images", "absolute", "dedup.cluster_size=30", "dedup.partitions=3")
    removed = [r for i in range(3) for r in pq.read_table(out / f"removed-{i:05d}.parquet").to_pylist()]
    reason = {"E": "exact_duplicate", "N": "near_duplicate"}
    assert removed == [{"id": ids[j], "reason": reason[r], "kept_id": ids[k]} for j, r, k in FORMER["absolute"]]
    assert json.loads((out / "manifest.json").read_text())["clusters"] == 4


def test_each_id_column_is_read_a_constant_number_of_times(tmp_path, monkeypatch):
    """4 near-duplicate groups with a member in each of 6 shards (keepers in several shards): every input id column
    is read at most 3 times over the stage (exact keys, the kept-id shuffle, its own output shard), where looking
    the keepers' ids up from each output shard read a keeper shard once per shard pointing into it."""
    work = tmp_path / "w"
    groups = [[(g + s) % 6 * PER + 34 + g for s in range(6)] for g in range(4)]  # base (g[0]) in shard g
    ids = dedup_fixture(work, "images", shards=6, groups=groups)
    reads, read_table = {}, pq.read_table

    def counting(path, *a, **kw):
        if str(path).endswith(".ids.parquet") and "embed_images" in str(path):
            reads[str(path)] = reads.get(str(path), 0) + 1
        return read_table(path, *a, **kw)

    monkeypatch.setattr(pq, "read_table", counting)
    # the reads are counted in this process: every unit runs here (ray.in_process)
    assert main(["build", "dedup_images", f"work_dir={work}", "progress=false", "dedup.threshold=0.1",
                 "dedup.partitions=2", "ray.in_process=true", "dedup.accept_removal=true"]) == 0
    monkeypatch.setattr(pq, "read_table", read_table)
    out = work / "dedup_images"
    removed = [r for i in range(6) for r in pq.read_table(out / f"removed-{i:05d}.parquet").to_pylist()]
    kept = set(ArrayReader.open(out, "emb").load()[0])
    near = {r["id"]: r["kept_id"] for r in removed if r["reason"] == "near_duplicate"}
    keepers = set()
    for g in groups:
        (keeper,) = [ids[j] for j in g if ids[j] in kept]
        assert all(near[ids[j]] == keeper for j in g if ids[j] != keeper)
        keepers.add(keeper)
    assert len({k.split("/")[0][:9] for k in keepers}) >= 2 and len(near) == 4 * 5  # keepers in several shards
    exact = [(r["id"], r["kept_id"]) for r in removed if r["reason"] == "exact_duplicate"]
    assert exact == [(ids[21], ids[20]), (ids[70], ids[45]), (ids[90], ids[5]), (ids[110], ids[5])]
    assert len(reads) == 6 and max(reads.values()) <= 3, reads


def test_a_cluster_above_the_bucket_budget_is_tiled_with_the_same_result(tmp_path, capsys):
    """A cluster above dedup.bucket_items is searched in square tiles of it (bounded memory), with the same output
    bytes as one whole-cluster search; an over-budget exact reducer is still refused before any work."""
    digests = {}
    for name, budget in (("whole", 1000), ("tiled", 50)):
        work = tmp_path / name
        dedup_fixture(work, "images")
        assert main(["build", "dedup_images", f"work_dir={work}", "progress=false",
                     f"dedup.bucket_items={budget}", "dedup.accept_removal=true"]) == 0
        out = work / "dedup_images"
        digests[name] = {f.name: f.read_bytes() for f in sorted(out.glob("*-*.*"))}
        units = sorted((out / "_pairs" / "_done").glob("*.json"))
        assert (len(units) == 1) if name == "whole" else (len(units) > 3), units
    assert digests["whole"] == digests["tiled"] and len(digests["whole"]) >= 9
    work = tmp_path / "v"
    dedup_fixture(work, "images")
    assert main(["build", "dedup_images", f"work_dir={work}", "progress=false", "dedup.partitions=1",
                 "dedup.reducer_items=100"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "120 items over 1 exact reducers" in err
    assert not (work / "dedup_images" / "_keys").exists()  # refused before any work
    assert sd.buckets(np.array([3, 2, 1, 4, 0]), 5) == [(0, 2, 0, 0, 0), (2, 5, 0, 0, 0)]
    # a cluster of 6 members + 1 guest over budget 4: tiles of 2, the member-only tiles below the diagonal skipped
    tiles = sd.buckets(np.array([3, 7, 2]), 4, np.array([3, 6, 2]))
    assert tiles[0] == (0, 1, 0, 0, 0) and tiles[-1] == (2, 3, 0, 0, 0)
    assert [t[2:4] for t in tiles[1:-1]] == [(0, 0), (0, 2), (0, 4), (0, 6), (2, 2), (2, 4), (2, 6), (4, 4), (4, 6)]


def test_pairs_straddling_a_cluster_border_are_found_through_the_guests(tmp_path):
    """Pairs planted on the bisector of two k-means centres, one item on each side (their nearest centres differ),
    are found by the member x guest search and missed without guests."""
    rng = np.random.default_rng(3)
    d = 16
    anchors = _unit(rng.normal(size=(4, d)))
    x = _unit(np.repeat(anchors, 50, axis=0) + rng.normal(scale=0.15, size=(200, d)))
    cents = kmeans.train(x.astype(np.float32), 4, 20, 0, False, "kmeans++").centroids
    planted = []
    for a, b in [(i, j) for i in range(4) for j in range(i + 1, 4)]:
        mid, away = _unit(cents[a] + cents[b]), cents[a] - cents[b]
        if set(np.argsort(-(cents @ mid))[:2]) != {a, b}:
            continue  # another centre is nearer this border
        for s in (0.004, 0.006):
            planted.append((_unit(mid + s * away), _unit(mid - s * away)))
    rows = np.concatenate([x, np.array([v for p in planted for v in p])]).astype(np.float32)
    labels = kmeans.Assigner(cents).search(rows, 2)[0]
    pos = np.arange(len(rows))
    pair_rows = [(200 + 2 * i, 201 + 2 * i) for i in range(len(planted))]
    assert len(pair_rows) >= 4 and all(labels[a, 0] != labels[b, 0] for a, b in pair_rows)  # straddling pairs

    def found(lab, name):
        path = tmp_path / f"{name}.npy"
        sd.save_assignment(path, pos, lab, rows)
        forest, _ = sd.bucket_forest([path], (0, 4, 0, 0, 0), 0.01, 7, True, 1000)
        group = dict(sd.components(forest).tolist())
        return {(a, b) for a, b in pair_rows if a in group and group.get(a) == group.get(b)}  # a and b joined

    with_guests, without = found(labels, "guests"), found(labels[:, :1], "members")
    assert with_guests == set(pair_rows) and not without


def test_no_k_nearest_neighbour_cap_inside_a_cluster():
    """21 near copies of one vector: all 210 pairs are found, where the former k=16 search saw fewer."""
    rng = np.random.default_rng(5)
    base = _unit(rng.normal(size=(30, 32)))
    copies = _unit(base[0] + rng.normal(scale=0.01, size=(20, 32)))
    x = np.concatenate([base, copies]).astype(np.float32)
    members = np.arange(len(x))
    p = sd.cluster_pairs(members, x, members[:0], x[:0], 0.1, block=8)
    group = {0, *range(30, 50)}
    assert {(int(a), int(b)) for a, b in zip(p["a"], p["b"])} == {(a, b) for a in group for b in group if a < b}
    assert len(near_duplicate_pairs(x, 0.1, k=16)) < 210
    np.testing.assert_allclose(p["dist"], 1 - np.einsum("ij,ij->i", x[p["a"]].astype(np.float64),
                                                        x[p["b"]].astype(np.float64)), atol=1e-6)


def test_components_groups_keepers_and_parts():
    p = sd.unique_pairs(np.array([9, 4, 2, 4]), np.array([4, 9, 7, 20]), np.array([0.05, 0.03, 0.01, 0.02], "f4"))
    assert [(int(a), int(b), float(d)) for a, b, d in p] == [(2, 7, pytest.approx(0.01)), (4, 9, pytest.approx(0.03)),
                                                            (4, 20, pytest.approx(0.02))]
    g = sd.components(p)
    assert g.tolist() == [(2, 2), (7, 2), (4, 4), (9, 4), (20, 4)]
    bounds = sd.group_bounds(g, 3)
    parts = [g[bounds[p]:bounds[p + 1]] for p in range(3)]
    assert [q.tolist() for q in parts] == [[(2, 2), (7, 2)], [(4, 4), (9, 4), (20, 4)], []]
    x = np.zeros((21, 2), np.float32)
    x[[2, 7]] = [[1, 0], [1, 0]]
    x[[4, 9, 20]] = _unit(np.array([[1, 0.2], [1, 0.0], [1, -0.3]], np.float32))
    rows = sd.Rows([x[:10], x[10:]], np.array([0, 10]))
    k = sd.keepers(g, rows)
    assert k.tolist() == [(2, 2), (4, 9), (7, 2), (9, 9), (20, 9)]  # tie -> lowest position; else nearest the mean
