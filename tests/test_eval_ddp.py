"""A 2-process gloo DDP eval gives exactly the single-process numbers (no samples duplicated by padding)."""
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
    for name, launcher in [("single", [sys.executable, "-m", "realsyn_pl"]),
                           ("ddp", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", "29517", "-m", "realsyn_pl"])]:
        args = overrides(ckpt, tmp_path / name, datasets, **{"linear_probe.cache_dir": "null",
                                                             "linear_probe.epochs": 2})
        proc = subprocess.run(launcher + ["eval"] + args, capture_output=True, text=True, env=ENV, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = {p.name: json.loads(p.read_text()) for p in (tmp_path / name / "results").glob("*.json")}
        assert "processes: " + ("2" if name == "ddp" else "1") in (tmp_path / name / "report.md").read_text()
    assert set(results["single"]) == set(results["ddp"]) == {
        "colours_zeroshot_classification.json", "colours_linear_probe.json", "captions_zeroshot_retrieval.json"}
    for file, single in results["single"].items():
        ddp = results["ddp"][file]
        assert ddp["num_samples"] == single["num_samples"]
        assert ddp["metrics"] == single["metrics"], file  # exactly, not approximately
    assert results["ddp"]["colours_zeroshot_classification.json"]["num_samples"] == 37
    assert results["ddp"]["captions_zeroshot_retrieval.json"]["num_texts"] == 60
