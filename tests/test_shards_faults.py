"""The training loader against hostile or broken samples: every bad sample is skipped, counted under a named reason
and named (shard/key); nothing in a shard is unpickled or decoded beyond its header when it must not be."""
import io
import logging
import struct
import tarfile
import zlib
from collections import Counter

import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from realsyn_pl.config import DataConfig, SourceConfig
from realsyn_pl.data.shards import ClipShardDataset, ShardLoader, check_text_keys, plan_batches, resolve_sources
from realsyn_pl.data.texts import TextChooser


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _huge_png(side: int = 12000) -> bytes:
    """A valid 1-bit PNG of side x side pixels that takes a few KB on disk."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _write_tar(path, members) -> None:
    """members: (name, bytes) for files, (name, "->target") for symlinks."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _good(key: str, value: int) -> list:
    return [(f"{key}.jpg", _jpeg(value)), (f"{key}.txt", f"caption {key}".encode())]


def _transform(img):
    return torch.tensor(img.getpixel((0, 0)), dtype=torch.float32)


def _tokenize(texts):
    return torch.tensor([len(t) for t in texts])


def _dataset(urls: str, num_samples: int, batch: int, workers: int = 0, shuffle_buffer: int = 1, **cfg_extra):
    cfg = DataConfig(train=[SourceConfig(urls=urls, num_samples=num_samples)], batch_size=batch, workers=workers,
                     shuffle_buffer=shuffle_buffer, **cfg_extra)
    per_worker = plan_batches(num_samples, 1, workers, batch)
    ds = ClipShardDataset(resolve_sources(cfg), _transform, _tokenize, TextChooser.create(cfg.text_keys, None), batch,
                          per_worker, 0, 1, False, cfg.shuffle_buffer, 0, cfg.image_keys, max_pixels=cfg.max_pixels)
    return ds, per_worker


def _read_all(ds) -> tuple[list[str], Counter, list]:
    batches = list(DataLoader(ds, batch_size=None, num_workers=0))
    skipped, named = Counter(), []
    for b in batches:
        skipped.update(b["skipped"])
        named += [tuple(n) for n in b["skipped_keys"]]  # the DataLoader hands pairs on as lists
    return [k for b in batches for k in b["key"]], skipped, named


def test_dds_image_and_deeply_nested_json_are_skipped_counted_and_named(tmp_path, caplog):
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44) + struct.pack("<2I", 32, 4) + b"ABCD"
    dds += bytes(104)
    with pytest.raises(NotImplementedError):  # what PIL does with it: not an OSError
        Image.open(io.BytesIO(dds))
    deep = b"[" * 10_000 + b"]" * 10_000
    members = _good("a0", 10) + [("a1.jpg", dds), ("a1.txt", b"a dds")] + _good("a2", 20)
    members += [("a3.jpg", _jpeg(30)), ("a3.json", deep)] + _good("a4", 40)
    members += [("a5.jpg", _jpeg(50)), ("a5.txt", b"deep json, caption still good"), ("a5.json", deep)]
    _write_tar(tmp_path / "0.tar", members)
    ds, _ = _dataset(str(tmp_path / "0.tar"), num_samples=4, batch=4)
    with caplog.at_level(logging.WARNING, logger="realsyn_pl.data.shards"):
        keys, skipped, named = _read_all(ds)
    url = str(tmp_path / "0.tar")
    assert sorted(keys) == [f"{url}/{k}" for k in ("a0", "a2", "a4", "a5")]
    assert skipped["corrupt_image"] == 1 and skipped["bad_metadata"] == 2 and skipped["missing_text"] == 1
    assert ("corrupt_image", f"{url}/a1") in named and ("missing_text", f"{url}/a3") in named
    assert ("bad_metadata", f"{url}/a3") in named and ("bad_metadata", f"{url}/a5") in named
    assert f"skipped {url}/a1 (corrupt_image): NotImplementedError" in caplog.text
    assert f"skipped {url}/a3 (bad_metadata): RecursionError" in caplog.text


def test_an_exception_of_any_kind_while_decoding_one_image_skips_only_that_sample(tmp_path):
    _write_tar(tmp_path / "0.tar", [m for i in range(5) for m in _good(f"b{i}", 40 * i)])

    def fragile(img):  # e.g. a transform meeting an image it cannot handle
        if img.getpixel((0, 0))[0] == 80:
            raise ZeroDivisionError("no")
        return _transform(img)

    ds, _ = _dataset(str(tmp_path / "0.tar"), num_samples=4, batch=4)
    ds.transform = fragile
    keys, skipped, named = _read_all(ds)
    url = str(tmp_path / "0.tar")
    assert sorted(keys) == [f"{url}/b{i}" for i in (0, 1, 3, 4)]
    assert skipped["corrupt_image"] == 1 and named == [("corrupt_image", f"{url}/b2")]


def test_check_text_keys_reads_past_a_deeply_nested_json(tmp_path):
    _write_tar(tmp_path / "0.tar", [("c0.jpg", _jpeg(1)), ("c0.json", b"[" * 10_000 + b"]" * 10_000)]
               + _good("c1", 2))
    cfg = DataConfig(train=[SourceConfig(urls=str(tmp_path / "0.tar"), num_samples=2)])
    check_text_keys(resolve_sources(cfg), cfg.text_keys)  # finds c1's text, no RecursionError


