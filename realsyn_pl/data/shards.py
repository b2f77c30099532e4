"""Webdataset shards (released RealSyn layout or plain image-caption) -> batches of (image, tokens) for CLIP.

Epoch semantics (the part that keeps DDP from hanging): every rank yields exactly `len(loader)` batches and every
worker exactly `batches_per_worker`. Non-resampled: shards are shuffled with (seed, epoch), dealt to ranks then to
workers; a worker that runs short (skipped samples, uneven shards) wraps around its own shards, and whatever does not
fill a whole batch is left for the next epoch's shuffle (as drop_last). Resampled: each worker draws shards with
replacement (each shard weighted by its source's upsampling factor, as open_clip does) for a virtual epoch of `num_samples`.
"""
from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import logging
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen, tariterators

from realsyn_pl.config import ConfigError, DataConfig, SourceConfig
from realsyn_pl.data.texts import TextChooser, available_texts, parse_metadata
from realsyn_pl.data.worker_signals import shield_worker

SKIP_REASONS = ("corrupt_tar", "corrupt_image", "missing_image", "missing_text", "bad_metadata", "too_many_pixels",
                "non_regular_member")
LOGGED_PER_REASON = 100  # skips a worker names in its log per reason; the batches' skipped_keys name them all
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's shard-level metadata members, not samples

log = logging.getLogger(__name__)
OnSkip = Callable[[str, str, str], None]  # (reason, shard or shard/member, detail)


@dataclass
class Source:
    shards: list[str]
    weight: float
    num_samples: int
    # Samples sizes.json (or *_stats.json) promises per shard, where known: a shard that delivers fewer is reported.
    promised: dict[str, int] = field(default_factory=dict)


class ShardsRanDry(ConfigError, RuntimeError):
    """The shards held fewer usable samples than the epoch needs. A ConfigError (one line, exit 2) that is still a
    RuntimeError for callers that caught the old type."""

    def line(self) -> str:
        """The message as one line, also when a DataLoader worker raised it: the main process then gets it wrapped
        in the worker's traceback, whose last line is `...ShardsRanDry: <message>`."""
        text = str(self.args[0]) if self.args else ""
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or [""]
        return last[0].split(f"{type(self).__name__}: ", 1)[-1]


GLOB_CHARS = ("*", "?", "[")


def expand_urls(urls: str, key: str = "data.train.urls") -> list[str]:
    """'a/{000..009}.tar::b/x.tar::c/*.tar' -> the list of shard URLs. A local path with a glob character expands to
    its matches, sorted (zero-padded names sort in shard order), once at start: a download's shard count is not
    guessed (img2dataset shards each input file on its own: 21 files of ~730k rows give 21 x 73 tars, not
    rows / 10,000), and a partial download with gaps works too. A glob matching nothing is an error naming `key`."""
    out: list[str] = []
    for part in urls.split("::"):
        part = part.strip()
        if not part:
            continue
        for url in braceexpand.braceexpand(part):
            if "://" in url or url.startswith("pipe:") or not any(c in url for c in GLOB_CHARS):
                out.append(url)
                continue
            hits = sorted(glob.glob(url))
            if not hits:
                raise ConfigError(f"{key}: nothing matches {url!r}")
            out.extend(hits)
    return out


def _sizes_json(folder: Path) -> dict[str, int]:
    sizes_file = folder / "sizes.json"
    if not sizes_file.is_file():
        return {}
    return {k: int(v) for k, v in json.loads(sizes_file.read_text()).items()}


def shard_sizes(shards: Sequence[str]) -> dict[str, int]:
    """Samples per shard from sizes.json (open_clip's convention) or img2dataset's per-shard *_stats.json, for the
    shards whose count is known."""
    sizes: dict[str, int] = {}
    folders: dict[Path, dict[str, int]] = {}
    for shard in shards:
        if "://" in shard or shard.startswith("pipe:"):
            continue
        path = Path(shard)
        if path.parent not in folders:
            folders[path.parent] = _sizes_json(path.parent)
        n = folders[path.parent].get(path.name)
        stats = path.parent / (path.name.split(".")[0] + "_stats.json")
        if n is None and stats.is_file():
            n = int(json.loads(stats.read_text())["successes"])
        if n is not None:
            sizes[shard] = n
    return sizes


