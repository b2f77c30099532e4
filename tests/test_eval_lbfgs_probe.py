"""CLIP's linear-probe protocol (linear_probe.protocol=lbfgs) against scikit-learn's LogisticRegression: the same
coefficients and probabilities, and the same C chosen by the sweep."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from realsyn_pl.evaluation import lbfgs_probe as P
from realsyn_pl.evaluation import linear_probe
from realsyn_pl.evaluation.config import LinearProbeConfig

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_blas_thread():
    """scipy's L-BFGS-B on tiny problems: a second OpenBLAS thread on a busy machine makes it ~15x slower."""
    with threadpool_limits(1):
        yield


def _blobs(rng: np.random.Generator, n: int, centers: np.ndarray, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(centers), n)
    return centers[y] + noise * rng.normal(size=(n, centers.shape[1])), y


@pytest.mark.parametrize("c", [0.1, 10.0])
def test_fit_equals_sklearn_logistic_regression(c):
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 200, rng.normal(size=(4, 16)), noise=1.5)
    # both solved to a tight gradient tolerance, so what is compared is the optimum, not where each stopped
    # (scikit-learn >= 1.2 divides its objective by n: its tol 1e-10 is our 1e-10 * n)
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x, y)
    probe = P.fit(torch.tensor(x), torch.tensor(y), 4, c, 10000, 1e-10 * len(x), torch.float64, CPU)
    assert 0 < probe.iterations < 10000
    np.testing.assert_allclose(probe.weight.numpy(), ref.coef_, rtol=0, atol=5e-5)
    np.testing.assert_allclose(probe.bias.numpy(), ref.intercept_, rtol=0, atol=1e-4)
    proba = torch.softmax(probe.logits(torch.tensor(x)), dim=1).numpy()
    np.testing.assert_allclose(proba, ref.predict_proba(x), rtol=0, atol=5e-6)
    assert proba.max() > 0.9  # a fit that learned something: the probabilities are not all near 1/4


def test_two_classes_equal_sklearns_binary_fit():
    rng = np.random.default_rng(1)
    x, _ = _blobs(rng, 120, rng.normal(size=(2, 8)))
    y = (x[:, 0] + rng.normal(size=120) > 0).astype(int)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(x, y)  # one weight vector v
    probe = P.fit(torch.tensor(x), torch.tensor(y), 2, 1.0, 10000, 1e-10 * len(x), torch.float64, CPU)
    np.testing.assert_allclose((probe.weight[1] - probe.weight[0]).numpy(), ref.coef_[0], rtol=0, atol=1e-5)
    proba = torch.softmax(probe.logits(torch.tensor(x)), dim=1).numpy()
    np.testing.assert_allclose(proba, ref.predict_proba(x), rtol=0, atol=1e-6)


def test_search_is_a_coarse_grid_then_two_halvings_and_ties_keep_the_smaller_c():
    scored = []

    def score(idx):
        scored.append(idx)
        return -abs(idx - 42)  # coarse points 40 and 44 tie: 40 (the smaller C) is kept, the halvings reach 42

    assert P.search(score) == 42
    assert scored[:25] == list(range(0, 97, 4)) and scored[25:] == [38, 42, 41, 43]
    assert len(P.C_GRID) == 97 and P.C_GRID[0] == pytest.approx(1e-6) and P.C_GRID[-1] == pytest.approx(1e6)
    assert P.C_GRID[8] == pytest.approx(1e-5)  # 8 steps per decade
    assert P.search(lambda idx: 1.0) == 0  # a flat score: the smallest C


def test_sweep_picks_the_c_of_sklearns_own_sweep_and_refits_on_train_plus_val():
    rng = np.random.default_rng(1)
    centers = 0.6 * rng.normal(size=(4, 16))
    tx, ty = _blobs(rng, 40, centers)  # few training points in 16 dimensions: a large C overfits
    vx, vy = _blobs(rng, 300, centers)
    sx, sy = _blobs(rng, 100, centers)

    def sk(c, x, y):  # CLIP's settings: max_iter 1000, tol 1e-4 on the summed objective
        return LogisticRegression(C=c, max_iter=1000, tol=1e-4 / len(x)).fit(x, y)

    val_acc = [float((sk(c, tx, ty).predict(vx) == vy).mean()) for c in P.C_GRID]
    best = int(np.argmax(val_acc))
    # the peak is interior and unique: too small a C underfits, too large a C overfits
    assert 0 < best < 96 and sorted(val_acc)[-2] < val_acc[best]
    assert P.search(lambda i: val_acc[i]) == best  # CLIP's search finds the grid's best here
    cfg = LinearProbeConfig(protocol="lbfgs", normalize=False)
    t = torch.tensor
    m = linear_probe.evaluate(t(tx), t(ty), t(sx), t(sy), cfg, CPU, t(vx), t(vy))
    assert m["C"] == P.C_GRID[best] and m["protocol"] == "lbfgs" and 0 < m["lbfgs_iterations"] < 1000
    final = sk(P.C_GRID[best], np.concatenate([tx, vx]), np.concatenate([ty, vy]))
    assert m["lp_acc1"] == pytest.approx(float((final.predict(sx) == sy).mean()), abs=0.011)  # at most one sample
    assert "weight_decay" not in m


def test_without_validation_c_is_sklearns_default_and_the_report_says_so():
    from realsyn_pl.evaluation.report import TaskResult, not_comparable

    rng = np.random.default_rng(2)
    x, y = _blobs(rng, 60, rng.normal(size=(2, 8)))
    m = linear_probe.evaluate(torch.tensor(x), torch.tensor(y), torch.tensor(x), torch.tensor(y),
                              LinearProbeConfig(protocol="lbfgs", normalize=False), CPU)
    assert m["C"] == 1.0 and 0.5 <= m["lp_roc_auc"] <= 1.0
    ref = LogisticRegression(C=1.0, max_iter=1000, tol=1e-4 / len(x)).fit(x, y)
    assert m["lp_acc1"] == pytest.approx(float((ref.predict(x) == y).mean()))
    result = TaskResult("dtd", "wds/dtd", "linear_probe", "acc1", metrics=m,
                        extra={"num_fit": 60, "num_test": 60, "weight_decay_sweep": False})
    assert not_comparable([result], None) == {"dtd": "no C sweep (set val_split or val_proportion)"}
