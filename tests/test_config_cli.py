import subprocess
import sys

import pytest

from realsyn_pl.cli import main
from realsyn_pl.config import ConfigError, FitConfig, load_config, to_object


def test_defaults_are_the_paper_recipe():
    cfg = to_object(load_config(FitConfig))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (1e-3, 0.2, 0.9, 0.98, 1e-6)
    assert cfg.optim.scheduler == "onecycle" and cfg.optim.pct_start == 0.1
    assert cfg.model.init_temperature == 0.07 and cfg.trainer.max_epochs == 32


def test_yaml_then_dotlist(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("data:\n  batch_size: 64\noptim:\n  lr: 0.5\n")
    cfg = to_object(load_config(FitConfig, [str(f)], ["optim.lr=0.25"]))
    assert cfg.data.batch_size == 64 and cfg.optim.lr == 0.25


@pytest.mark.parametrize(
    "override,needle",
    [("data.batchsize=3", "batchsize"), ("data.batch_size=many", "batch_size"), ("optim.lrr=1", "lrr")],
)
def test_bad_keys_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(FitConfig, [], [override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_cli_bad_key_exit_code_and_message(capsys):
    assert main(["fit", "data.batchsize=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "batchsize" in err and "Traceback" not in err


def test_cli_print_config(capsys):
    assert main(["fit", "--print-config", "data.batch_size=7"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 7" in out and "lr: 0.001" in out


def test_cli_print_config_validates_first(capsys):
    assert main(["fit", "--print-config", "optim.scheduler=cosin"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "error: optim.scheduler must be one of onecycle, cosine, constant; got 'cosin'"


def test_cli_help_lists_keys(capsys):
    assert main(["fit", "--help"]) == 0
    assert "accumulate_grad_batches" in capsys.readouterr().out


def test_cli_missing_config_file(capsys, tmp_path):
    assert main(["fit", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unknown_command_and_stage_exit_2_without_traceback():
    for args, needle in ((["nosuch"], "unknown command"), (["build", "nosuch"], "nosuch")):
        proc = subprocess.run([sys.executable, "-m", "realsyn_pl", *args], capture_output=True, text=True)
        assert proc.returncode == 2
        assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_fit_with_missing_shards_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "realsyn_pl", "fit", f"output_dir={tmp_path}", f"data.train=[{{urls: '{tmp_path}/x-{{0..3}}.tar'}}]",
         "model.name=ViT-B-32", "logging.wandb=disabled"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_topology_follows_the_launcher_and_rejects_contradictions(monkeypatch):
    from realsyn_pl.training.environment import resolve_topology

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_topology("auto", None) == (4, 2)
    with pytest.raises(ConfigError, match="devices=1"):
        resolve_topology(1, None)
    with pytest.raises(ConfigError, match="num_nodes=1"):
        resolve_topology("auto", 1)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert resolve_topology("auto", None) == (8, 2)


@pytest.mark.parametrize("preset", ["realsyn15m_vitb32", "realsyn30m_vitb32", "realsyn100m_vitb32", "tiny_cpu"])
def test_presets_validate(preset):
    from pathlib import Path

    cfg = to_object(load_config(FitConfig, [str(Path(__file__).parents[1] / "configs" / "fit" / f"{preset}.yaml")]))
    if preset.startswith("realsyn"):
        assert cfg.model.name == "ViT-B-32" and cfg.trainer.max_epochs == 32
        assert cfg.data.batch_size * 8 == 4096 and cfg.optim.lr == 1e-3 and cfg.optim.pct_start == 0.1
    else:
        from realsyn_pl.demo.run import TINY_CLIP

        assert cfg.model.custom == TINY_CLIP and cfg.trainer.accelerator == "cpu"


def test_presets_by_name_equal_presets_by_path(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)  # outside the repository: a relative configs/... path no longer exists as a file
    by_path = load_config(FitConfig, [str(Path(__file__).parents[1] / "configs" / "fit" / "realsyn15m_vitb32.yaml")])
    for name in ["fit/realsyn15m_vitb32", "configs/fit/realsyn15m_vitb32.yaml"]:
        assert load_config(FitConfig, [name]) == by_path
    with pytest.raises(ConfigError, match="nor a preset: .*fit/tiny_cpu"):
        load_config(FitConfig, ["fit/realsyn15m"])


@pytest.mark.slow
def test_wheel_ships_presets_suites_and_reference_tables(tmp_path):
    """A wheel install has no repository around it: configs/ and eval/ must travel inside the package."""
    import zipfile
    from pathlib import Path

    repo = Path(__file__).parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(repo),
                    "-w", str(tmp_path)], check=True, cwd=tmp_path, capture_output=True)
    names = set(zipfile.ZipFile(next(tmp_path.glob("realsyn_pl-*.whl"))).namelist())
    for kind, folder in [("_configs", "configs"), ("_eval", "eval")]:
        shipped = {str(p.relative_to(repo / folder)) for p in (repo / folder).rglob("*") if p.is_file()}
        assert shipped and {f"realsyn_pl/{kind}/{p}" for p in shipped} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(next(tmp_path.glob("realsyn_pl-*.whl"))).extractall(site)
    probe = ("from realsyn_pl.assets import asset_dir, find_preset; from realsyn_pl.evaluation.suites import load_suite;"
             "print(asset_dir('eval')); print(find_preset('fit/tiny_cpu')); print(len(load_suite('paper20').datasets))")
    out = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(site / "realsyn_pl" / "_eval"), str(site / "realsyn_pl" / "_configs" / "fit" / "tiny_cpu.yaml"),
                   "20"]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("trainer.precision=bf17", "trainer.precision"),
        ("optim.scheduler=cosin", "optim.scheduler"),
        ("logging.wandb=maybe", "logging.wandb"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
        ("data.train=[{urls: x", "data.train"),
        ("data.train.0.urls=x.tar", "data.train.0.urls"),
    ],
)
def test_config_errors_are_one_line_at_load_time(override, needle, capsys):
    # No data is given: these must fail while the config loads, before data or model are looked at.
    assert main(["fit", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err and "Traceback" not in err


def test_yaml_file_typo_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train: [{urls: x\n")
    assert main(["fit", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and "line 3" in err and "\n" not in err


@pytest.mark.parametrize(
    "override,needle",
    [("data.text_keys=[syntext]", "data.text_keys=['syntext'] matches no text"),
     ("model.pretrained=openai", "model.pretrained='openai'")],
)
def test_data_and_weights_errors_are_one_line(world_shards, tmp_path, capsys, override, needle):
    from conftest import TINY_CLIP, fit_overrides

    custom = "model.custom=" + str(TINY_CLIP).replace("'", "")
    assert main(["fit", *fit_overrides(world_shards, tmp_path / "run"), custom, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "tag,needle",
    [("openai", "not in the local cache and the network is offline"), ("nosuch", "is not an open_clip tag for ViT-B-32")],
)
def test_pretrained_tag_errors_are_one_line_before_the_model_is_built(world_shards, tmp_path, tag, needle):
    import os

    from fit_helpers import REPO, fit_cmd, write_fit_config

    out = tmp_path / "run"
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, out,
                           **{"model.name": "ViT-B-32", "model.custom": None, "model.pretrained": tag})
    # An empty hub cache and offline mode: the weights cannot be found, and nothing may wait on the network.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(fit_cmd(cfg), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: model.pretrained={tag!r}") and needle in lines[0]
    assert not (out / "checkpoints").exists()
