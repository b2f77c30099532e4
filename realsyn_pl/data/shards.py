"""Webdataset shards (released RealSyn layout or plain image-caption) -> batches of (image, tokens) for CLIP.

Epoch semantics (the part that keeps DDP from hanging): every rank yields exactly `len(loader)` batches and every
worker exactly `batches_per_worker`. Non-resampled: shards are shuffled with (seed, epoch), dealt to ranks then to
workers; a worker that runs short (skipped samples, uneven shards) wraps around its own shards, and whatever does not
fill a whole batch is left for the next epoch's shuffle (as drop_last). Resampled: each worker draws shards with
replacement (each shard weighted by its source's upsampling factor, as open_clip does) for a virtual epoch of `num_samples`.
"""
from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from realsyn_pl.config import ConfigError, DataConfig, SourceConfig
from realsyn_pl.data.texts import TextChooser, available_texts, parse_metadata

SKIP_REASONS = ("corrupt_tar", "corrupt_image", "missing_image", "missing_text", "bad_metadata")


@dataclass
class Source:
    shards: list[str]
    weight: float
    num_samples: int


def expand_urls(urls: str) -> list[str]:
    """'a/{000..009}.tar::b/x.tar' -> the list of shard URLs."""
    out: list[str] = []
    for part in urls.split("::"):
        part = part.strip()
        if part:
            out.extend(braceexpand.braceexpand(part))
    return out


def _sizes_json(folder: Path) -> dict[str, int]:
    sizes_file = folder / "sizes.json"
    if not sizes_file.is_file():
        return {}
    return {k: int(v) for k, v in json.loads(sizes_file.read_text()).items()}


def count_samples(shards: Sequence[str]) -> Optional[int]:
    """Samples in the shards from sizes.json (open_clip's convention) or img2dataset's per-shard *_stats.json;
    None if any shard's count is unknown."""
    total = 0
    folders: dict[Path, dict[str, int]] = {}
    for shard in shards:
        if "://" in shard or shard.startswith("pipe:"):
            return None
        path = Path(shard)
        if path.parent not in folders:
            folders[path.parent] = _sizes_json(path.parent)
        n = folders[path.parent].get(path.name)
        stats = path.parent / (path.name.split(".")[0] + "_stats.json")
        if n is None and stats.is_file():
            n = int(json.loads(stats.read_text())["successes"])
        if n is None:
            return None
        total += n
    return total


def resolve_sources(cfg: DataConfig) -> list[Source]:
    if not cfg.train:
        raise ConfigError("data.train is empty: give at least one source, e.g. data.train=[{urls: 'shards/{0000..0009}.tar'}]")
    sources = []
    for i, src in enumerate(cfg.train):
        src = src if isinstance(src, SourceConfig) else SourceConfig(**src)
        shards = expand_urls(src.urls)
        if not shards:
            raise ConfigError(f"data.train[{i}].urls expands to no shards: {src.urls!r}")
        local_missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not os.path.exists(s)]
        if local_missing:
            raise ConfigError(f"data.train[{i}]: {len(local_missing)} shard(s) not found, first: {local_missing[0]}")
        n = src.num_samples if src.num_samples is not None else count_samples(shards)
        if n is None:
            raise ConfigError(
                f"data.train[{i}]: sample count unknown; add sizes.json beside the shards or set data.train[{i}].num_samples"
            )
        sources.append(Source(shards, src.weight, n))
    return sources


def check_text_keys(sources: list[Source], keys: Sequence[str], probe: int = 32) -> None:
    """Fail before training when data.text_keys names no text the first shard holds (a typo such as 'syntext'
    would otherwise skip every sample as missing_text and end in 'shards ran dry')."""
    url = sources[0].shards[0]
    if "://" in url or url.startswith("pipe:"):
        return
    seen_keys: set[str] = set()
    read = 0
    for sample in tariterators.tarfile_samples(iter([{"url": url}]), handler=lambda exn: True):
        read += 1
        try:
            meta = parse_metadata(sample.get("json"))
        except (ValueError, UnicodeDecodeError):
            meta = None
        txt = sample["txt"].decode("utf-8", "replace") if isinstance(sample.get("txt"), bytes) else None
        if available_texts(txt, meta, keys):
            return
        seen_keys.update(["text1"] if txt else [])
        if meta:
            seen_keys.update(k for k, v in meta.items() if isinstance(v, str))
            if isinstance(meta.get("text"), dict):
                seen_keys.update(meta["text"])
        if read >= probe:
            break
    if read:
        raise ConfigError(f"data.text_keys={list(keys)} matches no text in the first {read} sample(s) of {url}; "
                          f"texts there: {', '.join(sorted(seen_keys)) or 'none'}")


