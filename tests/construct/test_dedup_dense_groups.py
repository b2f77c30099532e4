"""Dense near-duplicate groups (a re-posted image, a templated sentence: thousands of near copies) in bounded
memory: a pair unit folds its pairs into a minimum spanning forest instead of writing them, and the groups, the
quantile threshold and the keepers stay those of all pairs."""
import tracemalloc

import numpy as np
import pytest

from realsyn_pl.construct.extract import semdedup as sd
from realsyn_pl.construct.extract.union_find import groups_and_keepers, threshold_for_fraction


def _unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _pool(rng, d, background, groups, noise):
    """Random background rows, then near copies of a few of them (groups: copies per base), shuffled."""
    x = [_unit(rng.normal(size=(background, d)))]
    for g, n in enumerate(groups):
        x.append(_unit(x[0][g] + rng.normal(scale=noise, size=(n, d))))
    x = np.concatenate(x)
    return x[rng.permutation(len(x))]


def _assign(tmp_path, x, shards):
    """Every item a member of cluster 0, the pool cut into `shards` assignment files (global positions)."""
    paths, cuts = [], np.linspace(0, len(x), shards + 1).astype(int)
    for i in range(shards):
        pos = np.arange(cuts[i], cuts[i + 1])
        path = tmp_path / f"assign-{i:05d}.npy"
        sd.save_assignment(path, pos, np.zeros((len(pos), 1), np.int64), x[pos].astype(np.float16))
        paths.append(path)
    return paths


def _forest(paths, n, bucket_items, threshold, exact_all, chunk, block=16, floor=0.0):
    units = sd.buckets(np.array([n]), bucket_items)
    reduce = sd.Forest(chunk)
    seen = 0
    for u in units:
        f, s = sd.bucket_forest(paths, u, threshold, block, exact_all, chunk, floor=floor)
        assert len(f) < n  # at most one edge per item, whatever the pairs
        reduce.add(f)
        seen += s
    return reduce.result(), seen, len(units)


@pytest.mark.parametrize("mode", ["absolute", "quantile"])
def test_forest_gives_the_groups_threshold_and_keepers_of_all_pairs(tmp_path, mode):
    rng = np.random.default_rng(0)
    x = _pool(rng, 24, 200, [60, 12, 5, 3], 0.05)
    x16 = x.astype(np.float16).astype(np.float32)  # what the stage reads back
    n = len(x)
    paths = _assign(tmp_path, x, 3)
    search = 0.25 if mode == "quantile" else 0.1
    # every pair in one pass: the reference
    allp = sd.cluster_pairs(np.arange(n), x16, np.arange(0), x16[:0], search, block=n)
    forest, seen, units = _forest(paths, n, 60, search, mode == "quantile", chunk=50)
    assert units > 3 and len(allp) > 10 * len(forest)  # tiled, and far fewer edges than pairs
    if mode == "quantile":  # every pair is ranked by distance
        assert seen >= len(allp)
    else:  # only which items connect matters: pairs of items a unit has already connected are not kept
        assert seen < len(allp)
    if mode == "quantile":
        t_ref, removed_ref = threshold_for_fraction(n, np.column_stack([allp["a"], allp["b"]]), allp["dist"], 0.2)
        t, removed = sd.forest_threshold(n, forest["dist"], 0.2)
        assert (t, removed) == (t_ref, removed_ref) and 0 < t < search
        allp, forest = allp[allp["dist"] < t], forest[forest["dist"] < t]
    groups, ref = sd.components(forest), sd.components(allp)
    np.testing.assert_array_equal(groups, ref)
    rows = sd.Rows([x16], np.array([0]))
    _, keep = groups_and_keepers(x16, np.column_stack([allp["a"], allp["b"]]))
    k = sd.keepers(groups, rows, max_rows=20)  # the group of 60 streamed in chunks of 20
    kept = set(np.flatnonzero(keep).tolist())
    assert {int(p) for p, kp in k if p == kp} == kept & set(groups["pos"].tolist())