def count_samples(shards: Sequence[str]) -> Optional[int]:
    """Samples in the shards (see shard_sizes); None if any shard's count is unknown."""
    sizes = shard_sizes(shards)
    return sum(sizes[s] for s in shards) if all(s in sizes for s in shards) else None


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
TABLE_SUFFIXES = {".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet", ".jsonl": "JSONL", ".json": "JSON",
                  ".txt": "text", ".arrow": "Arrow"}
# How to make shards from a user's own images + captions (a folder, or a table of them).
SHARDS_COMMAND = "python -m realsyn_pl shards input={} output_dir=<new folder>"


def _brace_pattern(folder: Path, names: list[str]) -> str:
    """`folder/{00000..00009}.tar` for consecutively numbered shards, else the first shard's path."""
    stems = sorted(n[: -len(".tar")] for n in names)
    width = len(stems[0])
    if all(s.isdigit() and len(s) == width for s in stems) and int(stems[-1]) - int(stems[0]) == len(stems) - 1:
        return f"{folder}/{{{stems[0]}..{stems[-1]}}}.tar" if len(stems) > 1 else f"{folder}/{stems[0]}.tar"
    return f"{folder}/*.tar (a glob: every .tar there, sorted)"


def check_shard_path(key: str, shard: str) -> None:
    """A local shard must be a tar: a folder or a table (the first things a new user points data.train at) would
    otherwise be counted as one corrupt shard each and end in 'shards ran dry'."""
    path = Path(shard)
    if path.is_dir():
        tars = sorted(p.name for p in path.glob("*.tar"))
        if tars:
            raise ConfigError(f"{key}: {shard} is a folder; point at the .tar shards inside, e.g. "
                              f"{_brace_pattern(path, tars)} ({len(tars)} .tar file(s) there)")
        raise ConfigError(f"{key}: {shard} is a folder without .tar shards; make shards from its images and "
                          f"captions with `{SHARDS_COMMAND.format(shard)}` and point {key} at them")
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        return
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is not None:
        raise ConfigError(f"{key}: {shard} is a {kind} file, not a webdataset .tar shard; make shards from it with "
                          f"`{SHARDS_COMMAND.format(shard)}` and point {key} at them")
    if path.is_file() and not tarfile.is_tarfile(path):
        raise ConfigError(f"{key}: {shard} is not a tar archive (webdataset shards are .tar files); make shards "
                          f"with `{SHARDS_COMMAND.format('<images + captions>')}`")


def resolve_sources(cfg: DataConfig) -> list[Source]:
    if cfg.max_pixels < 1:
        raise ConfigError(f"data.max_pixels must be a positive pixel count, got {cfg.max_pixels}")
    if not cfg.train:
        raise ConfigError("data.train is empty: give at least one source, e.g. data.train=[{urls: 'shards/{0000..0009}.tar'}]")
    sources = []
    for i, src in enumerate(cfg.train):
        src = src if isinstance(src, SourceConfig) else SourceConfig(**src)
        shards = expand_urls(src.urls, f"data.train[{i}].urls")
        if not shards:
            raise ConfigError(f"data.train[{i}].urls expands to no shards: {src.urls!r}")
        local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
        local_missing = [s for s in local if not os.path.exists(s)]
        if local_missing:
            raise ConfigError(f"data.train[{i}]: {len(local_missing)} shard(s) not found, first: {local_missing[0]}")
        for shard in local:
            check_shard_path(f"data.train[{i}].urls", shard)
        sizes = shard_sizes(shards)
        n = src.num_samples
        if n is None and all(s in sizes for s in shards):
            n = sum(sizes[s] for s in shards)
        if n is None:
            raise ConfigError(
                f"data.train[{i}]: sample count unknown; add sizes.json beside the shards or set data.train[{i}].num_samples"
            )
        sources.append(Source(shards, src.weight, n, sizes))
    return sources


def describe(err: BaseException) -> str:
    """An exception as one short line for a skip record."""
    text = str(err.args[0]) if err.args else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _member_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"symlink to {info.linkname}"
    if info.islnk():
        return f"hard link to {info.linkname}"
    return "device, fifo or other special file"


def _tar_entries(url: str, on_skip: OnSkip) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    """(header, bytes) of each member of one shard; a regular file's bytes only. An unreadable shard is reported
    and ends here: what follows a tar error cannot be trusted."""
    try:
        stream = gopen(url)
    except Exception as err:  # noqa: BLE001 - missing file, failing pipe: this shard's problem only
        on_skip("corrupt_tar", url, describe(err))
        return
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            member = tar.extractfile(info) if info.isreg() else None
            data = member.read() if member is not None else b""
            tar.members = []  # a streamed tar would otherwise keep every member's header
            yield info, data
    except Exception as err:  # noqa: BLE001 - truncated or not a tar at all
        on_skip("corrupt_tar", url, describe(err))
    finally:
        with contextlib.suppress(Exception):  # a pipe closed early reports its own SIGPIPE
            stream.close()


