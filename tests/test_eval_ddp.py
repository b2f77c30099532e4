"""A 2-process gloo DDP eval gives exactly the single-process numbers (no samples duplicated by padding), and the
single-process plain loop gives exactly what Trainer.predict gives."""
import json
import subprocess
import sys

import pytest

from eval_support import (
    ENV,
    NAME,
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
    assert proc.returncode == 1, proc.stderr[-3000:]  # a run failed; the other one's results are written
    single = [sys.executable, "-m", "realsyn_pl", "eval"]
    ref = subprocess.run(single + overrides(ckpt, tmp_path / "single", f"[{retrieval_entry(data['retrieval'])}]"),
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    failed = {f["key"]: f["reason"] for f in summary["failed"]}
    assert list(failed) == ["colours"] and "(on rank 1)" in failed["colours"]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("failed:")] == [
        f"failed: colours zeroshot_classification: {failed['colours']}"]  # once, from rank 0, with rank 1's reason
    # (torchrun reports the ranks' exit code 1 after it, so the line is not the last of stderr here)
    assert (f"eval: 1 run failed: colours zeroshot_classification with {NAME} ({ckpt.name}): {failed['colours']}"
            in proc.stderr.splitlines())
    ours = result_file(tmp_path / "ddp", "captions", "zeroshot_retrieval")
    assert ours["metrics"] == result_file(tmp_path / "single", "captions", "zeroshot_retrieval")["metrics"]
    assert ours["num_texts"] == 60


def _cache_rank(rank: int, port: int, folder: str, root: str, out: str) -> None:
    """One rank of test_ranks_agree_on_a_cache_only_rank_0_has: rank 0's cache holds the train split, rank 1's none;
    rank 0's cache writes fail."""
    import datetime

    import open_clip
    import torch
    import torch.distributed as dist

    from eval_support import NAME, TINY
    from realsyn_pl.evaluation.config import EvalConfig, EvalDataset, LinearProbeConfig
    from realsyn_pl.evaluation.runner import Runner, manual_extractor
    from realsyn_pl.models.factory import register_model_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # a rank left alone in a collective fails, not hangs
    register_model_config(NAME, TINY)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME).eval()
    tokenizer, transform = open_clip.get_tokenizer(NAME), open_clip.image_transform(32, is_train=False)
    cfg = EvalConfig(batch_size=16, workers=0,
                     linear_probe=LinearProbeConfig(cache_dir=f"{folder}/cache{rank}"))
    runner = Runner(cfg, model, tokenizer, transform, manual_extractor(model, tokenizer, torch.device("cpu")),
                    rank, 2, torch.device("cpu"), amp=False)
    entry = EvalDataset(key="colours", dataset="wds/colours", root=root, tasks=["linear_probe"])
    if rank == 0:
        key = runner.cache.key(entry.key, "wds/colours", root, "train", transform, False)
        runner.cache.save(key, torch.zeros(96, 32), torch.zeros(96, dtype=torch.long))

        def broken(*args):
            raise OSError("No space left on device")

        runner.cache.save = broken
    train_x, _, hit = runner.cached_features(entry, "train")
    val_x, _, val_hit = runner.cached_features(entry, "val")
    torch.save({"train": train_x, "hit": hit, "val": val_x, "val_hit": val_hit}, f"{out}{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_on_a_cache_only_rank_0_has(tmp_path, capfd):
    import socket

    import torch
    import torch.multiprocessing as mp

    data = make_data(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_cache_rank, args=(port, str(tmp_path), str(data["classification"]), str(tmp_path / "rank")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # rank 1 missed, so both extracted: rank 0 did not return its (zero) cached features alone
    assert (r0["hit"], r1["hit"], r0["val_hit"], r1["val_hit"]) == (False, False, False, False)
    assert torch.equal(r0["train"], r1["train"]) and r0["train"].shape == (96, 32) and r0["train"].abs().sum() > 0
    assert torch.equal(r0["val"], r1["val"]) and r0["val"].shape == (48, 32)
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("warning: feature cache")]
    # rank 0's failed saves are warnings, not a failure of rank 0 alone (the others would go on without it)
    assert [w.rsplit("/", 1)[1] for w in warnings] == ["train.pt: OSError: No space left on device",
                                                       "val.pt: OSError: No space left on device"]
    assert not list((tmp_path / "cache1").rglob("*.pt"))  # only rank 0 writes the cache
