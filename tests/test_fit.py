import json
import os
import signal
import subprocess
import time

import open_clip
import pytest
import torch

from conftest import TINY_NAME
from fit_helpers import REPO, fit_cmd, metrics, run, write_fit_config
from realsyn_pl.cli import main
from realsyn_pl.data.shard_writer import ShardWriter
from realsyn_pl.demo.world import samples
from realsyn_pl.models.factory import load_weights


def _shards_with_bad_samples(folder):
    rows = list(samples(48, seed=7, px=32))
    rows[3]["jpg"] = b"\xff\xd8\xff not a jpeg"
    rows[20]["jpg"] = b"GIF89a broken"
    rows[30]["txt"], rows[30]["json"] = None, {"url": "no text here"}
    with ShardWriter(folder, samples_per_shard=12) as w:
        w.write_all(rows)
    return folder


def test_fit_trains_through_bad_samples_logs_skips_and_exports(tmp_path):
    shards = _shards_with_bad_samples(tmp_path / "shards")
    out = tmp_path / "run"
    cfg = write_fit_config(tmp_path / "fit.yaml", shards, out)
    assert main(["fit", "--config", str(cfg)]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 6  # 48 samples / batch 8, the unusable ones replaced by wrap-around
    assert summary["skipped"]["corrupt_image"] == 2 and summary["skipped"]["missing_text"] == 1
    logged = metrics(out)
    assert max(v.get("data/skipped_corrupt_image", 0) for v in logged.values()) >= 1
    assert all(v["train/loss"] > 0 for v in logged.values() if "train/loss" in v)

    # The export loads in plain open_clip and embeds exactly like the trained LightningModule.
    exported = out / "export" / "open_clip_model.pt"
    open_clip.add_model_config(out / "export" / f"{TINY_NAME}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME, pretrained=str(exported))
    reference, _, _ = open_clip.create_model_and_transforms(TINY_NAME)
    load_weights(reference, str(out / "checkpoints" / "last.ckpt"))
    model.eval(), reference.eval()
    image = torch.randn(2, 3, 32, 32)
    text = open_clip.get_tokenizer(TINY_NAME)(["a red circle", "a blue cross"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), reference.encode_image(image), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_text(text), reference.encode_text(text), rtol=0, atol=1e-6)
        fresh, _, _ = open_clip.create_model_and_transforms(TINY_NAME)
        assert not torch.allclose(fresh.encode_image(image), model.encode_image(image))


def _wait_for(path_glob, folder, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        found = sorted(folder.glob(path_glob)) if folder.exists() else []
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError(path_glob)


@pytest.mark.slow
def test_killed_and_epoch_boundary_resumes_continue_exactly(world_shards, tmp_path):
    common = {"trainer.max_epochs": 2, "trainer.schedule_steps": 20, "data.workers": 2,
              "checkpoint.every_n_train_steps": 1}
    # 80 samples, batch 8, 2 workers -> 10 steps per epoch, 20 in all.
    ref_out = tmp_path / "ref"
    run(fit_cmd(write_fit_config(tmp_path / "ref.yaml", world_shards, ref_out, **common)))
    ref = metrics(ref_out)
    assert max(ref) == 20  # rows are numbered by optimizer steps done

    # Killed with SIGKILL mid-epoch, then resumed from last.ckpt.
    kill_out = tmp_path / "killed"
    cfg = write_fit_config(tmp_path / "kill.yaml", world_shards, kill_out, **common)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(fit_cmd(cfg), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for("*step=4.ckpt", kill_out / "checkpoints")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed_from = torch.load(kill_out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= resumed_from < 20  # last.ckpt is written just after the step checkpoint
    run(fit_cmd(cfg, "resume=last"))
    got = metrics(kill_out)
    for step in range(resumed_from + 1, 21):
        assert got[step]["train/lr"] == pytest.approx(ref[step]["train/lr"], rel=1e-9), step
        assert got[step]["train/loss"] == pytest.approx(ref[step]["train/loss"], abs=1e-5), step
    a = torch.load(ref_out / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(kill_out / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 20
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-4, atol=1e-9)
        assert sa["step"] == sb["step"]

    # Stopped at the end of epoch 1, resumed for epoch 2: the same losses as the uninterrupted run.
    epoch_out = tmp_path / "epoch"
    cfg = write_fit_config(tmp_path / "epoch.yaml", world_shards, epoch_out, **{**common, "trainer.max_epochs": 1})
    run(fit_cmd(cfg))
    run(fit_cmd(cfg, "resume=last", "trainer.max_epochs=2"))
    got = metrics(epoch_out)
    for step in range(1, 21):
        assert got[step]["train/loss"] == pytest.approx(ref[step]["train/loss"], abs=1e-5), step


@pytest.mark.slow
def test_torchrun_two_process_gloo_fit(world_shards, tmp_path):
    out = tmp_path / "ddp"
    cfg = write_fit_config(tmp_path / "ddp.yaml", world_shards, out, **{"data.workers": 2, "trainer.devices": "auto"})
    env = dict(os.environ, NPROC_PER_NODE="2", MASTER_PORT="29611", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", "data_build/launch/torchrun.sh", "fit", "--config", str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    # 80 samples over 2 ranks x 2 workers x batch 8 -> 2 batches per worker, 4 steps, 64 samples.
    assert summary["world_size"] == 2 and summary["global_step"] == 4 and summary["samples_this_run"] == 64


def test_fit_options_take_effect(world_shards, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials
    out = tmp_path / "run"
    cfg = write_fit_config(
        tmp_path / "fit.yaml", world_shards, out,
        **{"trainer.precision": "bf16-mixed", "trainer.accumulate_grad_batches": 2, "trainer.gradient_clip_val": 1.0,
           "model.grad_checkpointing": True, "logging.wandb": "auto", "trainer.max_epochs": 2},
    )
    assert main(["fit", "--config", str(cfg)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 10  # 10 batches per epoch / 2 accumulated, 2 epochs
    logged = metrics(out)
    assert any(v.get("perf/samples_per_s", 0) > 0 for v in logged.values())
    assert any("train/logit_scale" in v for v in logged.values())
    assert list((out / "wandb").glob("offline-run-*")), "W&B must fall back to offline without credentials"


def test_wandb_mode_and_grad_checkpointing(monkeypatch, tmp_path):
    from realsyn_pl.config import ModelConfig
    from realsyn_pl.models.factory import create_clip
    from realsyn_pl.training.loggers import wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline" and wandb_mode("disabled") is None
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    bundle = create_clip(ModelConfig(name=TINY_NAME, custom=__import__("conftest").TINY_CLIP, grad_checkpointing=True))
    assert bundle.model.visual.transformer.grad_checkpointing and bundle.model.transformer.grad_checkpointing
    assert abs(bundle.model.logit_scale.exp().item() - 1 / 0.07) < 1e-4


def test_fit_logs_zero_shot_eval_from_an_eval_preset(world_shards, tmp_path):
    from realsyn_pl.evaluation import synthetic

    data = synthetic.write_classification(tmp_path / "shapes", {"test": 48}, seed=3, px=32)
    preset = tmp_path / "eval.yaml"
    preset.write_text(
        f"datasets:\n  - {{key: shapes, dataset: wds/shapes, root: '{data}', tasks: [zeroshot_classification]}}\n"
        "workers: 0\nbatch_size: 16\n"
    )
    out = tmp_path / "run"
    cfg = write_fit_config(tmp_path / "fit.yaml", world_shards, out,
                           **{"eval.config": str(preset), "trainer.max_epochs": 2})
    assert main(["fit", "--config", str(cfg)]) == 0
    accs = [v["eval/shapes/acc1"] for v in metrics(out).values() if "eval/shapes/acc1" in v]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)


def test_custom_model_config_registers_without_leaving_files(tmp_path, monkeypatch):
    import tempfile

    from realsyn_pl.config import ConfigError
    from realsyn_pl.demo.run import TINY_CLIP
    from realsyn_pl.models.factory import register_model_config

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    register_model_config("leak-check-tiny", TINY_CLIP)
    register_model_config("leak-check-tiny-2", dict(TINY_CLIP, embed_dim=32))  # a rescan after the first file is gone
    assert open_clip.get_model_config("leak-check-tiny") == TINY_CLIP
    assert open_clip.get_model_config("leak-check-tiny-2")["embed_dim"] == 32
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="built-in"):
        register_model_config("ViT-B-32", TINY_CLIP)