def _tar_members(url: str, on_skip: OnSkip) -> Iterator[dict[str, Any]]:
    """The regular members of one shard as webdataset's {fname, data, __url__} records, nothing decoded. Links and
    special files are reported (a sample whose image is a symlink would otherwise lose it unnoticed); directories
    hold no data."""
    for info, data in _tar_entries(url, on_skip):
        if info.isdir() or _META_MEMBER.match(info.name):
            continue
        if not info.isreg():
            on_skip("non_regular_member", f"{url}/{info.name}", _member_kind(info))
            continue
        yield {"fname": info.name, "data": data, "__url__": url}


def tar_samples(url: str, on_skip: OnSkip) -> Iterator[dict[str, Any]]:
    """One shard's samples ({"__key__", "__url__", ext: raw bytes}), members grouped by key as webdataset does.
    Nothing is decoded or inflated: readers decode the members they use, with handlers of their own."""

    def duplicate(err: Exception) -> bool:
        on_skip("corrupt_tar", url, describe(err))
        return True

    return tariterators.group_by_keys(_tar_members(url, on_skip), handler=duplicate)


def check_text_keys(sources: list[Source], keys: Sequence[str], probe: int = 32) -> None:
    """Fail before training when data.text_keys names no text the first shard holds (a typo such as 'syntext'
    would otherwise skip every sample as missing_text and end in 'shards ran dry')."""
    url = sources[0].shards[0]
    if "://" in url or url.startswith("pipe:"):
        return
    seen_keys: set[str] = set()
    read = 0
    for sample in tar_samples(url, lambda reason, name, detail: None):  # the loader counts bad samples itself
        read += 1
        try:
            meta = parse_metadata(sample.get("json"))
        except Exception:  # noqa: BLE001 - any bad .json (even one nested past the recursion limit) is skipped
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
    """Skips by reason, each bad sample counted once (a worker that wraps around its shards, or draws a shard
    again, reads the same bad samples again) and named: shard/key in the log (the first LOGGED_PER_REASON of each
    reason) and in `named` until the next batch hands them out."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()
        self.named: list[tuple[str, str]] = []
        self.short: dict[str, tuple[int, int]] = {}  # shard -> (samples delivered, samples promised)
        self.short_new: list[tuple[str, int, int]] = []

    def bad(self, reason: str, key: str, detail: str = "") -> None:
        if (reason, key) in self.seen:
            return
        self.seen.add((reason, key))
        self[reason] += 1
        self.named.append((reason, key))
        if self[reason] <= LOGGED_PER_REASON:
            log.warning("skipped %s (%s)%s", key, reason, f": {detail}" if detail else "")
        if self[reason] == LOGGED_PER_REASON:
            log.warning("further %s skips of this worker are counted and listed in the batches' skipped_keys, "
                        "not logged", reason)

    def take_named(self) -> list[tuple[str, str]]:
        named, self.named = self.named, []
        return named

    def delivered(self, shard: str, samples: int, promised: Optional[int]) -> None:
        """A shard read to its end (or to a tar error) held `samples`; fewer than sizes.json promised is reported
        once: the epoch is then filled by reading other shards again, which the skip counts alone do not show."""
        if promised is None or samples >= promised or shard in self.short:
            return
        self.short[shard] = (samples, promised)
        self.short_new.append((shard, samples, promised))
        log.warning("shard %s delivered %d of the %d samples sizes.json promised", shard, samples, promised)

    def take_short(self) -> list[tuple[str, int, int]]:
        short, self.short_new = self.short_new, []
        return short


def image_problem(raw: bytes, max_pixels: int) -> Optional[tuple[str, str]]:
    """(reason, detail) when the image must not be decoded, judged from its header alone (PIL reads the size
    without decoding a pixel); None when it may be."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
            with Image.open(io.BytesIO(raw)) as img:
                width, height = img.size
    except Image.DecompressionBombError as err:
        return "too_many_pixels", describe(err)
    except Exception as err:  # noqa: BLE001 - PIL's format plugins raise anything (a DDS: NotImplementedError)
        return "corrupt_image", describe(err)
    if width <= 0 or height <= 0:
        return "corrupt_image", f"size {width}x{height}"
    if width * height > max_pixels:
        return "too_many_pixels", f"{width}x{height} is over data.max_pixels={max_pixels}"
    return None


