import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from realsyn_pl.config import ConfigError, DataConfig, SourceConfig
from realsyn_pl.data.shard_writer import ShardWriter
from realsyn_pl.data.shards import ClipShardDataset, check_shard_split, plan_batches, resolve_sources
from realsyn_pl.data.texts import TextChooser


def _transform(img):
    return torch.tensor(img.getpixel((0, 0)), dtype=torch.float32)


def _tokenize(texts):
    return torch.tensor([len(t) for t in texts])


def _dataset(shards_glob, rank, world, workers, batch, resampled=False, num_samples=None):
    cfg = DataConfig(train=[SourceConfig(urls=shards_glob)], batch_size=batch, workers=workers, resampled=resampled,
                     num_samples=num_samples, shuffle_buffer=7)
    sources = resolve_sources(cfg)
    total = num_samples or sum(s.num_samples for s in sources)
    per_worker = plan_batches(total, world, workers, batch)
    return ClipShardDataset(sources, _transform, _tokenize, TextChooser.create(cfg.text_keys, None), batch, per_worker,
                            rank, world, resampled, cfg.shuffle_buffer, 0, cfg.image_keys), per_worker


def _epoch(ds, workers, epoch=0):
    ds.epoch = epoch
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return list(loader)


def test_two_ranks_two_workers_see_every_sample_once(world_shards):
    glob = f"{world_shards}/{{00000..00007}}.tar"
    keys, batches_per_rank = [], []
    for rank in range(2):
        ds, per_worker = _dataset(glob, rank, 2, 2, batch=5)
        batches = _epoch(ds, workers=2)
        batches_per_rank.append(len(batches))
        assert all(b["image"].shape[0] == 5 and b["text"].shape[0] == 5 for b in batches)
        keys += [k for b in batches for k in b["key"]]
    assert batches_per_rank == [8, 8]
    assert len(keys) == 80 and len(set(keys)) == 80


def test_epochs_reshuffle_but_cover_the_same_samples(world_shards):
    glob = f"{world_shards}/{{00000..00007}}.tar"
    ds, _ = _dataset(glob, 0, 1, 0, batch=10)
    e0 = [k for b in _epoch(ds, 0, epoch=0) for k in b["key"]]
    e1 = [k for b in _epoch(ds, 0, epoch=1) for k in b["key"]]
    again = [k for b in _epoch(ds, 0, epoch=0) for k in b["key"]]
    assert sorted(e0) == sorted(e1) and e0 != e1 and e0 == again


def test_too_few_shards_for_ranks_and_workers_is_a_clear_error(world_shards):
    with pytest.raises(ConfigError, match="without resampling"):
        check_shard_split(3, world_size=2, workers=2, resampled=False)
    check_shard_split(3, world_size=2, workers=2, resampled=True)
    ds, _ = _dataset(f"{world_shards}/{{00000..00002}}.tar", 1, 2, 2, batch=1)
    with pytest.raises(ConfigError, match="without resampling"):
        _epoch(ds, workers=2)  # rank 1 holds one shard: its second worker has none


def test_resampled_mode_yields_virtual_epoch(world_shards):
    ds, per_worker = _dataset(f"{world_shards}/{{00000..00001}}.tar", 1, 4, 2, batch=4, resampled=True, num_samples=64)
    batches = _epoch(ds, workers=2)
    assert len(batches) == 2 * per_worker == 4


