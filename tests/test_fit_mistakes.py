"""`fit` mistakes a new user makes, each one line on stderr and exit 2 before any training: data.train at a folder or
a table, a model.custom field misspelled or of the wrong type, fp16 on a CPU, a OneCycle warm-up that tiny data
makes too short; shards that cannot fill an epoch end in one line too, and a shard cut short is named."""
import json
import shutil

import pytest

from fit_helpers import write_fit_config
from realsyn_pl.cli import main
from realsyn_pl.data.shard_writer import ShardWriter
from realsyn_pl.data.shards import ShardsRanDry
from realsyn_pl.demo.world import samples
from realsyn_pl.training import fit  # noqa: F401 - Lightning's log handler bound now, not to a test's (later closed) capsys


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: "), err
    return err[len("error: "):]


def test_data_train_at_a_folder_or_a_table_is_refused_with_what_to_do(world_shards, tmp_path, capsys):
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, tmp_path / "run")
    assert main(["fit", "--config", str(cfg), f"data.train=[{{urls: '{world_shards}'}}]"]) == 2
    assert _one_error_line(capsys) == (
        f"data.train[0].urls: {world_shards} is a folder; point at the .tar shards inside, e.g. "
        f"{world_shards}/{{00000..00007}}.tar (8 .tar file(s) there)")

    photos = tmp_path / "photos"
    photos.mkdir()
    assert main(["fit", "--config", str(cfg), f"data.train=[{{urls: '{photos}', num_samples: 10}}]"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"data.train[0].urls: {photos} is a folder without .tar shards")
    assert f"`python -m realsyn_pl shards input={photos} output_dir=" in line

    table = tmp_path / "captions.csv"
    table.write_text("image,caption\na.jpg,a cat\n")
    assert main(["fit", "--config", str(cfg), f"data.train=[{{urls: '{table}', num_samples: 1}}]"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"data.train[0].urls: {table} is a CSV file, not a webdataset .tar shard")
    assert f"`python -m realsyn_pl shards input={table} output_dir=" in line


@pytest.mark.parametrize("override, expected", [
    ("model.custom.vision_cfg.widht=64",
     "model.custom.vision_cfg.widht is not a field of open_clip's CLIPVisionCfg config; did you mean width? its "
     "fields: layers, width, "),
    ("model.custom.text_cfg.layers=2.5",
     "model.custom.text_cfg.layers must be int (open_clip CLIPTextCfg.layers); got 2.5 (float)"),
    ("model.custom.embed_dim=32.0", "model.custom.embed_dim must be int (open_clip CLIP.embed_dim); got 32.0 (float)"),
])
def test_model_custom_mistakes_name_the_field(world_shards, tmp_path, capsys, override, expected):
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, tmp_path / "run")
    assert main(["fit", "--config", str(cfg), override]) == 2
    assert _one_error_line(capsys).startswith(expected)


def test_fp16_on_a_cpu_is_refused(world_shards, tmp_path, capsys):
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, tmp_path / "run")
    assert main(["fit", "--config", str(cfg), "trainer.precision=16"]) == 2
    assert _one_error_line(capsys) == ("trainer.precision=16 (fp16) on a CPU is several times slower than fp32; use "
                                       "trainer.precision=bf16-mixed or 32")
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_a_onecycle_warmup_too_short_for_tiny_data_says_what_to_change(world_shards, tmp_path, capsys):
    # 80 samples in batches of 40: 2 steps, a 0.3 x 2 = 0.6 step warm-up.
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, tmp_path / "run", **{"data.batch_size": 40})
    assert main(["fit", "--config", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("OneCycle needs a warm-up longer than one step: optim.pct_start x total steps = 0.3 x 2 = 0.6")
    assert "lower data.batch_size" in line and "optim.scheduler=cosine optim.warmup_steps=N" in line


def test_the_demo_names_the_sub_run_a_config_error_comes_from():
    from realsyn_pl.config import ConfigError
    from realsyn_pl.demo.run import sub_run

    with pytest.raises(ConfigError, match=r"^demo student text1 \(runs/demo/students/text1\): OneCycle needs"):
        with sub_run("student text1", "runs/demo/students/text1"):
            raise ConfigError("OneCycle needs a warm-up longer than one step")


def _unusable_shard(folder):
    rows = list(samples(8, seed=3, px=32))
    for row in rows:
        row["jpg"] = b"\xff\xd8\xff not a jpeg"
    with ShardWriter(folder, samples_per_shard=8) as w:
        w.write_all(rows)
    return folder


def test_shards_that_run_dry_end_in_one_line_naming_the_reasons(tmp_path, capsys):
    shards = _unusable_shard(tmp_path / "shards")
    # In process (workers=0); from a worker process the same error comes wrapped, see the next test.
    cfg = write_fit_config(tmp_path / "fit.yaml", shards, tmp_path / "run",
                           **{"data.batch_size": 4, "optim.scheduler": "constant"})
    assert main(["fit", "--config", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("rank 0 worker 0: shards ran dry after 0 of 2 batches (skipped so far: "
                           "{'corrupt_image': 8}): the shards hold fewer usable samples than the epoch needs"), line


def test_shards_ran_dry_from_a_worker_is_reduced_to_its_own_line():
    wrapped = ("Caught ShardsRanDry in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nrealsyn_pl.data.shards.ShardsRanDry: rank 0 worker 0: shards ran dry\n')
    assert ShardsRanDry(wrapped).line() == "rank 0 worker 0: shards ran dry"
    assert ShardsRanDry("rank 1 worker 2: shards ran dry").line() == "rank 1 worker 2: shards ran dry"


def test_a_shard_cut_short_is_named_with_what_it_delivered(world_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(world_shards / name, shards / name)
    (shards / "sizes.json").write_text(json.dumps({"00000.tar": 10, "00001.tar": 10}))
    raw = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(raw[: len(raw) // 2])  # a download cut in half
    out = tmp_path / "run"
    cfg = write_fit_config(tmp_path / "fit.yaml", shards, out,
                           **{"data.batch_size": 4, "optim.scheduler": "constant", "checkpoint.export_open_clip": False})
    assert main(["fit", "--config", str(cfg)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    short = summary["short_shards"][str(shards / "00001.tar")]
    assert short["promised"] == 10 and 0 < short["delivered"] < 10
    assert summary["skipped"]["corrupt_tar"] == 1 and summary["global_step"] == 5  # the epoch was still filled
    err = capsys.readouterr().err
    assert (f"warning: shard {shards / '00001.tar'} delivered {short['delivered']} of the 10 samples sizes.json "
            "promised") in err
