"""Results a sweep can keep: clip-benchmark's --output naming, several models in one run and one output_dir,
skip_existing, caches under output_dir, and no random-init warning when weights are loaded."""
import json
import logging
import shutil

from eval_support import NAME, TINY, classification_entry, make_data, overrides, retrieval_entry, tiny_checkpoint
from realsyn_pl.cli import main


def test_two_models_one_output_dir_then_skip_existing(tmp_path, capsys, caplog, monkeypatch):
    ckpts = [tiny_checkpoint(tmp_path, seed=0), tiny_checkpoint(tmp_path, seed=1)]
    data = make_data(tmp_path / "data")
    out = tmp_path / "out"
    datasets = (f"[{classification_entry(data['classification'], tasks='[zeroshot_classification, linear_probe]', val_split='val')}, "
                f"{retrieval_entry(data['retrieval'])}]")
    models = "[" + ", ".join(f"{{name: {NAME}, custom: {json.dumps(TINY)}, pretrained: '{c}'}}" for c in ckpts) + "]"
    args = [a for a in overrides(ckpts[0], out, datasets, models=models, **{"linear_probe.epochs": 1})
            if not a.startswith("linear_probe.cache_dir=")]  # the default: under output_dir
    caplog.set_level(logging.WARNING)
    caplog.clear()  # tiny_checkpoint's own random-init models did warn
    assert main(["eval"] + args) == 0
    err = capsys.readouterr().err
    # weights were loaded: open_clip's warning would mislead (it is a root-logger record: under pytest it reaches
    # caplog, not stderr)
    assert "initialized randomly" not in err
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]

    files = sorted(p.name for p in (out / "results").glob("*.json"))
    expected = sorted(f"{ds}_{c.name}_{NAME}_en_{task}.json" for c in ckpts for ds, task in [
        ("colours", "zeroshot_classification"), ("colours", "linear_probe"), ("captions", "zeroshot_retrieval")])
    assert files == expected  # clip-benchmark's default --output template: nothing overwritten
    first = {p: p.read_bytes() for p in (out / "results").glob("*.json")}
    a, b = (json.loads((out / "results" / f"captions_{c.name}_{NAME}_en_zeroshot_retrieval.json").read_text())
            for c in ckpts)
    assert a["pretrained"] == str(ckpts[0]) and b["pretrained"] == str(ckpts[1]) and a["metrics"] != b["metrics"]
    summary = json.loads((out / "summary.json").read_text())
    assert [m["pretrained"] for m in summary["models"]] == [str(c) for c in ckpts]
    report = (out / "report.md").read_text()
    assert f"## {NAME} (tiny_seed0.pt)" in report and f"## {NAME} (tiny_seed1.pt)" in report
    assert len(list((out / "feature_cache").rglob("*.pt"))) == 2 * 3  # two models x train/val/test, in output_dir

    # skip_existing: every result exists, so no model is built and no data read (the data is gone)
    shutil.rmtree(tmp_path / "data")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built although every result exists")

    monkeypatch.setattr("realsyn_pl.models.factory.create_clip", no_model)
    assert main(["eval"] + args + ["skip_existing=true"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("skip: ") == 6
    assert {p: p.read_bytes() for p in (out / "results").glob("*.json")} == first
    again = json.loads((out / "summary.json").read_text())
    for old, new in zip(summary["models"], again["models"]):
        assert [r["metrics"] for r in new["results"]] == [r["metrics"] for r in old["results"]]
        assert all(r["reused"] for r in new["results"])


def test_output_template_collisions_and_bad_fields_are_config_errors(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path, seed=0)
    data = make_data(tmp_path / "data")
    two = (f"[{classification_entry(data['classification'])}, "
           f"{{key: again, dataset: wds/colours, root: '{data['classification']}'}}]")
    assert main(["eval"] + overrides(ckpt, tmp_path / "o", two)) == 2
    err = capsys.readouterr().err.strip()
    assert "output:" in err and "add {key}" in err and len(err.splitlines()) == 1
    assert main(["eval"] + overrides(ckpt, tmp_path / "o", two, output="'{key}_{model}_{nope}.json'")) == 2
    assert "output: bad template" in capsys.readouterr().err
    assert main(["eval"] + overrides(ckpt, tmp_path / "o", two, output="'{key}_{task}.json'")) == 0
    assert sorted(p.name for p in (tmp_path / "o" / "results").glob("*.json")) == [
        "again_zeroshot_classification.json", "colours_zeroshot_classification.json"]