def _bad_shards(folder):
    from realsyn_pl.demo.world import samples

    good = list(samples(12, seed=3, px=32))
    good[2]["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"  # corrupt image
    good[5]["txt"] = None  # no text at all
    good[5]["json"] = {"url": "x"}
    good[7]["json"] = None
    good[7]["txt"] = None
    good[9]["jpg"] = None  # text only
    good[10]["json"] = [1, 2]  # metadata that is not an object: counted, the .txt still trains
    with ShardWriter(folder, samples_per_shard=6) as w:
        w.write_all(good)
    return folder


def test_corrupt_image_and_missing_text_are_skipped_and_counted(tmp_path):
    folder = _bad_shards(tmp_path)
    ds, _ = _dataset(f"{folder}/{{00000..00001}}.tar", 0, 1, 0, batch=8)
    batches = _epoch(ds, 0)
    assert len(batches) == 1 and len(set(batches[0]["key"])) == 8  # 12 - 4 unusable = 8 usable samples
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert skipped["corrupt_image"] == 1 and skipped["missing_text"] == 2
    assert skipped["missing_image"] == 1 and skipped["bad_metadata"] == 1


def test_truncated_tar_is_skipped_and_counted(tmp_path):
    from realsyn_pl.demo.world import write_world_shards

    folder = write_world_shards(tmp_path, 20, 10, seed=5, px=32)
    raw = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(raw[: len(raw) // 2 + 100])
    ds, _ = _dataset(f"{folder}/{{00000..00001}}.tar", 0, 1, 0, batch=4)
    batches = _epoch(ds, 0)
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert len(batches) == 5
    assert skipped["corrupt_tar"] >= 1


def test_sample_count_needs_sizes(tmp_path, world_shards):
    import shutil

    shutil.copy(world_shards / "00000.tar", tmp_path / "a.tar")
    with pytest.raises(ConfigError, match="sizes.json"):
        resolve_sources(DataConfig(train=[SourceConfig(urls=str(tmp_path / "a.tar"))]))
    cfg = DataConfig(train=[SourceConfig(urls=str(tmp_path / "a.tar"), num_samples=10)])
    assert resolve_sources(cfg)[0].num_samples == 10
    (tmp_path / "a_stats.json").write_text(json.dumps({"successes": 10}))
    assert resolve_sources(DataConfig(train=[SourceConfig(urls=str(tmp_path / "a.tar"))]))[0].num_samples == 10


@pytest.mark.parametrize("workers", [0, 2, 4])
def test_mid_epoch_resume_continues_with_the_next_batch_for_any_skip(world_shards, workers):
    """A resume after n batches yields batches n, n+1, ... of the uninterrupted epoch, in order, whatever n mod the
    number of workers (DataLoader always takes its first batch from worker 0)."""
    from realsyn_pl.data.shards import ShardLoader

    glob = f"{world_shards}/{{00000..00007}}.tar"
    ds, per_worker = _dataset(glob, 0, 1, workers, batch=4)
    length = per_worker * max(1, workers)
    full = [b["key"] for b in ShardLoader(ds, workers, length, lambda: 1)]
    assert len(full) == length and len({k for b in full for k in b}) == 4 * length
    for done in range(1, length):
        resumed = ShardLoader(ds, workers, length, lambda: 0, resume={"epoch": 1, "batches_done": done})
        assert [b["key"] for b in resumed] == full[done:], done


def test_resampled_sources_are_weighted_per_shard_as_open_clip_upsampling_factors(world_shards):
    from realsyn_pl.data.shards import Source

    big = Source([f"big-{i}.tar" for i in range(6)], weight=1.0, num_samples=60)
    small = Source(["small-0.tar", "small-1.tar"], weight=1.0, num_samples=20)
    upsampled = Source(["up-0.tar", "up-1.tar"], weight=3.0, num_samples=20)
    ds = ClipShardDataset([big, small, upsampled], _transform, _tokenize, TextChooser.create(["text1"], None), 1, 1,
                          0, 1, True, 1, 0, ["jpg"])
    import itertools
    import random

    stream = next(ds._passes(0, 1, random.Random(0)))
    drawn = Counter(url.split("-")[0] for url in itertools.islice(stream, 12000))
    # Shares follow weight x shard count: 6 : 2 : 6 (not 1 : 1 : 3 per source).
    assert drawn["big"] / 12000 == pytest.approx(6 / 14, abs=0.02)
    assert drawn["small"] / 12000 == pytest.approx(2 / 14, abs=0.02)
    assert drawn["up"] / 12000 == pytest.approx(6 / 14, abs=0.02)


def test_resume_skips_without_decoding_and_keeps_the_augmentations(world_shards):
    """The skipped batches are passed over at the tar-member level (no decode, no transform), and the batches after
    the skip carry the same random augmentations as in the uninterrupted epoch."""
    from realsyn_pl.data.shards import ShardLoader

    calls = []

    def augment(img):
        calls.append(1)
        return torch.tensor(img.getpixel((0, 0)), dtype=torch.float32) + torch.rand(3)  # a random "crop"

    ds, per_worker = _dataset(f"{world_shards}/{{00000..00007}}.tar", 0, 1, 0, batch=4)
    ds.transform = augment
    length = per_worker
    full = list(ShardLoader(ds, 0, length, lambda: 0))
    assert len(calls) == 4 * length
    calls.clear()
    done = int(0.9 * length)
    resumed = list(ShardLoader(ds, 0, length, lambda: 0, resume={"epoch": 0, "batches_done": done}))
    assert len(calls) == 4 * (length - done)  # only the batches it yields were decoded
    assert [b["key"] for b in resumed] == [b["key"] for b in full[done:]]
    for a, b in zip(resumed, full[done:]):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)


def test_glob_urls_expand_sorted_with_counts_from_img2dataset_stats(world_shards, tmp_path):
    """data.train urls may be a glob: an img2dataset folder (per-shard _stats.json, no sizes.json) with a gap in its
    numbering is read whole, in shard order, with its sample count; a glob matching nothing is one line."""
    import shutil

    sizes = json.loads((world_shards / "sizes.json").read_text())
    for src, dst in (("00000", "00000"), ("00001", "00001"), ("00002", "00073")):
        shutil.copy(world_shards / f"{src}.tar", tmp_path / f"{dst}.tar")
        (tmp_path / f"{dst}_stats.json").write_text(json.dumps({"successes": sizes[f"{src}.tar"]}))
    (tmp_path / "00000.parquet").write_bytes(b"")  # img2dataset's per-shard table: not matched by *.tar
    cfg = DataConfig(train=[SourceConfig(urls=f"{tmp_path}/*.tar")])
    (src,) = resolve_sources(cfg)
    assert src.shards == [f"{tmp_path}/{n}.tar" for n in ("00000", "00001", "00073")]
    assert src.num_samples == sum(sizes[f"{n}.tar"] for n in ("00000", "00001", "00002")) == 30
    both = resolve_sources(DataConfig(train=[SourceConfig(urls=f"{world_shards}/0000[0-1].tar::{tmp_path}/*73.tar")]))
    assert both[0].shards == [f"{world_shards}/00000.tar", f"{world_shards}/00001.tar", f"{tmp_path}/00073.tar"]
    with pytest.raises(ConfigError, match=r"^data.train\[0\].urls: nothing matches '.*/nothing-\*.tar'$"):
        resolve_sources(DataConfig(train=[SourceConfig(urls=f"{tmp_path}/nothing-*.tar")]))
