"""The similarity products on a GPU (torch) give the CPU path's pairs, kept sets and top-k, and faiss-gpu's k-means
the CPU fit's clusters. The CPU dry run runs the torch code on torch's CPU device (the same code, another device)
against the numpy / faiss-cpu path; the cuda cases run it on the GPU."""
import numpy as np
import pytest

from realsyn_pl.construct.clustering import kmeans
from realsyn_pl.construct.engine import products
from realsyn_pl.construct.extract import semdedup as sd
from realsyn_pl.construct.retrieve.topk import intra_cluster_topk


@pytest.fixture
def device(target) -> str:
    """The torch product's device on the target."""
    return "cuda" if target.cuda else "torch:cpu"


def _unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _near_pool(seed=0, n=300, d=32):
    rng = np.random.default_rng(seed)
    x = _unit(rng.normal(size=(n, d)))
    for g in range(0, 60, 6):  # groups of near copies at several distances from their base
        x[g + 1:g + 6] = _unit(x[g] + rng.normal(scale=0.02 * (1 + g % 3), size=(5, d)))
    return x


def test_pair_candidates_on_torch_equal_numpy(device):
    x = _near_pool()
    want = [np.concatenate(z) for z in zip(*products._numpy_candidates(x, x[:250], 0.1, 0, 0, 200, 64, 500))]
    got = [np.concatenate(z) for z in zip(*products._torch_candidates(x, x[:250], 0.1, 0, 0, 200, 64, 500, device))]
    order_w, order_g = np.lexsort((want[1], want[0])), np.lexsort((got[1], got[0]))
    np.testing.assert_array_equal(want[0][order_w], got[0][order_g])
    np.testing.assert_array_equal(want[1][order_w], got[1][order_g])
    np.testing.assert_allclose(want[2][order_w], got[2][order_g], atol=1e-5)
    assert len(want[0]) > 60  # the planted pairs, member x member once and member x guest


def _labels_with_a_component(n_rows, n_cols):
    """Rows 64.., columns 0..119 and the guest columns 200.. (copies of rows 200..) already one component (label 7);
    the others each their own."""
    lr, lc = np.arange(100, 100 + n_rows), np.arange(1000, 1000 + n_cols)
    lr[64:], lc[:120], lc[200:] = 7, 7, 7
    return lambda lo, hi: (lr[lo:hi], lc)


def test_rows_of_one_component_skip_its_columns_on_both_devices(device):
    """A block whose rows are already one component is multiplied only by the columns outside it, and yields the
    same pairs as the whole block with the same-label pairs masked out, on numpy and on torch."""
    x = _near_pool()
    labels = _labels_with_a_component(len(x), 250)
    parts = products._parts(64, 250, labels, 128)
    assert len(parts) == 1 and len(parts[0][1]) == 80  # the 170 columns of the component are not multiplied
    lr, lc = labels(0, len(x))
    full = [np.concatenate(z) for z in zip(*products._numpy_candidates(x, x[:250], 0.3, 0, 0, 200, 64, 500))]
    keep = lr[full[0]] != lc[full[1]]
    want = [v[keep] for v in full]
    for fn in (products._numpy_candidates, products._torch_candidates):
        args = (x, x[:250], 0.3, 0, 0, 200, 64, 500) + ((device,) if fn is products._torch_candidates else ())
        got = [np.concatenate(z) for z in zip(*fn(*args, labels=labels))]
        o_w, o_g = np.lexsort((want[1], want[0])), np.lexsort((got[1], got[0]))
        np.testing.assert_array_equal(want[0][o_w], got[0][o_g])
        np.testing.assert_array_equal(want[1][o_w], got[1][o_g])
        np.testing.assert_allclose(want[2][o_w], got[2][o_g], atol=1e-5)
    assert len(want[0]) < len(full[0])


@pytest.mark.parametrize("mode", ["absolute", "quantile"])
def test_gpu_forest_keeps_the_cpu_kept_set(tmp_path, mode, device):
    x = _near_pool(1)
    path = tmp_path / "assign-00000.npy"
    sd.save_assignment(path, np.arange(len(x)), np.zeros((len(x), 1), np.int64), x.astype(np.float16))
    unit = (0, 1, 0, 0, 0)
    exact_all = mode == "quantile"
    cpu, _ = sd.bucket_forest([path], unit, 0.2, 64, exact_all, 1000, "cpu")
    gpu, _ = sd.bucket_forest([path], unit, 0.2, 64, exact_all, 1000, device)
    if exact_all:  # every distance recomputed in float64 on the host: the same forest, byte for byte
        np.testing.assert_array_equal(cpu, gpu)
    np.testing.assert_array_equal(sd.components(cpu), sd.components(gpu))
    rows = sd.Rows([x.astype(np.float16).astype(np.float32)], np.array([0]))
    np.testing.assert_array_equal(sd.keepers(sd.components(cpu), rows), sd.keepers(sd.components(gpu), rows))


