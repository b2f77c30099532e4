"""`eval`'s exit code and its refusals: a failed run exits 1 naming it (the other runs' results written all the same),
and a weights file or feature-cache entry that is not a weights-only pickle is refused in one line (exit 2),
never unpickled."""
import json
import os
import shutil

import pytest
import torch

from eval_support import NAME, classification_entry, make_data, overrides, result_file, tiny_checkpoint
from realsyn_pl.cli import main


class Planted:
    """What a planted pickle does when unpickled: run a command (here it would create `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_exit")
    return folder, tiny_checkpoint(folder, seed=0), make_data(folder)


def test_a_failed_run_exits_1_naming_it_and_the_others_are_written(setup, tmp_path, capsys):
    folder, ckpt, data = setup
    broken = tmp_path / "broken"
    shutil.copytree(data["classification"], broken)
    (broken / "classnames.txt").unlink()  # zero-shot classification cannot run without class names
    datasets = (f"[{classification_entry(data['classification'])}, "
                f"{{key: broken, dataset: wds/broken, root: '{broken}', tasks: [zeroshot_classification]}}]")
    out = tmp_path / "out"
    assert main(["eval"] + overrides(ckpt, out, datasets)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"eval: 1 run failed: broken zeroshot_classification with {NAME} ({ckpt.name}): "
                       "ValueError: broken: Classes not specified for wds/broken")
    assert 0 <= result_file(out, "colours", "zeroshot_classification")["metrics"]["acc1"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert [f["key"] for f in summary["failed"]] == ["broken"]


def test_missing_datasets_alone_still_exit_0(setup, tmp_path):
    folder, ckpt, data = setup
    datasets = (f"[{classification_entry(data['classification'])}, "
                f"{{key: absent, dataset: wds/absent, root: '{tmp_path / 'absent'}', tasks: [zeroshot_classification]}}]")
    assert main(["eval"] + overrides(ckpt, tmp_path / "out", datasets)) == 0


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_weights_that_are_not_weights_only_are_refused(setup, tmp_path, capsys, suffix):
    folder, _, data = setup
    marker = tmp_path / "ran"
    weights = tmp_path / f"planted{suffix}"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "payload": Planted(marker)}, weights)
    args = overrides(weights, tmp_path / "out", f"[{classification_entry(data['classification'])}]")
    assert main(["eval"] + args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: {weights}: not a weights-only checkpoint; refusing to unpickle it"
    assert "Traceback" not in err and "weights_only=False" not in err
    assert not marker.exists()


def test_a_feature_cache_entry_that_is_not_weights_only_is_refused(setup, tmp_path, capsys):
    folder, ckpt, data = setup
    entry = f"[{classification_entry(data['classification'], tasks='[linear_probe]', val_split='val')}]"
    cache = tmp_path / "cache"
    args = overrides(ckpt, tmp_path / "out", entry, **{"linear_probe.epochs": 1, "linear_probe.cache_dir": str(cache)})
    assert main(["eval"] + args) == 0
    train = next(cache.rglob("train.pt"))
    marker = tmp_path / "ran"
    torch.save({"key": {}, "payload": Planted(marker)}, train)
    capsys.readouterr()
    assert main(["eval"] + args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: {train}: not a weights-only checkpoint; refusing to unpickle it"
    assert "Traceback" not in err and not marker.exists()


def test_a_refusal_on_any_rank_is_raised_on_every_rank(monkeypatch):
    """Rank 0 fails for an ordinary reason while rank 1 refuses a cache entry: every rank raises the refusal."""
    from realsyn_pl.evaluation import runner as R
    from realsyn_pl.models.factory import NotWeightsOnly

    refused = "/cache/train.pt: not a weights-only checkpoint; refusing to unpickle it"
    every = [(None, "OSError: disk gone"), (0, refused)]
    monkeypatch.setattr(R, "_grouped", lambda world: True)
    monkeypatch.setattr(R, "every_rank", lambda value, world: every)
    with pytest.raises(NotWeightsOnly, match="^/cache/train.pt: not a weights-only checkpoint"):
        R.agree_on_failure(OSError("disk gone"), 0, 2)
    every[1] = None  # without the refusal, rank 0's failure is the dataset's, as before
    with pytest.raises(R.DatasetFailed, match=r"^OSError: disk gone \(on rank 0\)$"):
        R.agree_on_failure(OSError("disk gone"), 0, 2)