def test_images_over_the_pixel_cap_are_skipped_from_their_header(tmp_path, monkeypatch):
    huge = _huge_png()
    assert len(huge) < 100_000
    _write_tar(tmp_path / "0.tar", _good("d0", 1) + [("d1.png", huge), ("d1.txt", b"huge")] + _good("d2", 2))
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, _orig=ImageFile.ImageFile.load:
                        decoded.append(self.size) or _orig(self))
    ds, _ = _dataset(str(tmp_path / "0.tar"), num_samples=2, batch=2)
    assert ds.max_pixels == 89_478_485  # the build's cap (image_filter.max_pixels)
    keys, skipped, named = _read_all(ds)
    url = str(tmp_path / "0.tar")
    assert sorted(keys) == [f"{url}/d0", f"{url}/d2"]
    assert skipped["too_many_pixels"] == 1 and named == [("too_many_pixels", f"{url}/d1")]
    assert (12000, 12000) not in decoded  # never decoded

    assert (8, 8) in decoded
    small, _ = _dataset(str(tmp_path / "0.tar"), num_samples=1, batch=1, max_pixels=63)  # data.max_pixels
    with pytest.raises(RuntimeError, match="'too_many_pixels': 3"):  # the 8x8 JPEGs are over it too
        _read_all(small)


def test_symlinked_and_other_non_regular_members_are_counted_and_named(tmp_path):
    members = _good("e0", 1) + [("e1.jpg", "->e0.jpg"), ("e1.txt", b"image is a link")] + _good("e2", 2)
    _write_tar(tmp_path / "0.tar", members)
    with tarfile.open(tmp_path / "0.tar", "a") as tar:  # a fifo after the samples
        fifo = tarfile.TarInfo("e3.jpg")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    ds, _ = _dataset(str(tmp_path / "0.tar"), num_samples=2, batch=2)
    keys, skipped, named = _read_all(ds)
    url = str(tmp_path / "0.tar")
    assert sorted(keys) == [f"{url}/e0", f"{url}/e2"]
    assert skipped["non_regular_member"] == 2
    assert ("non_regular_member", f"{url}/e1.jpg") in named and ("non_regular_member", f"{url}/e3.jpg") in named
    assert ("missing_image", f"{url}/e1") in named


def _truncated_jpeg(value: int) -> bytes:
    """A JPEG whose header reads (size known) but whose body ends early: found bad only by decoding."""
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60 + value).convert("RGB").save(buf, format="JPEG", quality=95)
    raw = buf.getvalue()[: len(buf.getvalue()) * 2 // 3]
    assert Image.open(io.BytesIO(raw)).size == (64, 64)
    return raw


def _resume_shards(folder) -> str:
    for shard in range(2):
        members = []
        for i in range(12):
            key = f"s{shard}x{i:02d}"
            bad = i in (1, 3, 4)  # early in each shard: inside the part a resume passes over
            members += [(f"{key}.jpg", _truncated_jpeg(i) if bad else _jpeg(10 * i + shard)),
                        (f"{key}.txt", f"caption {key}".encode())]
        _write_tar(folder / f"{shard}.tar", members)
    return f"{folder}/{{0..1}}.tar"


@pytest.mark.parametrize("workers,dones", [(0, None), (2, (1, 3))])
def test_mid_epoch_resume_counts_the_samples_that_failed_to_decode(tmp_path, workers, dones):
    """A resume from the recorded positions delivers exactly the rest of the epoch, even with samples that failed
    to decode (after a valid header) in the part already trained: no repeats, no losses."""
    urls = _resume_shards(tmp_path)
    ds, per_worker = _dataset(urls, num_samples=16, batch=2, workers=workers, shuffle_buffer=3)
    length = per_worker * max(1, workers)
    straight = ShardLoader(ds, workers, length, lambda: 0)
    full = [b["key"] for b in straight]
    assert len({k for b in full for k in b}) == 2 * length
    for done in dones or range(1, length):
        saved = {"epoch": 0, "batches_done": done, "consumed": [straight.positions(done)]}
        resumed = [b["key"] for b in ShardLoader(ds, workers, length, lambda: 0, resume=saved)]
        assert resumed == full[done:], done
        delivered = [k for b in full[:done] + resumed for k in b]
        assert len(delivered) == len(set(delivered)) == 2 * length
    # What the fix is about: counting batch_size per trained batch (the older checkpoints) shifts the stream.
    old = [b["key"] for b in ShardLoader(ds, workers, length, lambda: 0, resume={"epoch": 0, "batches_done": 3})]
    assert old != full[3:]


def test_the_datamodule_checkpoint_carries_the_stream_positions(tmp_path):
    """What a checkpoint saves (ShardDataModule.state_dict) resumes a new datamodule exactly where it stopped."""
    from types import SimpleNamespace

    from realsyn_pl.data.datamodule import ShardDataModule

    def trainer(done: int) -> SimpleNamespace:
        progress = SimpleNamespace(current=SimpleNamespace(processed=done))
        return SimpleNamespace(current_epoch=0, global_rank=0, world_size=1,
                               fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))

    cfg = DataConfig(train=[SourceConfig(urls=_resume_shards(tmp_path), num_samples=16)], batch_size=2, workers=0,
                     shuffle_buffer=3)
    first = ShardDataModule(cfg, _transform, _tokenize)
    first.trainer = trainer(3)
    full = [b["key"] for b in first.train_dataloader()]
    state = first.state_dict()
    assert state["batches_done"] == 3 and state["consumed"] == [first.loader.positions(3)]
    assert state["consumed"][0][0] > 3 * 2  # the samples that failed to decode are in the count
    second = ShardDataModule(cfg, _transform, _tokenize)
    second.trainer = trainer(0)
    second.load_state_dict(state)
    assert [b["key"] for b in second.train_dataloader()] == full[3:]