class SkipStats(Counter):
    """Skips by reason, each bad sample counted once: a worker that wraps around its shards (or draws a shard
    again) reads the same bad samples again."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def bad(self, reason: str, key: str) -> None:
        if (reason, key) not in self.seen:
            self.seen.add((reason, key))
            self[reason] += 1


class _SkipCounter:
    """webdataset error handler that counts instead of raising: a truncated or unreadable tar is skipped."""

    def __init__(self, stats: SkipStats):
        self.stats = stats

    def __call__(self, exn: Exception) -> bool:
        self.stats.bad("corrupt_tar", repr(exn))
        return True


def image_header_ok(raw: bytes) -> bool:
    """Whether PIL recognises the image from its header (reads a few bytes, decodes nothing)."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return img.size[0] > 0 and img.size[1] > 0
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return False


def decode_image(raw: bytes) -> Image.Image:
    with Image.open(io.BytesIO(raw)) as img:
        return img.convert("RGB")


class ClipShardDataset(IterableDataset):
    """Yields ready batches: {"image": [B,3,H,W], "text": [B,L], "key": [B], "skipped": {reason: n}}."""

    def __init__(
        self,
        sources: list[Source],
        transform: Callable,
        tokenizer: Callable,
        chooser: TextChooser,
        batch_size: int,
        batches_per_worker: int,
        rank: int,
        world_size: int,
        resampled: bool,
        shuffle_buffer: int,
        seed: int,
        image_keys: Sequence[str],
    ):
        self.sources = sources
        self.transform = transform
        self.tokenizer = tokenizer
        self.chooser = chooser
        self.batch_size = batch_size
        self.batches_per_worker = batches_per_worker
        self.rank = rank
        self.world_size = world_size
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.image_keys = tuple(image_keys)
        self.epoch = 0
        self.skip_batches = 0  # batches this worker pool already delivered this epoch (mid-epoch resume)

    # -- shard assignment -------------------------------------------------------------------------------------
    def _passes(self, worker: int, num_workers: int, rng: random.Random) -> Iterator[Iterator[str]]:
        """Shard streams, one per pass over this worker's data. Non-resampled workers wrap around (the epoch
        ends by batch count, not by exhaustion); each pass is shuffled on its own so no sample repeats within one."""
        if self.resampled:
            shards = [s for src in self.sources for s in src.shards]
            # open_clip's upsampling factors: the weight is per shard, so a source with more shards (more data) is
            # drawn more often; weight 2 doubles a source's share relative to its size.
            weights = [src.weight for src in self.sources for _ in src.shards]
            yield (rng.choices(shards, weights=weights, k=1)[0] for _ in iter(int, 1))
            return
        shards = [s for src in self.sources for s in src.shards]
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)  # same order on every rank
        mine = shards[self.rank :: self.world_size][worker::num_workers]
        if not mine:
            check_shard_split(len(shards), self.world_size, num_workers, resampled=False)
        while True:
            yield iter(mine)

    # -- samples ------------------------------------------------------------------------------------------------
    def _stream(self, worker: int, num_workers: int, shard_rng: random.Random, sample_rng: random.Random,
                stats: SkipStats) -> Iterator[tuple[str, Any, str]]:
        for shards in self._passes(worker, num_workers, shard_rng):
            got = 0
            for item in self._shuffled(self._samples(shards, stats, sample_rng), sample_rng):
                got += 1
                yield item
            if got == 0:  # a whole pass without one usable sample: stop instead of cycling forever
                return

    def _samples(self, urls: Iterator[str], stats: SkipStats, rng: random.Random) -> Iterator[tuple[str, Any, str]]:
        handler = _SkipCounter(stats)
        barren = 0  # resampled streams never end: give up after many consecutive unusable shards
        for url in urls:
            got = 0
            for sample in tariterators.tarfile_samples(iter([{"url": url}]), handler=handler):
                item = self._prepare(sample, stats, rng)
                if item is not None:
                    got += 1
                    yield item
            barren = 0 if got else barren + 1
            if barren >= 1000:
                return

    def _prepare(self, sample: dict, stats: SkipStats, rng: random.Random) -> Optional[tuple[str, Any, str]]:
        key = f"{sample.get('__url__', '')}/{sample.get('__key__', '')}"
        raw_image = next((sample[k] for k in self.image_keys if k in sample), None)
        if raw_image is None:
            stats.bad("missing_image", key)
            return None
        try:
            meta = parse_metadata(sample.get("json"))
        except (ValueError, UnicodeDecodeError):
            meta = None
            stats.bad("bad_metadata", key)  # counted, but the sample may still train on its .txt
        txt = None
        if "txt" in sample:
            try:
                txt = sample["txt"].decode("utf-8")
            except UnicodeDecodeError:
                txt = None
        text = self.chooser.choose(available_texts(txt, meta, self.chooser.keys), rng)
        if text is None:
            stats.bad("missing_text", key)
            return None
        if not image_header_ok(raw_image):
            stats.bad("corrupt_image", key)
            return None
        # The raw bytes go through the shuffle buffer (as open_clip's pipeline buffers undecoded samples); decoding
        # and augmentation happen per batch, so the buffer holds KB-sized JPEGs rather than decoded float images.
        return key, raw_image, text

    def _decode(self, raw_image: bytes, key: str, stats: SkipStats) -> Optional[torch.Tensor]:
        try:
            return self.transform(decode_image(raw_image))
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            stats.bad("corrupt_image", key)
            return None

    def _shuffled(self, items: Iterator, rng: random.Random) -> Iterator:
        if self.shuffle_buffer <= 1:
            yield from items
            return
        buf: list = []
        for item in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            i = rng.randrange(len(buf))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Global batch g is batch g // W of stream g % W. DataLoader takes batches from its workers in turn starting
        # with worker 0, so after a resume that skipped n batches worker w plays stream (w + n) % W, which makes the
        # next batch n, then n + 1, ... as in the uninterrupted epoch.
        worker = (loader_worker + self.skip_batches) % num_workers
        skip_local = (loader_worker + self.skip_batches) // num_workers
        stream_seed = hash((self.seed, self.epoch, self.rank, worker)) & 0xFFFFFFFF
        shard_rng, sample_rng = random.Random(stream_seed), random.Random(stream_seed + 1)
        stats = SkipStats()
        items = self._stream(worker, num_workers, shard_rng, sample_rng, stats)
        reported: Counter = Counter()
        for index in range(self.batches_per_worker):
            skipping = index < skip_local
            # Augmentations draw from torch's global RNG: seed it per (epoch, rank, worker, batch) so a resumed run
            # sees the same crops as an uninterrupted one without augmenting the batches it skips (DataLoader's own
            # worker seeds depend on the main process's history).
            torch.manual_seed(hash((stream_seed, index)) & 0xFFFFFFFF)
            chunk = []
            for key, raw_image, text in items:
                # Mid-epoch resume skips already-trained batches at the tar-member level: no decode, no augment.
                # (An image whose header reads but whose body does not is found only by decoding; such an image
                # in the skipped part shifts the resumed stream by one sample.)
                image = None if skipping else self._decode(raw_image, key, stats)
                if image is None and not skipping:
                    continue
                chunk.append((key, image, text))
                if len(chunk) == self.batch_size:
                    break
            if len(chunk) < self.batch_size:
                raise RuntimeError(
                    f"rank {self.rank} worker {worker}: shards ran dry after {index} batches "
                    f"(skipped so far: {dict(self._public(stats))}); check the shards"
                )
            if index < skip_local:
                continue
            current = self._public(stats)
            delta = {r: current[r] - reported[r] for r in SKIP_REASONS}
            reported = current
            keys, images, texts = zip(*chunk)
            yield {
                "image": torch.stack(images),
                "text": self.tokenizer(list(texts)),
                "key": list(keys),
                "skipped": delta,
            }

    @staticmethod
    def _public(stats: Counter) -> Counter:
        return Counter({r: stats[r] for r in SKIP_REASONS})


