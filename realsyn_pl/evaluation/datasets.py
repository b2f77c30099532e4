"""Evaluation datasets: clip-benchmark's `wds/` layout and its torchvision-backed builders, split across ranks
without padding.

Every sample carries its index in the full dataset, so features gathered from all ranks can be put back in
dataset order: a DDP run sees exactly the samples a single process sees, each once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from realsyn_pl.evaluation.config import EvalDataset

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
    try:
        ds = build_dataset(dataset_name=name, root=root, transform=transform, split=split, download=False,
                           annotation_file=entry.annotation_file or None, language=language, task=builder_task)
    except (RuntimeError, FileNotFoundError, OSError) as err:  # torchvision: "Dataset not found or corrupted"
        raise _missing(entry, root, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    except AssertionError as err:
        raise ValueError(f"{entry.key}: {err}") from None
    classes = getattr(ds, "classes", None)
    templates = getattr(ds, "templates", None)
    if name.startswith("wds/"):
        kind = _read_text(os.path.join(root, "dataset_type.txt"), "classification")
        nshards = int(_read_text(os.path.join(root, split, "nshards.txt"), "0"))
        urls = [os.path.join(root, split, f"{i}.tar") for i in range(nshards)]
        absent = [u for u in urls if not os.path.isfile(u)]
        if absent:
            raise _missing(entry, root, f"shard {absent[0]} not found ({len(absent)} of {nshards} missing)")
        return EvalData(WdsSource(urls, transform, kind), kind, classes, templates, wds_urls=urls)
    kind = "retrieval" if task == "zeroshot_retrieval" else "classification"
    return EvalData(ds, kind, classes, templates, num_samples=len(ds))


def _read_text(path: str, default: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip().lower()
    except FileNotFoundError:
        return default


class WdsSource:
    """clip-benchmark's wds reading (same decoder, same keys, shards in order) as a plain record stream."""

    def __init__(self, urls: list[str], transform: Callable, kind: str):
        self.urls, self.transform, self.kind = urls, transform, kind

    def raw(self) -> Iterator[dict]:
        import webdataset as wds

        return iter(wds.DataPipeline(wds.SimpleShardList(self.urls), wds.tarfile_to_samples()))

    def decode(self, sample: dict) -> tuple[Any, Any]:
        import webdataset as wds

        decoder = wds.autodecode.Decoder([wds.autodecode.ImageHandler("pil", extensions=list(IMAGE_KEYS))])
        sample = decoder(sample)
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image ({IMAGE_KEYS})")
        image = self.transform(sample[image_key]) if self.transform else sample[image_key]
        if self.kind == "retrieval":
            return image, sample["txt"].splitlines()
        label = sample["npy" if self.kind == "multilabel" else "cls"]
        return image, label


class RankShardedWds(IterableDataset):
    """Sample i goes to (rank, worker) slot i % (world * workers): every sample read once across all processes."""

    def __init__(self, source: WdsSource, rank: int, world_size: int):
        self.source, self.rank, self.world_size = source, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, Any, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stride, slot = self.world_size * workers, self.rank * workers + worker
        for i, sample in enumerate(self.source.raw()):
            if i % stride == slot:  # skip before decoding: other slots' images are never decoded here
                image, target = self.source.decode(sample)
                yield i, image, target


class RankSlice(Dataset):
    """Indices rank, rank + world, ... of a map-style dataset (no padding, unlike DistributedSampler)."""

    def __init__(self, dataset: Any, rank: int, world_size: int):
        self.dataset, self.indices = dataset, range(rank, len(dataset), world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Any, Any]:
        j = self.indices[i]
        image, target = self.dataset[j]
        return j, image, target


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
    if isinstance(data.dataset, WdsSource):
        ds: Any = RankShardedWds(data.dataset, rank, world_size)
    else:
        ds = RankSlice(data.dataset, rank, world_size)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      persistent_workers=False)