def decode_image(raw: bytes) -> Image.Image:
    with Image.open(io.BytesIO(raw)) as img:
        return img.convert("RGB")


class ClipShardDataset(IterableDataset):
    """Yields ready batches: {"image": [B,3,H,W], "text": [B,L], "key": [B], "skipped": {reason: n},
    "skipped_keys": [(reason, shard/key)] newly skipped, "stream": this worker's stream, "consumed": items of that
    stream consumed through this batch (skipped ones included: where a resume picks the stream up)}."""

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
        max_pixels: int = DataConfig.max_pixels,
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
        self.max_pixels = max_pixels
        self.promised = {url: n for src in sources for url, n in src.promised.items()}
        self.epoch = 0
        self.skip_batches = 0  # batches this worker pool already delivered this epoch (mid-epoch resume)
        # Items each stream consumed through those batches (from the checkpoint); None: batch_size per batch.
        self.resume_consumed: Optional[list[int]] = None

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
        barren = 0  # resampled streams never end: give up after many consecutive unusable shards
        for url in urls:
            got = read = 0
            for sample in tar_samples(url, stats.bad):
                read += 1
                item = self._prepare(sample, stats, rng)
                if item is not None:
                    got += 1
                    yield item
            stats.delivered(url, read, self.promised.get(url))  # reached only when the shard was read to its end
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
        except Exception as err:  # noqa: BLE001 - even a .json nested past the recursion limit is one sample's problem
            meta = None
            stats.bad("bad_metadata", key, describe(err))  # counted, but the sample may still train on its .txt
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
        problem = image_problem(raw_image, self.max_pixels)
        if problem is not None:
            stats.bad(problem[0], key, problem[1])
            return None
        # The raw bytes go through the shuffle buffer (as open_clip's pipeline buffers undecoded samples); decoding
        # and augmentation happen per batch, so the buffer holds KB-sized JPEGs rather than decoded float images.
        return key, raw_image, text

    def _decode(self, raw_image: bytes, key: str, stats: SkipStats) -> Optional[torch.Tensor]:
        try:
            return self.transform(decode_image(raw_image))
        except Exception as err:  # noqa: BLE001 - whatever one image's decode raises must not stop the run
            stats.bad("corrupt_image", key, describe(err))
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
        if info is not None:
            shield_worker()  # a stop signal is the main process's to handle (it saves a checkpoint first)
        # Global batch g is batch g // W of stream g % W. DataLoader takes batches from its workers in turn starting
        # with worker 0, so after a resume that skipped n batches worker w plays stream (w + n) % W, which makes the
        # next batch n, then n + 1, ... as in the uninterrupted epoch.
        worker = (loader_worker + self.skip_batches) % num_workers
        skip_local = (loader_worker + self.skip_batches) // num_workers
        stream_seed = hash((self.seed, self.epoch, self.rank, worker)) & 0xFFFFFFFF
        shard_rng, sample_rng = random.Random(stream_seed), random.Random(stream_seed + 1)
        stats = SkipStats()
        items = self._stream(worker, num_workers, shard_rng, sample_rng, stats)
        # Mid-epoch resume passes over what the trained batches consumed at the tar-member level: no decode, no
        # augment. The count includes the images that failed to decode then (found only by decoding), so the
        # stream picks up exactly where it stopped.
        consumed = skip_local * self.batch_size if self.resume_consumed is None else self.resume_consumed[worker]
        if sum(1 for _ in itertools.islice(items, consumed)) < consumed:
            raise self._ran_dry(worker, skip_local, stats)
        reported: Counter = Counter()
        for index in range(skip_local, self.batches_per_worker):
            # Augmentations draw from torch's global RNG: seed it per (epoch, rank, worker, batch) so a resumed run
            # sees the same crops as an uninterrupted one without augmenting the batches it skips (DataLoader's own
            # worker seeds depend on the main process's history).
            torch.manual_seed(hash((stream_seed, index)) & 0xFFFFFFFF)
            chunk = []
            for key, raw_image, text in items:
                consumed += 1
                image = self._decode(raw_image, key, stats)
                if image is None:
                    continue
                chunk.append((key, image, text))
                if len(chunk) == self.batch_size:
                    break
            if len(chunk) < self.batch_size:
                raise self._ran_dry(worker, index, stats)
            current = self._public(stats)
            delta = {r: current[r] - reported[r] for r in SKIP_REASONS}
            reported = current
            keys, images, texts = zip(*chunk)
            yield {
                "image": torch.stack(images),
                "text": self.tokenizer(list(texts)),
                "key": list(keys),
                "skipped": delta,
                "skipped_keys": stats.take_named(),
                "short_shards": stats.take_short(),
                "stream": worker,
                "consumed": consumed,
            }

    def _ran_dry(self, worker: int, batches: int, stats: SkipStats) -> ShardsRanDry:
        skipped = {r: n for r, n in self._public(stats).items() if n}
        broken = sorted(key for reason, key in stats.seen if reason == "corrupt_tar")
        short = [f"{url} ({got} of {promised})" for url, (got, promised) in sorted(stats.short.items())]
        return ShardsRanDry(
            f"rank {self.rank} worker {worker}: shards ran dry after {batches} of {self.batches_per_worker} batches "
            f"(skipped so far: {skipped or 'nothing'}"
            + (f"; unreadable shards: {', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}" if broken else "")
            + (f"; shards short of sizes.json: {', '.join(short[:5])}{' ...' if len(short) > 5 else ''}" if short else "")
            + "): the shards hold fewer usable samples than the epoch needs (data.num_samples or sizes.json); "
            "fix or drop the bad shards, or lower data.num_samples"
        )

    @staticmethod
    def _public(stats: Counter) -> Counter:
        return Counter({r: stats[r] for r in SKIP_REASONS})