class ShardLoader(DataLoader):
    """A DataLoader with a known length whose dataset learns the epoch when iterated. After a restore it starts
    where the checkpoint left off: the saved epoch, minus the batches already trained on."""

    def __init__(self, dataset: ClipShardDataset, workers: int, length: int, epoch_fn: Callable[[], int],
                 resume: Optional[dict] = None):
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if workers > 0 else None,
        )
        self._length = length
        self._epoch_fn = epoch_fn
        self.resume = resume

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        epoch, skip = self._epoch_fn(), 0
        if self.resume:
            # Lightning may build the first iterator before it restores the epoch counter, so trust the checkpoint.
            done, epoch = int(self.resume["batches_done"]), int(self.resume["epoch"])
            if done >= self._length:
                epoch += 1
            else:
                skip = done
            self.resume = None
        self.dataset.epoch = epoch
        self.dataset.skip_batches = skip
        return super().__iter__()


def check_shard_split(num_shards: int, world_size: int, workers: int, resampled: bool) -> None:
    """Without resampling every worker of every rank needs a shard of its own."""
    if not resampled and num_shards < world_size * max(1, workers):
        raise ConfigError(
            f"{num_shards} shard(s) cannot feed {world_size} rank(s) x {max(1, workers)} worker(s) without "
            "resampling: use more shards, fewer data.workers, or data.resampled=true"
        )


def plan_batches(num_samples: int, world_size: int, workers: int, batch_size: int) -> int:
    """Batches each worker yields per epoch (every worker, every rank the same)."""
    per_worker = num_samples // (world_size * max(1, workers) * batch_size)
    if per_worker < 1:
        raise ConfigError(
            f"{num_samples} samples cannot make one batch of {batch_size} for each of "
            f"{world_size} rank(s) x {max(1, workers)} worker(s); lower data.batch_size or data.workers"
        )
    return per_worker
