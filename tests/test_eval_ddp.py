"""A 2-process gloo DDP eval gives exactly the single-process numbers (no samples duplicated by padding), and the
single-process plain loop gives exactly what Trainer.predict gives."""
import json
import subprocess
import sys

import pytest

from eval_support import ENV, classification_entry, make_data, overrides, retrieval_entry, tiny_checkpoint


@pytest.mark.slow
def test_two_process_eval_equals_single_process(tmp_path):
    ckpt = tiny_checkpoint(tmp_path, seed=0)
    data = make_data(tmp_path)
    datasets = (f"[{classification_entry(data['classification'], tasks='[zeroshot_classification, linear_probe]', val_split='val')}, "
                f"{retrieval_entry(data['retrieval'])}]")
    results = {}
    single = [sys.executable, "-m", "realsyn_pl"]
    for name, launcher, extra in [("single", single, []), ("trainer", single, ["plain_single_process=false"]),
                                  ("ddp", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                           "--master_port", "29517", "-m", "realsyn_pl"], [])]:
        args = overrides(ckpt, tmp_path / name, datasets, **{"linear_probe.cache_dir": "null",
                                                             "linear_probe.epochs": 2})
        proc = subprocess.run(launcher + ["eval"] + args + extra, capture_output=True, text=True, env=ENV, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = {p.name: json.loads(p.read_text()) for p in (tmp_path / name / "results").glob("*.json")}
        assert "processes: " + ("2" if name == "ddp" else "1") in (tmp_path / name / "report.md").read_text()
    assert set(results["single"]) == set(results["trainer"]) == set(results["ddp"]) == {
        "colours_zeroshot_classification.json", "colours_linear_probe.json", "captions_zeroshot_retrieval.json"}
    for file, single in results["single"].items():
        for other in ("trainer", "ddp"):
            assert results[other][file]["num_samples"] == single["num_samples"]
            assert results[other][file]["metrics"] == single["metrics"], (other, file)  # exactly, not approximately
    assert results["ddp"]["colours_zeroshot_classification.json"]["num_samples"] == 37
    assert results["ddp"]["captions_zeroshot_retrieval.json"]["num_texts"] == 60


@pytest.mark.parametrize("trainer, cuda, env, expected", [
    ({}, 0, {}, "cpu"),
    ({"accelerator": "cpu", "devices": 1}, 2, {}, "cpu"),
    ({"accelerator": "cpu", "devices": 2}, 0, {}, None),  # two CPU processes: DDP
    ({}, 1, {}, "cuda:0"),
    ({}, 2, {}, None),  # devices=auto on two GPUs: DDP over both
    ({"devices": 1}, 2, {}, "cuda:0"),
    ({"precision": "bf16-mixed"}, 1, {}, "cuda:0"),
    ({"precision": "bf16-mixed"}, 0, {}, None),  # CPU autocast: left to Lightning's plugin
    ({"precision": "16-true"}, 1, {}, None),
    ({"strategy": "ddp"}, 0, {}, None),
    ({}, 0, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, None),  # under torchrun
    ({"plain_single_process": False}, 0, {}, None),
])
def test_plain_loop_only_for_one_process_on_one_device(monkeypatch, trainer, cuda, env, expected):
    import torch

    from realsyn_pl.evaluation.config import EvalConfig, EvalTrainerConfig
    from realsyn_pl.evaluation.runner import plain_device

    for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    plain = trainer.pop("plain_single_process", True)
    cfg = EvalConfig(trainer=EvalTrainerConfig(**trainer), plain_single_process=plain)
    device = plain_device(cfg)
    assert (None if device is None else str(device)) == expected
