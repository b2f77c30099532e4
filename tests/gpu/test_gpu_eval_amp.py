"""`amp` has clip-benchmark's meaning: on (the default) equals `clip_benchmark eval`, off equals `clip_benchmark eval
--no_amp`, for zero-shot classification on a set where bf16 changes the metrics and for retrieval on a set where many
images share identical captions: on the CPU (the dry run, bf16 autocast) and on CUDA (fp16 autocast, both sides on
the GPU)."""

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
from realsyn_pl.evaluation import synthetic


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_amp")
    # 100 colour images on which this checkpoint's bf16 logits flip a few predictions (its fp32 margins are small):
    # clip-benchmark's amp and --no_amp acc5 and mean_per_class_recall differ, so an fp32-only path cannot pass as amp
    flips = synthetic.write_classification(folder / "flips", {"test": 100}, seed=1, px=32, per_shard=50,
                                           labeling="colour")
    return folder, tiny_checkpoint(folder, seed=0), make_data(folder), duplicate_caption_set(folder / "dups"), flips


_REFERENCE: dict = {}


def _clip_benchmark(setup, key: str, task: str, amp: bool, device: str = "cpu") -> dict:
    """clip_benchmark eval's result on one of the sets, run once per module (two tests read it)."""
    folder, ckpt, _, dups, flips = setup
    if (folder, key, amp, device) not in _REFERENCE:
        root = {"flips": flips, "dups": dups}[key]
        _REFERENCE[folder, key, amp, device] = clip_benchmark_eval(
            folder, ckpt, f"wds/{key}", root, task, folder / f"cb_{key}_{amp}_{device}.json", amp=amp, device=device)
    return _REFERENCE[folder, key, amp, device]


@pytest.mark.parametrize("amp", [True, False])
def test_amp_setting_equals_clip_benchmark(setup, amp, target):
    folder, ckpt, _, dups, flips = setup
    captions = [t for p in sorted((dups / "test").glob("*.tar")) for t in _captions(p)]
    assert len(set(captions)) < len(captions) // 4  # many images share each caption: ties in every column
    entries = (f"[{{key: flips, dataset: wds/flips, root: '{flips}'}}, {{key: dups, dataset: wds/dups, "
               f"root: '{dups}', tasks: [zeroshot_retrieval], metric: recall}}]")
    out = folder / f"ours_amp{amp}_{target.name}"
    # amp=true is the default: leave it unset there, as a user comparing against clip-benchmark's defaults would
    args = [a for a in overrides(ckpt, out, entries, **{"trainer.accelerator": target.accelerator})
            if not (amp and a.startswith("amp="))]
    assert main(["eval"] + args) == 0
    for key, task in [("flips", "zeroshot_classification"), ("dups", "zeroshot_retrieval")]:
        ours = result_file(out, key, task)
        ref = _clip_benchmark(setup, key, task, amp, target.device)
        assert ours["amp"] is amp
        assert set(ours["metrics"]) == set(ref["metrics"])
        for k, v in ref["metrics"].items():
            assert ours["metrics"][k] == pytest.approx(v, abs=1e-6), (amp, task, k)
    assert f"amp: {amp}" in (out / "report.md").read_text()


def test_bf16_changes_clip_benchmark_classification_on_the_set(setup):
    on, off = (_clip_benchmark(setup, "flips", "zeroshot_classification", amp)["metrics"] for amp in (True, False))
    assert set(on) == set(off) and any(abs(on[k] - off[k]) > 1e-6 for k in on), (on, off)


def _captions(tar_path):
    import tarfile

    with tarfile.open(tar_path) as tf:
        return [line for m in tf.getmembers() if m.name.endswith(".txt")
                for line in tf.extractfile(m).read().decode().splitlines()]


def test_amp_with_mixed_trainer_precision_is_a_config_error(setup, capsys):
    folder, ckpt, data, _, _ = setup
    args = overrides(ckpt, folder / "bad", f"[{classification_entry(data['classification'])}]", amp="true",
                     **{"trainer.precision": "bf16-mixed"})
    assert main(["eval"] + args) == 2
    err = capsys.readouterr().err
    assert "amp: true autocasts already" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "bad" / "results").exists()
