"""A paper-suite run with most datasets missing: listed with reasons, averages only over what ran."""
import json
import shutil

from eval_support import make_data, overrides, tiny_checkpoint
from realsyn_pl.cli import main


def test_paper20_with_missing_datasets(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path, seed=0)
    data = make_data(tmp_path / "gen")
    root = tmp_path / "datasets"
    root.mkdir()
    shutil.copytree(data["classification"], root / "cifar10")  # the only paper20 dataset on disk
    args = overrides(ckpt, tmp_path / "out", "[]", suite="paper20", dataset_root=f"{root}/{{dataset_cleaned}}",
                     templates="dataset", only_tasks="[zeroshot_classification]")
    assert main(["eval"] + args) == 0
    captured = capsys.readouterr()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    missing = {m["key"]: m["reason"] for m in summary["missing"]}
    assert len(missing) == 19 and "cifar10" not in missing
    assert f"no dataset folder {root}/food101" in missing["food101"]
    assert "clip_benchmark_export_wds --dataset vtab/pets" in missing["pets"]
    # one line per missing dataset on stderr
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("missing:")]
    assert len(lines) == 19
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Avg over ran (1/20)" in report
    assert "not run: food101, cifar100, birdsnap" in report
    ours = json.loads((tmp_path / "out" / "results" / "cifar10_zeroshot_classification.json").read_text())
    acc = 100 * ours["metrics"]["acc1"]
    ours_row = next(ln for ln in report.splitlines() if "| ours |" in ln)
    cells = [c.strip() for c in ours_row.strip("|").split("|")]
    assert cells[3] == f"{acc:.1f}" and cells[-2] == f"{acc:.1f}"  # cifar10 column and the average over ran
    # the paper's rows: average restricted to cifar10 beside the paper's 20-dataset average
    realsyn15 = next(ln for ln in report.splitlines() if "RealSyn 15M (paper)" in ln and "ViT-B/32" in ln)
    cells = [c.strip() for c in realsyn15.strip("|").split("|")]
    assert cells[3] == "85.7" and cells[-2] == "85.7" and cells[-1] == "47.9"
    assert "| imagenet | zeroshot_classification | missing |" in report


def test_nothing_to_run_is_an_error(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path, seed=0)
    args = overrides(ckpt, tmp_path / "out", "[]", suite="retrieval", dataset_root=str(tmp_path / "none"))
    assert main(["eval"] + args) == 2
    err = capsys.readouterr().err
    assert "error: no dataset could be evaluated (2 missing or failed)" in err
    assert main(["eval", "suite=nope"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