def test_a_quantile_floor_connects_a_tight_group_without_ranking_it_and_keeps_the_threshold(tmp_path):
    """dedup.quantile_floor: 300 near copies (all pairs far under the floor) and looser groups that set the
    threshold above it: the same threshold, removal and groups as ranking every pair, from a small share of the
    pairs, in one unit and over tiles; a floor above the threshold is seen (the merges under it reach the target)."""
    rng = np.random.default_rng(3)
    x = np.concatenate([_pool(rng, 24, 200, [40, 20, 10], 0.05), _pool(rng, 24, 1, [300], 0.002)[:300]])
    x16 = x.astype(np.float16).astype(np.float32)
    n, search, fraction = len(x), 0.25, 0.6
    paths = _assign(tmp_path, x, 3)
    allp = sd.cluster_pairs(np.arange(n), x16, np.arange(0), x16[:0], search, block=n)
    t_ref, removed_ref = threshold_for_fraction(n, np.column_stack([allp["a"], allp["b"]]), allp["dist"], fraction)
    ranked, seen, _ = _forest(paths, n, 2 * n, search, True, chunk=500)
    floor = 0.005
    assert (allp["dist"] < floor).sum() > 40_000 and t_ref > floor  # the tight group's pairs, the threshold above
    floored, seen_floor, _ = _forest(paths, n, 2 * n, search, True, chunk=500, floor=floor)
    assert sd.forest_threshold(n, floored["dist"], fraction) == (t_ref, removed_ref)
    assert sd.forest_threshold(n, ranked["dist"], fraction) == (t_ref, removed_ref)
    np.testing.assert_array_equal(sd.components(floored[floored["dist"] < t_ref]),
                                  sd.components(allp[allp["dist"] < t_ref]))
    assert seen_floor < seen / 5, (seen_floor, seen)
    # the group over 5 x 5 tiles of 60 (off the diagonal a tile's rows are not its columns): still the same
    # threshold and groups, and a row meeting the group's component adds one pair, not one per column
    tiled, seen_tiled, units = _forest(paths, n, 120, search, True, chunk=500, floor=floor)
    assert units > 20 and sd.forest_threshold(n, tiled["dist"], fraction) == (t_ref, removed_ref)
    np.testing.assert_array_equal(sd.components(tiled[tiled["dist"] < t_ref]),
                                  sd.components(allp[allp["dist"] < t_ref]))
    assert seen_tiled < seen / 4, (seen_tiled, seen)
    # a floor above the threshold: the merges under it alone reach the target (the stage stops on this)
    high, _, _ = _forest(paths, n, 2 * n, search, True, chunk=500, floor=t_ref * 1.5)
    assert (high["dist"] < t_ref * 1.5).sum() >= removed_ref


def test_a_cluster_of_4000_near_copies_stays_under_the_configured_memory_bound(tmp_path):
    """4,000 near copies (d = 256, noise 0.01: 8.0M pairs under the threshold, where gathering both float64 rows of
    every pair took 17.7 GB) plus 1,000 others in one cluster: the pair unit's peak heap stays under the bound
    derived from its config (1 GiB at most here), it handles at most a block of rows' pairs, its forest has one edge
    per item of the group but one, and the keeper is the copy nearest the group's mean."""
    rng = np.random.default_rng(1)
    d, copies = 256, 4000
    x = _pool(rng, d, 1000, [copies], 0.01)
    paths = _assign(tmp_path, x, 4)
    bucket_items, block, chunk = 20_000, 256, 200_000
    bound = sd.task_memory_bound(bucket_items, block, chunk, d)
    assert bound < 1 << 30
    tracemalloc.start()
    try:
        (u,) = sd.buckets(np.array([len(x)]), bucket_items)
        forest, seen = sd.bucket_forest(paths, u, 0.1, block, False, chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the group's 8.0M pairs are not all handled: after the first block of rows only pairs joining two components
    assert peak < bound and seen <= block * len(x), (seen, peak, bound)
    groups = sd.components(forest)
    # the copies and the row they copy: one group, one edge per item but one
    assert len(forest) == copies and len(groups) == copies + 1 and len(set(groups["group"].tolist())) == 1
    x16 = x.astype(np.float16).astype(np.float32)
    rows = sd.Rows([x16], np.array([0]))
    streamed = sd.keepers(groups, rows, max_rows=512)
    whole = sd.keepers(groups, rows)
    np.testing.assert_array_equal(streamed, whole)
    members = groups["pos"]
    v = x16[members].astype(np.float64)
    assert set(whole["keeper"].tolist()) == {int(members[int(np.argmax(v @ v.mean(0)))])}
