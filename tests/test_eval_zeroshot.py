"""Zero-shot classification and retrieval equal clip-benchmark's own `clip_benchmark eval` on the same model and data."""
import math

import pytest

from eval_support import (
    classification_entry,
    clip_benchmark_eval,
    make_data,
    overrides,
    result_file,
    retrieval_entry,
    tiny_checkpoint,
)
from realsyn_pl.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_zs")
    return folder, tiny_checkpoint(folder, seed=0), make_data(folder)


def _ours(folder, ckpt, datasets, name, **extra):
    out = folder / name
    assert main(["eval"] + overrides(ckpt, out, datasets, **extra)) == 0
    return out


def test_zeroshot_and_retrieval_equal_clip_benchmark(setup):
    folder, ckpt, data = setup
    out = _ours(folder, ckpt, f"[{classification_entry(data['classification'])}, {retrieval_entry(data['retrieval'])}]",
                "ours")
    ours_cls = result_file(out, "colours", "zeroshot_classification")
    ours_ret = result_file(out, "captions", "zeroshot_retrieval")
    ref_cls = clip_benchmark_eval(folder, ckpt, "wds/colours", data["classification"], "zeroshot_classification",
                                  folder / "cb_cls.json")
    ref_ret = clip_benchmark_eval(folder, ckpt, "wds/captions", data["retrieval"], "zeroshot_retrieval",
                                  folder / "cb_ret.json")
    # clip-benchmark-compatible fields
    for key in ("dataset", "model", "task", "metrics", "language"):
        assert ours_cls[key] == ref_cls[key] or key == "metrics"
    assert set(ours_cls["metrics"]) == set(ref_cls["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    for k, v in ref_cls["metrics"].items():
        assert ours_cls["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert ours_cls["num_samples"] == 37
    # a real signal, not a degenerate all-zero run: 6 classes, acc5 well above acc1
    assert ours_cls["metrics"]["acc5"] > ours_cls["metrics"]["acc1"]
    assert set(ref_ret["metrics"]) == set(ours_ret["metrics"])
    assert len(ref_ret["metrics"]) == 6
    for k, v in ref_ret["metrics"].items():
        assert ours_ret["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert ours_ret["num_texts"] == 60 and ours_ret["metrics"]["text_retrieval_recall@10"] > 0


def test_binary_dataset_reports_roc_auc(setup, tmp_path):
    from realsyn_pl.evaluation import synthetic

    folder, ckpt, _ = setup
    # 2 classes from the shape labelling: keep circles vs squares only, by rewriting classnames and labels
    root = synthetic.write_classification(tmp_path / "binary", {"test": 40}, seed=7, px=32, labeling="shape")
    _keep_two_classes(root / "test")
    out = _ours(folder, ckpt, f"[{classification_entry(root, metric='roc_auc')}]", "binary")
    res = result_file(out, "colours", "zeroshot_classification")
    auc = res["metrics"]["roc_auc"]
    assert 0.0 <= auc <= 1.0 and not math.isnan(auc)
    assert math.isnan(res["metrics"]["acc5"])  # clip-benchmark's convention below 5 classes
    assert f"| {100 * auc:.1f} |" in (out / "report.md").read_text()  # the report's headline is the AUC


def _keep_two_classes(split_dir):
    import io
    import tarfile

    (split_dir.parent / "classnames.txt").write_text("circle\nsquare\n")
    for tar_path in sorted(split_dir.glob("*.tar")):
        members = []
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                members.append((m, tf.extractfile(m).read()))
        with tarfile.open(tar_path, "w") as tf:
            for m, payload in members:
                if m.name.endswith(".cls"):
                    payload = str(int(payload) % 2).encode()
                    m.size = len(payload)
                tf.addfile(m, io.BytesIO(payload))


def test_slip_templates_selectable(setup):
    from realsyn_pl.evaluation.config import EvalDataset
    from realsyn_pl.evaluation.suites import templates_for

    entry = EvalDataset(key="aircraft", template_key="aircraft")
    assert templates_for("slip", entry, None) == ["a photo of a {c}, a type of aircraft.",
                                                  "a photo of the {c}, a type of aircraft."]
    assert len(templates_for("slip", EvalDataset(key="imagenet"), None)) == 7
    with pytest.raises(ValueError, match="no entry 'nothing'"):
        templates_for("slip", EvalDataset(key="nothing"), None)
