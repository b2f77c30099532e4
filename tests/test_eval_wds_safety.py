"""clip-benchmark `wds/` shards are read without running code from them or expanding them: only the image and the
target of a sample are decoded, with explicit handlers; other members stay bytes."""
import gzip
import io
import pickle
import tarfile
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from realsyn_pl.evaluation.datasets import EvalData, WdsSource, decode_member, rank_loader


class _WritesAFile:
    """Unpickling this opens (creates) `path`: a stand-in for any code a pickle can run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, members) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _transform(img):
    return torch.tensor(img.getpixel((0, 0)), dtype=torch.float32)


def test_pickled_members_are_never_unpickled_and_the_rest_evaluates(tmp_path):
    target = tmp_path / "pwned"
    payload = pickle.dumps(_WritesAFile(str(target)))
    members = []
    for i in range(5):
        members += [(f"s{i}.png", _png(40 * i)), (f"s{i}.cls", str(i % 3).encode())]
        if i == 2:
            members += [(f"s{i}.pyd", payload), (f"s{i}.pickle", payload)]
    _write_tar(tmp_path / "0.tar", members)
    source = WdsSource([str(tmp_path / "0.tar")], _transform, "classification")
    batches = list(rank_loader(EvalData(source, "classification", None, None), 0, 1, batch_size=2, workers=0))
    assert not target.exists()
    assert torch.cat([b["idx"] for b in batches]).tolist() == [0, 1, 2, 3, 4]
    assert torch.cat([b["target"] for b in batches]).tolist() == [0, 1, 2, 0, 1]
    assert torch.cat([b["image"] for b in batches])[:, 0].tolist() == [0.0, 40.0, 80.0, 120.0, 160.0]
    raw = list(source.raw())[2]
    assert raw["pyd"] == payload and raw["pickle"] == payload  # left as bytes


def test_gz_members_are_not_inflated(tmp_path):
    bomb = gzip.compress(bytes(32 << 20), 9)  # 32 MiB of zeros in ~32 KiB
    assert len(bomb) < 100_000
    _write_tar(tmp_path / "0.tar", [("s0.png", _png(7)), ("s0.cls", b"1"), ("s0.blob.gz", bomb),
                                    ("s0.cls.gz", gzip.compress(b"2"))])
    source = WdsSource([str(tmp_path / "0.tar")], _transform, "classification")
    sample = next(source.raw())
    tracemalloc.start()
    try:
        image, label = source.decode(sample)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert label == 1 and image[0].item() == 7.0
    assert peak < 4 << 20, peak  # inflating the member would take 32 MiB
    assert decode_member("gz", bomb) == bomb and decode_member("blob.gz", bomb) == bomb


def test_only_explicit_handlers_decode_members():
    assert decode_member("cls", b" 3\n") == 3
    assert decode_member("txt", "caption\u00e9".encode()) == "caption\u00e9"
    assert decode_member("json", b'{"a": [1]}') == {"a": [1]}
    assert decode_member("png", _png(9)).getpixel((0, 0)) == (9, 0, 0)
    buf = io.BytesIO()
    np.save(buf, np.array([0, 1, 1], dtype=np.uint8))
    assert decode_member("npy", buf.getvalue()).tolist() == [0, 1, 1]
    for ext in ("pyd", "pickle", "pth", "mp", "ten", "cbor", "npz"):
        assert decode_member(ext, b"\x80\x04K\x01.") == b"\x80\x04K\x01."


def test_object_npy_is_refused_not_unpickled(tmp_path):
    target = tmp_path / "pwned"
    buf = io.BytesIO()
    np.save(buf, np.array([_WritesAFile(str(target))], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_member("npy", buf.getvalue())
    assert not target.exists()


def test_a_symlink_member_is_a_one_line_error_naming_it(tmp_path):
    _write_tar(tmp_path / "0.tar", [("s0.png", _png(1)), ("s0.cls", b"0"), ("s1.png", "s0.png"), ("s1.cls", b"1")])
    source = WdsSource([str(tmp_path / "0.tar")], _transform, "classification")
    with pytest.raises(ValueError, match=r"0\.tar/s1\.png: non regular member \(symlink to s0\.png\)"):
        list(source.raw())
