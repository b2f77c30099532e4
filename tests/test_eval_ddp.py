"""A 2-process gloo DDP eval gives exactly the single-process numbers (no samples duplicated by padding), and the
single-process plain loop gives exactly what Trainer.predict gives."""
import json
import subprocess
import sys

import pytest

from eval_support import (
    ENV,
    classification_entry,
    make_data,
    overrides,
    result_file,
    retrieval_entry,
    tiny_checkpoint,
)


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
        results[name] = {f"{k}_{t}.json": result_file(tmp_path / name, k, t) for k, t in [
            ("colours", "zeroshot_classification"), ("colours", "linear_probe"), ("captions", "zeroshot_retrieval")]}
        assert len(list((tmp_path / name / "results").glob("*.json"))) == 3
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


def _corrupt_sample(split_dir, index):
    """Overwrite sample `index`'s png (in shard order) with bytes no decoder reads."""
    import io
    import tarfile

    seen = 0
    for tar_path in sorted(split_dir.glob("*.tar"), key=lambda p: int(p.stem)):
        with tarfile.open(tar_path) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
        hit = False
        for i, (m, _) in enumerate(members):
            if m.name.endswith(".png"):
                if seen == index:
                    members[i] = (m, b"not an image")
                    m.size = len(b"not an image")
                    hit = True
                seen += 1
        if hit:
            with tarfile.open(tar_path, "w") as tf:
                for m, payload in members:
                    tf.addfile(m, io.BytesIO(payload))
            return
    raise AssertionError(f"no sample {index}")


@pytest.mark.slow
def test_a_dataset_failing_on_one_rank_fails_on_all_and_the_next_one_runs(tmp_path):
    ckpt = tiny_checkpoint(tmp_path, seed=0)
    data = make_data(tmp_path)
    # batch 1 (samples 16-31 at batch_size 16) is rank 1's: only rank 1 decodes the corrupt sample
    _corrupt_sample(data["classification"] / "test", 20)
    both = f"[{classification_entry(data['classification'])}, {retrieval_entry(data['retrieval'])}]"
    ddp = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           "-m", "realsyn_pl", "eval"]
    proc = subprocess.run(ddp + overrides(ckpt, tmp_path / "ddp", both), capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = [sys.executable, "-m", "realsyn_pl", "eval"]
    ref = subprocess.run(single + overrides(ckpt, tmp_path / "single", f"[{retrieval_entry(data['retrieval'])}]"),
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    failed = {f["key"]: f["reason"] for f in summary["failed"]}
    assert list(failed) == ["colours"] and "(on rank 1)" in failed["colours"]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("failed:")] == [
        f"failed: colours zeroshot_classification: {failed['colours']}"]  # once, from rank 0, with rank 1's reason
    ours = result_file(tmp_path / "ddp", "captions", "zeroshot_retrieval")
    assert ours["metrics"] == result_file(tmp_path / "single", "captions", "zeroshot_retrieval")["metrics"]
    assert ours["num_texts"] == 60
