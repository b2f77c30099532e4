"""With loader workers, our batches and sample order are clip-benchmark's own (so score ties break the same way),
every sample is read by exactly one (rank, worker) slot, and a slot decodes only its own samples."""

import pytest
import torch

from eval_support import (
    classification_entry,
    clip_benchmark_eval,
    make_data,
    overrides,
    result_file,
    retrieval_entry,
    tiny_checkpoint,
)
from realsyn_pl.cli import main
from realsyn_pl.evaluation import datasets as D
from realsyn_pl.evaluation import synthetic


def _indexed_set(folder, n, per_shard):
    """A wds classification set whose label is the sample's index, so a loader's output shows its sample order."""
    import webdataset as wds
    from PIL import Image

    (folder / "test").mkdir(parents=True)
    img = Image.new("RGB", (4, 4))
    with wds.ShardWriter(str(folder / "test" / "%d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            sink.write({"__key__": "s%05d" % i, "png": synthetic._png(img), "cls": i})
        shards = sink.shard
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    (folder / "classnames.txt").write_text("a\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a {c}\n")
    return folder


class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        return torch.zeros(1)


@pytest.mark.parametrize("workers,batch,n,per_shard", [(2, 8, 45, 10), (3, 4, 37, 7), (4, 8, 30, 16), (0, 8, 21, 5)])
def test_order_and_batches_are_clip_benchmarks(tmp_path, workers, batch, n, per_shard):
    from clip_benchmark.datasets.builder import build_dataset

    root = _indexed_set(tmp_path / "idx", n, per_shard)
    ds = build_dataset("wds/idx", root=str(root), transform=lambda im: torch.zeros(1), split="test", download=False)
    loader = torch.utils.data.DataLoader(ds.batched(batch), batch_size=None, shuffle=False, num_workers=workers)
    ref_batches = [b[1].tolist() for b in loader]  # clip_benchmark eval's own loader (cli.py)
    data = D.build(D.EvalDataset(key="idx", dataset="wds/idx", root=str(root)), str(root), "test",
                   lambda im: torch.zeros(1), "zeroshot_classification")
    for world in (1, 2, 3):
        got = []
        for rank in range(world):
            for b in D.rank_loader(data, rank, world, batch, workers):
                got.append((b["idx"].tolist(), b["target"].tolist()))
        keys = sorted(k for ks, _ in got for k in ks)
        assert len(keys) == len(set(keys)) == n  # each sample once, across all ranks and workers
        by_key = {k: t for ks, ts in got for k, t in zip(ks, ts)}
        assert [by_key[k] for k in keys] == [t for b in ref_batches for t in b]  # clip-benchmark's order
        # the same batches, each made whole by one slot, and key // batch numbers them in that order
        assert sorted(tuple(ts) for _, ts in got) == sorted(tuple(b) for b in ref_batches)
        sizes = torch.unique_consecutive(torch.tensor(keys) // batch, return_counts=True)[1].tolist()
        assert sizes == [len(b) for b in ref_batches]


def test_a_slot_decodes_only_its_own_samples(tmp_path):
    root = _indexed_set(tmp_path / "idx", 50, 10)
    counted = []
    for rank in range(2):
        count = _Counting()
        data = D.build(D.EvalDataset(key="idx", dataset="wds/idx", root=str(root)), str(root), "test", count,
                       "zeroshot_classification")
        n = sum(len(b["idx"]) for b in D.rank_loader(data, rank, 2, 8, 0))
        assert count.calls == n
        counted.append(n)
    assert sum(counted) == 50 and min(counted) > 0


@pytest.mark.slow
def test_two_workers_equal_clip_benchmark_with_two_workers(tmp_path):
    ckpt = tiny_checkpoint(tmp_path, seed=0)
    data = make_data(tmp_path)
    out = tmp_path / "ours"
    datasets = f"[{classification_entry(data['classification'])}, {retrieval_entry(data['retrieval'])}]"
    assert main(["eval"] + overrides(ckpt, out, datasets, workers=2)) == 0
    for key, dataset, task in [("colours", "wds/colours", "zeroshot_classification"),
                               ("captions", "wds/captions", "zeroshot_retrieval")]:
        ours = result_file(out, key, task)["metrics"]
        root = data["classification" if task == "zeroshot_classification" else "retrieval"]
        ref = clip_benchmark_eval(tmp_path, ckpt, dataset, root, task, tmp_path / f"cb_{key}.json",
                                  workers=2)["metrics"]
        assert set(ours) == set(ref)
        for k, v in ref.items():
            assert ours[k] == pytest.approx(v, abs=1e-6), (task, k)
