"""Linear probe on CPU vs clip-benchmark's own sweep (its source, with the CUDA calls mapped to the CPU), and the
feature cache never serving features of another checkpoint."""
import inspect
import types

import pytest
import torch

from eval_support import classification_entry, make_data, overrides, result_file, tiny_checkpoint
from realsyn_pl.cli import main
from realsyn_pl.evaluation import linear_probe
from realsyn_pl.evaluation.config import LinearProbeConfig


def clip_benchmark_linear_probe_on_cpu():
    """clip_benchmark.metrics.linear_probe with only `assert device == 'cuda'` and `.cuda()` taken out."""
    import clip_benchmark.metrics.linear_probe as cb

    src = inspect.getsource(cb)
    edits = [("assert device == 'cuda'", "pass"), (".cuda()", ""),
             ("from .zeroshot_classification import", "from clip_benchmark.metrics.zeroshot_classification import")]
    for old, new in edits:
        assert old in src, old  # fails loudly if clip-benchmark's code changes under us
        src = src.replace(old, new)
    module = types.ModuleType("cb_linear_probe_cpu")
    exec(compile(src, "cb_linear_probe_cpu", "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_lp")
    return folder, tiny_checkpoint(folder, seed=0), tiny_checkpoint(folder, seed=1), make_data(folder)


def _run(folder, ckpt, data, name, **extra):
    entry = classification_entry(data["classification"], tasks="[linear_probe]", val_split="val")
    out = folder / name
    assert main(["eval"] + overrides(ckpt, out, f"[{entry}]", **extra)) == 0
    return result_file(out, "colours", "linear_probe")


def test_linear_probe_matches_clip_benchmark_sweep(setup):
    folder, ckpt, _, data = setup
    ours = _run(folder, ckpt, data, "lp", **{"linear_probe.epochs": 5})
    assert ours["feature_cache"] == "miss" and ours["num_train"] == 96 and ours["num_val"] == 48
    # the same features, from our cache, through clip-benchmark's code
    cache = sorted((folder / "lp" / "cache").rglob("*.pt"))
    feats = {p.stem: torch.load(p, weights_only=True) for p in cache}
    assert set(feats) == {"train", "val", "test"}
    feature_root = folder / "cb_features"
    (feature_root / "m").mkdir(parents=True)
    for split, entry in feats.items():
        # clip-benchmark caches features after its Featurizer's L2 normalisation; ours caches raw ones
        torch.save(torch.nn.functional.normalize(entry["features"], dim=-1), feature_root / "m" / f"features_{split}.pt")
        torch.save(entry["targets"], feature_root / "m" / f"targets_{split}.pt")
    cb = clip_benchmark_linear_probe_on_cpu()
    loader = torch.utils.data.DataLoader([0])  # only checked for None: features come from feature_root
    torch.manual_seed(0)
    ref = cb.evaluate(None, loader, loader, -1, 64, 0, 0.1, 5, "m", 0, str(feature_root), "cpu",
                      val_dataloader=loader, normalize=True, amp=False)
    assert abs(ours["metrics"]["lp_acc1"] - ref["lp_acc1"]) <= 0.005
    assert abs(ours["metrics"]["lp_mean_per_class_recall"] - ref["lp_mean_per_class_recall"]) <= 0.005
    assert ours["metrics"]["weight_decay"] == ref["weight_decay"]
    assert ours["metrics"]["lp_acc1"] > 1 / 6 + 0.1  # colour is linearly readable even from a random tower


def test_cache_is_keyed_by_weights(setup):
    folder, ckpt_a, ckpt_b, data = setup
    kw = {"linear_probe.epochs": 2, "linear_probe.cache_dir": str(folder / "shared_cache")}
    a1 = _run(folder, ckpt_a, data, "a1", **kw)
    a2 = _run(folder, ckpt_a, data, "a2", **kw)
    b = _run(folder, ckpt_b, data, "b", **kw)
    b_fresh = _run(folder, ckpt_b, data, "b_fresh", **{"linear_probe.epochs": 2, "linear_probe.cache_dir": "null"})
    assert (a1["feature_cache"], a2["feature_cache"], b["feature_cache"]) == ("miss", "hit", "miss")
    assert a1["metrics"] == a2["metrics"]
    assert b["metrics"] == b_fresh["metrics"]  # b computed its own features, not a's
    assert a1["weights_sha256"] != b["weights_sha256"]
    assert len(list((folder / "shared_cache").rglob("*.pt"))) == 6  # 2 checkpoints x train/val/test
    # the same weights under another file name share the entry
    twin = folder / "copy_of_a.pt"
    twin.write_bytes(ckpt_a.read_bytes())
    assert _run(folder, twin, data, "twin", **kw)["feature_cache"] == "hit"


def test_sweep_without_validation_uses_zero_weight_decay():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    y = (x[:, 0] > 0).long()
    cfg = LinearProbeConfig(epochs=30, batch_size=16)
    m = linear_probe.evaluate(x, y, x, y, cfg, torch.device("cpu"))
    assert m["weight_decay"] == 0.0 and m["lp_acc1"] > 0.8 and 0.8 < m["lp_roc_auc"] <= 1.0
    with pytest.raises(ValueError, match="fewshot_k"):
        linear_probe.evaluate(x, y, x, y, LinearProbeConfig(fewshot_k=1000), torch.device("cpu"))



def test_lbfgs_protocol_through_eval(setup):
    """The `eval` command with linear_probe.protocol=lbfgs (its agreement with scikit-learn:
    test_eval_lbfgs_probe.py): C from the grid, the final fit on train + val, the report naming the classifier."""
    from realsyn_pl.evaluation.lbfgs_probe import C_GRID

    folder, ckpt, _, data = setup
    cache = folder / "lp" / "cache"  # the first test's features when it ran first (a hit), else computed here
    ours = _run(folder, ckpt, data, "lbfgs", **{"linear_probe.protocol": "lbfgs", "linear_probe.max_iter": 50,
                                                "linear_probe.cache_dir": str(cache)})
    m = ours["metrics"]
    assert m["protocol"] == "lbfgs" and m["C"] in C_GRID and m["max_iter"] == 50 and 0 < m["lbfgs_iterations"] <= 50
    assert "weight_decay" not in m and m["dtype"] == "float64"
    assert ours["num_fit"] == 96 + 48 and ours["weight_decay_sweep"] is True
    assert m["lp_acc1"] > 1 / 6 + 0.1  # colour is linearly readable even from a random tower
    report = (folder / "lbfgs" / "report.md").read_text()
    assert "| Avg, comparable (1/1) | Avg over ran (1/1) |" in report
    assert "Classifier (linear_probe.protocol): lbfgs = CLIP's protocol" in report
