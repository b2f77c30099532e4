"""Evaluation datasets: clip-benchmark's `wds/` layout and its torchvision-backed builders, split across ranks
without padding.

Ranks get whole batches of clip-benchmark's own batching (`rank_loader`), and every sample carries a key that sorts
into clip-benchmark's sample order, so features gathered from all ranks are bit for bit and in the order of a
`clip_benchmark eval` run with the same --num_workers and --batch_size: a DDP run sees exactly the samples a single
process sees, each once, and score ties break as in clip-benchmark.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from realsyn_pl.data.shards import describe, tar_samples
from realsyn_pl.evaluation.config import EvalDataset
from realsyn_pl.evaluation.suites import classnames_file, read_classnames

IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")  # clip-benchmark's wds reader accepts these, in this order
SYNTHETIC_KEYS = ("shapes", "shapes_captions")  # written by realsyn_pl.evaluation.synthetic


class DatasetMissing(Exception):
    """A dataset that is not on disk; the message is one line naming the path and how to prepare it."""


@dataclass
class EvalData:
    dataset: Any  # map-style or iterable torch dataset yielding (image, target) / (image, [captions])
    kind: str  # classification | multilabel | retrieval
    classes: Optional[list[str]]
    templates: Optional[list[str]]
    wds_urls: Optional[list[str]] = None
    num_samples: Optional[int] = None
    classes_source: str = "the dataset"  # where `classes` came from: the dataset, or the list its entry names


def dataset_name(entry: EvalDataset) -> str:
    return entry.dataset or f"wds/{entry.key}"


def resolve_root(entry: EvalDataset, template: str) -> str:
    if entry.root:
        return entry.root
    short = dataset_name(entry).replace("wds/", "", 1)
    return template.format(dataset=short, dataset_cleaned=short.replace("/", "-"), key=entry.key)


def prepare_hint(entry: EvalDataset, root: str) -> str:
    name = dataset_name(entry)
    if entry.key in SYNTHETIC_KEYS:
        return f"generate it with: python -m realsyn_pl.evaluation.synthetic {Path(root).parent}"
    if name.startswith("wds/"):
        short = name[4:]
        return (f"put clip-benchmark's wds layout there (<split>/nshards.txt, <split>/N.tar, classnames.txt, "
                f"zeroshot_classification_templates.txt): clip_benchmark_export_wds --dataset {short} --split "
                f"{entry.split} --output {root}, or the clip-benchmark/wds_{short.replace('/', '-')} dataset from "
                f"the Hugging Face hub")
    return (f"put the torchvision layout of {name} there (with network access: clip_benchmark eval --dataset {name} "
            f"--dataset_root {root} downloads it)")


def _missing(entry: EvalDataset, root: str, what: str) -> DatasetMissing:
    return DatasetMissing(f"{entry.key}: {what}; {prepare_hint(entry, root)}")


def check_present(entry: EvalDataset, root: str, split: str) -> None:
    """Raise DatasetMissing unless the files the builder needs exist (so nothing tries to download)."""
    name = dataset_name(entry)
    if not os.path.isdir(root):
        raise _missing(entry, root, f"no dataset folder {root}")
    if name.startswith("wds/"):
        nshards = os.path.join(root, split, "nshards.txt")
        if not os.path.isfile(nshards):
            raise _missing(entry, root, f"no split '{split}' ({nshards} not found)")
        return
    annotation = entry.annotation_file
    if name == "flickr30k" and not annotation:
        annotation = os.path.join(root, f"flickr30k_{split}_karpathy.txt")
    if name == "mscoco_captions" and not annotation:
        annotation = os.path.join(root, f"coco_{split}_karpathy.json")
    if annotation and not os.path.isfile(annotation):
        raise _missing(entry, root, f"annotation file {annotation} not found")


def build(entry: EvalDataset, root: str, split: str, transform: Callable, task: str, language: str = "en") -> EvalData:
    """The dataset through clip-benchmark's builder (class names, templates, subsets exactly as it defines them)."""
    from clip_benchmark.datasets.builder import build_dataset

    check_present(entry, root, split)
    name = dataset_name(entry)
    builder_task = "zeroshot_classification" if task == "linear_probe" else task
    listed = named_classnames(entry, root) if task != "zeroshot_retrieval" else None
    try:
        with tempfile.TemporaryDirectory() if listed is not None else contextlib.nullcontext() as tmp:
            custom = None
            if tmp is not None:  # clip-benchmark's --custom_classname_file, keyed by the dataset's name
                custom = os.path.join(tmp, "classnames.json")
                with open(custom, "w") as f:
                    json.dump({name: read_classnames(listed)}, f)
            ds = build_dataset(dataset_name=name, root=root, transform=transform, split=split, download=False,
                               annotation_file=entry.annotation_file or None, language=language, task=builder_task,
                               custom_classname_file=custom)
    except (RuntimeError, FileNotFoundError, OSError) as err:  # torchvision: "Dataset not found or corrupted"
        raise _missing(entry, root, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__) from None
    except AssertionError as err:
        raise ValueError(f"{entry.key}: {err}") from None
    classes = getattr(ds, "classes", None)
    source = str(listed) if listed is not None else "the dataset"
    templates = getattr(ds, "templates", None)
    if name.startswith("wds/"):
        kind = _read_text(os.path.join(root, "dataset_type.txt"), "classification")
        nshards = int(_read_text(os.path.join(root, split, "nshards.txt"), "0"))
        urls = [os.path.join(root, split, f"{i}.tar") for i in range(nshards)]
        absent = [u for u in urls if not os.path.isfile(u)]
        if absent:
            raise _missing(entry, root, f"shard {absent[0]} not found ({len(absent)} of {nshards} missing)")
        return EvalData(WdsSource(urls, transform, kind), kind, classes, templates, wds_urls=urls,
                        classes_source=source)
    kind = "retrieval" if task == "zeroshot_retrieval" else "classification"
    return EvalData(ds, kind, classes, templates, num_samples=len(ds), classes_source=source)


