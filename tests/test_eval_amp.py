"""`amp` has clip-benchmark's meaning: on (the default) equals `clip_benchmark eval`, off equals `clip_benchmark eval
--no_amp`, for zero-shot classification and for retrieval on a set where many images share identical captions."""

import pytest

from eval_support import (
    classification_entry,
    clip_benchmark_eval,
    duplicate_caption_set,
    make_data,
    overrides,
    result_file,
    tiny_checkpoint,
)
from realsyn_pl.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_amp")
    return folder, tiny_checkpoint(folder, seed=0), make_data(folder), duplicate_caption_set(folder / "dups")


@pytest.mark.parametrize("amp", [True, False])
def test_amp_setting_equals_clip_benchmark(setup, amp):
    folder, ckpt, data, dups = setup
    captions = [t for p in sorted((dups / "test").glob("*.tar")) for t in _captions(p)]
    assert len(set(captions)) < len(captions) // 4  # many images share each caption: ties in every column
    entries = (f"[{classification_entry(data['classification'])}, {{key: dups, dataset: wds/dups, root: '{dups}', "
               "tasks: [zeroshot_retrieval], metric: recall}]")
    out = folder / f"ours_amp{amp}"
    # amp=true is the default: leave it unset there, as a user comparing against clip-benchmark's defaults would
    args = [a for a in overrides(ckpt, out, entries) if not (amp and a.startswith("amp="))]
    assert main(["eval"] + args) == 0
    for key, dataset, root, task in [("colours", "wds/colours", data["classification"], "zeroshot_classification"),
                                     ("dups", "wds/dups", dups, "zeroshot_retrieval")]:
        ours = result_file(out, key, task)
        ref = clip_benchmark_eval(folder, ckpt, dataset, root, task, folder / f"cb_{key}_{amp}.json", amp=amp)
        assert ours["amp"] is amp
        assert set(ours["metrics"]) == set(ref["metrics"])
        for k, v in ref["metrics"].items():
            assert ours["metrics"][k] == pytest.approx(v, abs=1e-6), (amp, task, k)
    assert f"amp: {amp}" in (out / "report.md").read_text()


def _captions(tar_path):
    import tarfile

    with tarfile.open(tar_path) as tf:
        return [line for m in tf.getmembers() if m.name.endswith(".txt")
                for line in tf.extractfile(m).read().decode().splitlines()]


def test_amp_with_mixed_trainer_precision_is_a_config_error(setup, capsys):
    folder, ckpt, data, _ = setup
    args = overrides(ckpt, folder / "bad", f"[{classification_entry(data['classification'])}]", amp="true",
                     **{"trainer.precision": "bf16-mixed"})
    assert main(["eval"] + args) == 2
    err = capsys.readouterr().err
    assert "amp: true autocasts already" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "bad" / "results").exists()