def test_topk_on_torch_equals_numpy_with_ties_to_the_lower_index(device):
    rng = np.random.default_rng(2)
    q = _unit(rng.normal(size=(40, 16)))
    s = _unit(rng.normal(size=(120, 16)))
    want = products.topk(q, s, 6, 1000, "cpu")
    got = products.topk(q, s, 6, 1000, device)
    np.testing.assert_array_equal(want[0], got[0])
    np.testing.assert_array_equal(want[1], got[1])  # reranked in float64 on the host: the same values too
    raw = products._torch_topk(q, s, 6, 1000, device)  # the float32 selection alone
    np.testing.assert_array_equal(want[0], raw[0])
    np.testing.assert_allclose(want[1], raw[1], atol=1e-5)
    # four equal sentences: where their scores are equal the lower index comes first, also at the k-th place
    s[[30, 31, 77]] = s[5]
    idx, val = products._torch_topk(q, s, 6, 1000, device)
    dup = np.isin(idx, [1005, 1030, 1031, 1077])
    rows = np.flatnonzero(dup.any(axis=1))
    assert len(rows) >= 3
    for r in rows:
        same = dup[r] & (val[r] == val[r][dup[r]][0])
        assert list(idx[r][same]) == sorted(idx[r][same])
        assert device == "cuda" or idx[r][same][0] == 1005  # torch's CPU product gives equal rows equal scores
    assert products._torch_topk(q, s[:3], 6, 0, device)[0][:, 3:].tolist() == [[-1] * 3] * 40  # padded


def test_intra_cluster_topk_and_probe_on_torch_equal_the_cpu_path(device, monkeypatch):
    rng = np.random.default_rng(3)
    sent = _unit(rng.normal(size=(200, 16)))
    sent_cl = np.sort(rng.integers(0, 7, 200))
    img = _unit(rng.normal(size=(50, 16)))
    img_cl = rng.integers(0, 8, 50)  # cluster 7 holds no sentence: -1 / -inf
    want = intra_cluster_topk(img, img_cl, sent, sent_cl, 4, "cpu")
    got = intra_cluster_topk(img, img_cl, sent, sent_cl, 4, device)
    np.testing.assert_array_equal(want[0], got[0])
    np.testing.assert_array_equal(want[1], got[1])
    # the same images scored in two halves (another product shape): the same bytes
    half = [intra_cluster_topk(img[h], img_cl[h], sent, sent_cl, 4, "cpu") for h in (slice(0, 23), slice(23, 50))]
    np.testing.assert_array_equal(np.concatenate([h[0] for h in half]), want[0])
    np.testing.assert_array_equal(np.concatenate([h[1] for h in half]), want[1])
    assert (want[0][img_cl == 7] == -1).all()
    cents = _unit(rng.normal(size=(64, 16)))
    faiss_ids, faiss_sims = kmeans.Assigner(cents, False).search(img, 3)
    ids, sims = products.TorchAssigner(cents, device, batch=17, fp16=False).search(img, 3)
    np.testing.assert_array_equal(faiss_ids, ids)
    np.testing.assert_allclose(faiss_sims, sims, atol=1e-5)
    # a score budget of 5 rows of 64 fp32 centres: the batch shrinks to 5 rows, the result does not change
    monkeypatch.setattr(products, "ASSIGN_SCORE_BYTES", 5 * 64 * 8)
    small = products.TorchAssigner(cents, device, batch=17, fp16=False)
    assert small.batch == 5
    np.testing.assert_array_equal(small.search(img, 3)[0], ids)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings group the rows alike (cluster numbers aside)."""
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


def _faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if kmeans.faiss_has_gpu() else 0


def test_kmeans_on_the_gpu_finds_the_cpu_clusters(target, device):
    """faiss-gpu's k-means (where this faiss has GPU support) finds the CPU fit's clusters on separated data; on the
    dry run and without faiss-gpu the CPU fit's centres, assigned by the torch assigner, give faiss's assignment."""
    rng = np.random.default_rng(4)
    centres = _unit(rng.normal(size=(8, 32)))
    x = _unit(np.repeat(centres, 60, axis=0) + rng.normal(scale=0.02, size=(480, 32)))
    truth = np.repeat(np.arange(8), 60)
    cpu = kmeans.train(x, 8, 20, 0, gpu=False, init="kmeans++", nredo=3)
    ids, _ = kmeans.Assigner(cpu.centroids, False).search(x, 1)
    assert _same_partition(ids[:, 0], truth)  # the planted clusters, up to their numbering
    torch_ids, _ = products.TorchAssigner(cpu.centroids, device, fp16=False).search(x, 1)
    np.testing.assert_array_equal(torch_ids, ids)
    if target.cuda:
        if _faiss_gpus() < 1:
            pytest.skip("this faiss has no GPU support (pip install 'realsyn_pl[gpu]')")
        gpu = kmeans.train(x, 8, 20, 0, gpu=True, init="kmeans++", nredo=3)
        gpu_ids, _ = kmeans.Assigner(gpu.centroids, True, fp16=True).search(x, 1)
        assert gpu.gpu and _same_partition(gpu_ids[:, 0], truth)
        assert gpu.objective == pytest.approx(cpu.objective, rel=1e-3)