def named_classnames(entry: EvalDataset, root: str) -> Optional[Path]:
    """The list the entry's `classnames` names, for a wds dataset without its own classnames.txt; else None (the
    dataset's own names, written with its labels, are the ones that match them)."""
    if not entry.classnames or not dataset_name(entry).startswith("wds/"):
        return None
    if os.path.isfile(os.path.join(root, "classnames.txt")):
        return None
    return classnames_file(entry)


def check_labels(data: EvalData, key: str, split: str, targets: torch.Tensor) -> None:
    """A classification split's labels must each have a class name (0 .. len(classes) - 1)."""
    if data.kind != "classification" or not data.classes or targets.ndim != 1 or not len(targets):
        return
    top = int(targets.max())
    if top >= len(data.classes) or int(targets.min()) < 0:
        raise ValueError(f"{key}: {len(data.classes)} class names ({data.classes_source}) but the {split} split has "
                         f"labels {int(targets.min())}..{top}; the list must name every label, line i = label i")


def _read_text(path: str, default: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip().lower()
    except FileNotFoundError:
        return default


def decode_member(ext: str, data: bytes) -> Any:
    """One member of a wds sample decoded by its extension, as clip-benchmark's reader decodes the ones it uses,
    with these handlers only: webdataset's defaults would also unpickle .pyd/.pickle, torch.load .pth and inflate
    .gz members, i.e. run code from or expand a shard. Any other extension stays bytes."""
    if ext in IMAGE_KEYS:
        with io.BytesIO(data) as stream:
            img = Image.open(stream)
            img.load()
            return img.convert("RGB")
    if ext == "cls":
        return int(data)
    if ext == "txt":
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    if ext == "npy":
        import numpy.lib.format

        return numpy.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    return data


def _refuse(reason: str, name: str, detail: str) -> None:
    """Evaluation reads every sample of clip-benchmark's order: a shard it cannot read fully is an error."""
    raise ValueError(f"{name}: {reason.replace('_', ' ')} ({detail})")


class WdsSource:
    """clip-benchmark's wds reading (same keys, same images, shards in order) as a plain record stream; only the
    members a sample is evaluated on are decoded (decode_member)."""

    def __init__(self, urls: list[str], transform: Callable, kind: str):
        self.urls, self.transform, self.kind = urls, transform, kind

    def raw(self, urls: Optional[list[str]] = None) -> Iterator[dict]:
        for url in self.urls if urls is None else urls:
            yield from tar_samples(url, _refuse)

    def decode(self, sample: dict) -> tuple[Any, Any]:
        name = f"sample {sample.get('__key__')} in {sample.get('__url__')}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(f"{name} has no image ({IMAGE_KEYS})")
        target_key = {"retrieval": "txt", "multilabel": "npy"}.get(self.kind, "cls")
        if target_key not in sample:
            raise ValueError(f"{name} has no .{target_key} member")
        image = self._member(name, image_key, sample)
        image = self.transform(image) if self.transform else image
        target = self._member(name, target_key, sample)
        return image, target.splitlines() if self.kind == "retrieval" else target

    @staticmethod
    def _member(name: str, ext: str, sample: dict) -> Any:
        try:
            return decode_member(ext, sample[ext])
        except Exception as err:  # noqa: BLE001 - one line naming the sample, whatever the decoder raised
            raise ValueError(f"{name}: cannot decode its .{ext} ({describe(err)})") from None


def slot_work(slots: int, slot: int, streams: int) -> list[tuple[int, int, int]]:
    """What (rank, worker) slot `slot` of `slots` reads: (stream, share, shares) triples, i.e. batches b of `stream`
    with b % shares == share. Slots < streams: whole streams, round robin. Otherwise each stream's batches are dealt
    round robin among the slots that share it. Every batch of every stream is read by exactly one slot."""
    if slots <= streams:
        return [(s, 0, 1) for s in range(slot, streams, slots)]
    stream = slot % streams
    sharing = [k for k in range(slots) if k % streams == stream]
    return [(stream, sharing.index(slot), len(sharing))]


class CbBatches(IterableDataset):
    """clip-benchmark's exact batches, each computed whole by one (rank, worker) slot.

    `clip_benchmark eval --num_workers W` reads a wds split as W streams (worker w: shards w, w+W, ..., in order),
    batches each stream by batch_size, and its DataLoader hands the batches out round robin over the workers (batch 0
    of every stream, then batch 1, ...). Here `streams` = W (1 for W = 0) and every sample carries the key
    (batch * streams + stream) * batch_size + position, so sorting by key is clip-benchmark's sample order and the
    batches (hence the features, bit for bit) are its own, for any number of ranks and loader workers. A slot reads
    only the shards of its streams and decodes only the samples of its own batches.
    """

    def __init__(self, source: WdsSource, rank: int, world_size: int, streams: int, batch_size: int):
        self.source, self.rank, self.world_size = source, rank, world_size
        self.streams, self.batch_size = max(1, streams), batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        size, streams = self.batch_size, self.streams
        for stream, share, shares in slot_work(slots, slot, streams):
            urls = self.source.urls[stream::streams]
            if not urls:
                continue
            pending: list[tuple[int, Any, Any]] = []
            for pos, sample in enumerate(self.source.raw(urls)):
                batch, j = divmod(pos, size)
                if batch % shares != share:
                    continue  # another slot's batch: skipped before decoding
                image, target = self.source.decode(sample)
                pending.append(((batch * streams + stream) * size + j, image, target))
                if j == size - 1:
                    yield collate(pending)
                    pending = []
            if pending:
                yield collate(pending)


class Indexed(Dataset):
    """A map-style dataset whose items carry their index."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, j: int) -> tuple[int, Any, Any]:
        image, target = self.dataset[j]
        return j, image, target


def rank_batches(num_samples: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """clip-benchmark's batches of a map-style dataset (consecutive, dataset order), dealt round robin to ranks."""
    chunks = range(0, num_samples, batch_size)
    return [list(range(c, min(c + batch_size, num_samples))) for i, c in enumerate(chunks) if i % world_size == rank]


def collate(batch: list[tuple[int, Any, Any]]) -> dict[str, Any]:
    idx = torch.tensor([b[0] for b in batch], dtype=torch.long)
    images = torch.stack([b[1] for b in batch])
    targets = [b[2] for b in batch]
    if targets and isinstance(targets[0], (list, tuple)):  # retrieval: a list of captions per image
        return {"idx": idx, "image": images, "texts": [list(t) for t in targets]}
    return {"idx": idx, "image": images, "target": torch.as_tensor(_stack_targets(targets))}


def _stack_targets(targets: list[Any]) -> Any:
    if targets and hasattr(targets[0], "shape") and getattr(targets[0], "shape", ()) != ():
        import numpy as np

        return np.stack(targets)  # multilabel
    return [int(t) for t in targets]


def rank_loader(data: EvalData, rank: int, world_size: int, batch_size: int, workers: int) -> DataLoader:
    """This rank's share of clip-benchmark's batches (`workers` = its --num_workers, which fixes them for wds data).

    Sample keys ("idx") sort into clip-benchmark's order; key // batch_size numbers the batches in that order."""
    if isinstance(data.dataset, WdsSource):
        ds = CbBatches(data.dataset, rank, world_size, workers, batch_size)
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=False)
    batches = rank_batches(len(data.dataset), rank, world_size, batch_size)
    return DataLoader(Indexed(data.dataset), batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      persistent_workers=False)