class ShardLoader(DataLoader):
    """A DataLoader with a known length whose dataset learns the epoch when iterated. After a restore it starts
    where the checkpoint left off: the saved epoch, minus the batches already trained on, each stream (loader
    worker) after the items it had consumed (`positions`, saved per rank as resume["consumed"])."""

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
        self._streams = max(1, workers)
        self._first = 0  # epoch index of the first batch the current iterator yields
        self._start: list[int] = [0] * self._streams  # per stream: items consumed before that batch
        self._consumed: list[int] = []  # per yielded batch: its stream's items consumed through it

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        epoch, skip, consumed = self._epoch_fn(), 0, None
        if self.resume:
            # Lightning may build the first iterator before it restores the epoch counter, so trust the checkpoint.
            done, epoch = int(self.resume["batches_done"]), int(self.resume["epoch"])
            if done >= self._length:
                epoch += 1
            else:
                skip, consumed = done, self._rank_positions(self.resume.get("consumed"))
            self.resume = None
        self.dataset.epoch = epoch
        self.dataset.skip_batches = skip
        self.dataset.resume_consumed = consumed
        self._first, self._consumed = skip, []
        self._start = consumed or [self._batches_of(s, skip) * self.dataset.batch_size for s in range(self._streams)]
        return self._track(super().__iter__())

    def _track(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            self._consumed.append(int(batch["consumed"]))
            yield batch

    def _batches_of(self, stream: int, done: int) -> int:
        """Batches of `stream` among the epoch's first `done` (batch g belongs to stream g % streams)."""
        return max(0, done - stream + self._streams - 1) // self._streams

    def _rank_positions(self, saved: Any) -> Optional[list[int]]:
        """This rank's row of a checkpoint's per-rank, per-stream positions; None when the checkpoint has none or
        was written with another rank or worker layout (then each trained batch counts batch_size items)."""
        if not isinstance(saved, (list, tuple)) or len(saved) != self.dataset.world_size:
            return None
        row = saved[self.dataset.rank]
        if not isinstance(row, (list, tuple)) or len(row) != self._streams:
            return None
        return [int(n) for n in row]

    def positions(self, batches_done: int) -> list[int]:
        """Items each stream had consumed once the epoch's first `batches_done` batches were trained: what a
        checkpoint taken then saves for the resume."""
        out = []
        for stream in range(self._streams):
            n = self._batches_of(stream, batches_done)
            last = (n - 1) * self._streams + stream  # the stream's last batch among them
            if n == 0:
                out.append(0)
            elif last < self._first:
                out.append(self._start[stream])
            elif last - self._first < len(self._consumed):
                out.append(self._consumed[last - self._first])
            else:  # not yielded by this iterator (no checkpoint asks for that): the batch-count estimate
                out.append(n * self.dataset.batch_size)
        return out


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
