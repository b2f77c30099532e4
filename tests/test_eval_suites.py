"""Every shipped suite and eval config resolves: each dataset has a loader and, under the template set it is run
with, a template list; CIFAR-100 with the SLIP templates (paper20_b32's setting) runs end to end."""
import inspect
import re
from pathlib import Path

import pytest
import torch

from eval_support import overrides, result_file, tiny_checkpoint
from realsyn_pl.cli import main
from realsyn_pl.config import ConfigError, load_config, to_object
from realsyn_pl.evaluation import datasets as D
from realsyn_pl.evaluation import synthetic
from realsyn_pl.evaluation.config import EvalConfig, EvalDataset
from realsyn_pl.evaluation.suites import classnames_file, load_suite, plan, read_classnames, templates_for

REPO = Path(__file__).resolve().parents[1]
SUITES = sorted(p.stem for p in (REPO / "eval" / "suites").glob("*.yaml"))
CONFIGS = sorted((REPO / "configs" / "eval").glob("*.yaml"))
# Datasets the paper uses that clip-benchmark has no builder for: exported by the user into its wds layout
# (the suite YAML says so beside each).
EXPORTED_BY_USER = {"birdsnap", "ucf101", "hateful_memes"}


def _clip_benchmark_names() -> set[str]:
    from clip_benchmark.datasets import builder

    names = set(re.findall(r'dataset_name == "([^"]+)"', inspect.getsource(builder.build_dataset)))
    return names | {n for group in builder.dataset_collection.values() for n in group}


def test_suites_and_configs_are_found():
    assert {"paper20", "retrieval", "robustness", "smoke"} <= set(SUITES)
    assert {p.stem for p in CONFIGS} >= {"paper20_b32", "smoke"}


@pytest.mark.parametrize("suite", SUITES)
def test_every_suite_dataset_has_a_loader_and_slip_templates(suite, tmp_path):
    known = _clip_benchmark_names()
    entries = load_suite(suite).datasets
    assert entries
    for entry in entries:
        name = D.dataset_name(entry)
        short = name.replace("wds/", "", 1)
        assert short in known or entry.key in EXPORTED_BY_USER or entry.key in D.SYNTHETIC_KEYS, (suite, name)
        # the loader: clip-benchmark's builder on its wds layout at this entry's name, on 2 generated samples
        if "zeroshot_retrieval" in entry.tasks:
            root = synthetic.write_retrieval(tmp_path / entry.key / "r", 2, px=8, split=entry.split)
            data = D.build(entry, str(root), entry.split, lambda im: torch.zeros(1), "zeroshot_retrieval")
            assert data.kind == "retrieval" and len(list(data.dataset.raw())) == 2, (suite, entry.key)
        if not {"zeroshot_classification", "linear_probe"} & set(entry.tasks):
            continue
        root = synthetic.write_classification(tmp_path / entry.key / "c", {entry.split: 2}, px=8, labeling="shape")
        data = D.build(entry, str(root), entry.split, lambda im: torch.zeros(1), "zeroshot_classification")
        assert data.classes == synthetic.classes("shape") and len(list(data.dataset.raw())) == 2, (suite, entry.key)
        if "zeroshot_classification" not in entry.tasks or entry.key in D.SYNTHETIC_KEYS:
            continue  # the generated sets ship their own templates file
        templates = templates_for("slip", entry, None)
        assert templates and all("{c}" in t for t in templates), (suite, entry.key)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_resolves_its_templates(config):
    cfg = to_object(load_config(EvalConfig, [str(config)]))
    _, runs = plan(cfg)
    for entry, task in runs:
        if task != "zeroshot_classification" or cfg.templates == "dataset":
            continue
        assert templates_for(cfg.templates, entry, None), (config.stem, entry.key)


def test_a_missing_template_key_fails_the_walk(monkeypatch):
    from realsyn_pl.evaluation import suites

    table = dict(suites._template_file(str(REPO / "eval" / "templates" / "slip.json")))
    del table["cifar100"]
    monkeypatch.setattr(suites, "_template_file", lambda path: table)
    cifar100 = next(e for e in load_suite("paper20").datasets if e.key == "cifar100")
    with pytest.raises(ValueError, match="no entry 'cifar100'"):
        templates_for("slip", cifar100, None)


def test_cifar100_with_slip_templates_runs(tmp_path):
    ckpt = tiny_checkpoint(tmp_path, seed=0)
    root = tmp_path / "datasets"
    synthetic.write_classification(root / "cifar100", {"test": 20}, px=32, labeling="colour")
    args = overrides(ckpt, tmp_path / "out", "[]", suite="paper20", only="[cifar100]", templates="slip",
                     dataset_root=f"{root}/{{dataset_cleaned}}", only_tasks="[zeroshot_classification]")
    assert main(["eval"] + args) == 0
    res = result_file(tmp_path / "out", "cifar100", "zeroshot_classification")
    assert res["templates"] == "slip" and res["num_samples"] == 20 and 0.0 <= res["metrics"]["acc1"] <= 1.0


def test_shipped_class_names_fill_in_for_an_export_without_classnames_txt(tmp_path):
    entries = {e.key: e for e in load_suite("paper20").datasets}
    lists = {k: read_classnames(classnames_file(entries[k])) for k in sorted(EXPORTED_BY_USER)}
    assert {k: len(v) for k, v in lists.items()} == {"birdsnap": 500, "hateful_memes": 2, "ucf101": 101}
    assert all(len(set(v)) == len(v) for v in lists.values())
    assert lists["hateful_memes"] == ["meme", "hatespeech meme"] and lists["ucf101"][0] == "Apply Eye Makeup"
    assert lists["birdsnap"][-1] == "Zone tailed Hawk"
    # a wds export with no classnames.txt: the suite entry's list, for the zero-shot and the linear-probe builds
    root = synthetic.write_classification(tmp_path / "export", {"test": 2}, px=8, labeling="shape")
    (root / "classnames.txt").unlink()
    for task in ("zeroshot_classification", "linear_probe"):
        data = D.build(entries["ucf101"], str(root), "test", lambda im: torch.zeros(1), task)
        assert data.classes == lists["ucf101"], task
        assert data.classes_source == str(REPO / "eval" / "classnames" / "ucf101.txt")
    # labels past the list: one line naming the list and the labels
    data = D.build(entries["hateful_memes"], str(root), "test", lambda im: torch.zeros(1), "zeroshot_classification")
    with pytest.raises(ValueError) as err:
        D.check_labels(data, "hateful_memes", "test", torch.tensor([0, 1, 3]))
    assert str(err.value) == (f"hateful_memes: 2 class names ({REPO}/eval/classnames/hateful_memes.txt) but the test "
                              "split has labels 0..3; the list must name every label, line i = label i")
    D.check_labels(data, "hateful_memes", "test", torch.tensor([0, 1, 1]))  # within the list: no error
    # the export's own classnames.txt (written with its labels) wins over the named list
    (root / "classnames.txt").write_text("\n".join(synthetic.classes("shape")) + "\n")
    data = D.build(entries["ucf101"], str(root), "test", lambda im: torch.zeros(1), "zeroshot_classification")
    assert data.classes == synthetic.classes("shape") and data.classes_source == "the dataset"
    # an unknown list is a config error at planning time
    with pytest.raises(ConfigError, match="dataset mine: classnames: unknown classname 'nope'"):
        plan(EvalConfig(datasets=[EvalDataset(key="mine", classnames="nope")]))
