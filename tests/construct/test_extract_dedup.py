"""Union-Find dedup groups planted near-duplicates exactly and keeps the member nearest each group's centroid."""
import numpy as np
import pytest

from realsyn_pl.construct.extract.dedup import exact_keep, text_key
from realsyn_pl.construct.extract.union_find import (
    UnionFind,
    groups_and_keepers,
    near_duplicate_pairs,
    threshold_for_fraction,
)


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
