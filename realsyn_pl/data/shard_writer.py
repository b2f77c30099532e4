"""Write webdataset tar shards in the released RealSyn layout (.jpg, .txt = text1, .json with the rest).

Each shard is written under a temporary name and renamed when complete, so a crash never leaves a half tar
that a reader would take for a whole one; sizes.json (shard name -> samples) is rewritten after every shard.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Optional

from PIL import Image


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # same input -> same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples {key, jpg (bytes), txt (str), json (dict)} into `{prefix}{index:05d}.tar` shards."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int = 10_000, prefix: str = "", start_index: int = 0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.prefix = prefix
        self.index = start_index
        self.sizes: dict[str, int] = {}
        sizes_file = self.out_dir / "sizes.json"
        if sizes_file.is_file():
            self.sizes = json.loads(sizes_file.read_text())
        self._buffer: list[dict[str, Any]] = []

    def write(self, sample: dict[str, Any]) -> None:
        self._buffer.append(sample)
        if len(self._buffer) >= self.samples_per_shard:
            self.flush()

    def write_all(self, samples: Iterable[dict[str, Any]]) -> None:
        for s in samples:
            self.write(s)

    def flush(self) -> Optional[Path]:
        if not self._buffer:
            return None
        name = f"{self.prefix}{self.index:05d}.tar"
        final = self.out_dir / name
        tmp = self.out_dir / (name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in self._buffer:
                key = s["key"]
                if "jpg" in s and s["jpg"] is not None:
                    _add_member(tar, f"{key}.jpg", s["jpg"])
                if s.get("txt") is not None:
                    _add_member(tar, f"{key}.txt", s["txt"].encode("utf-8"))
                if s.get("json") is not None:
                    _add_member(tar, f"{key}.json", json.dumps(s["json"], sort_keys=True).encode("utf-8"))
        os.replace(tmp, final)
        self.sizes[name] = len(self._buffer)
        self._write_sizes()
        self._buffer = []
        self.index += 1
        return final

    def _write_sizes(self) -> None:
        tmp = self.out_dir / "sizes.json.tmp"
        tmp.write_text(json.dumps(self.sizes, indent=1, sort_keys=True))
        os.replace(tmp, self.out_dir / "sizes.json")

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
