"""The evaluation machinery behind `realsyn_pl eval` (imported by `run.run_eval` once the CPU runtime is set up).

Image features come from a Lightning predict loop over each rank's share of clip-benchmark's batches (no padding),
gathered back in clip-benchmark's sample order on every rank, so metrics are identical for any number of processes
and equal clip-benchmark's own. Metrics are clip-benchmark's. One process on one device runs the same step in a
plain loop instead (`plain_device`): the numbers are the same, and the process skips Lightning's import (~1.5 s,
mostly torchmetrics), which is most of what separated `realsyn_pl eval` from `clip_benchmark eval` on small sets.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from realsyn_pl.config import ConfigError
from realsyn_pl.evaluation import datasets as D
from realsyn_pl.evaluation import linear_probe, retrieval, zeroshot
from realsyn_pl.evaluation.cache import FeatureCache, weights_fingerprint
from realsyn_pl.evaluation.config import EvalConfig, EvalDataset
from realsyn_pl.evaluation.features import encode_batch, gather
from realsyn_pl.evaluation.progress import EvalProgress, length
from realsyn_pl.evaluation.report import TaskResult
from realsyn_pl.evaluation.suites import templates_for
from realsyn_pl.models.factory import NotWeightsOnly

if TYPE_CHECKING:
    import lightning as L

Extractor = Callable[["torch.utils.data.DataLoader"], list]


class Runner:
    """Evaluates (dataset, task) pairs for one model; `extract` runs the encoder over a rank's loader."""

    def __init__(self, cfg: EvalConfig, model: torch.nn.Module, tokenizer: Callable, transform: Callable,
                 extract: Extractor, rank: int, world_size: int, device: torch.device, amp: bool):
        self.cfg, self.model, self.tokenizer, self.transform = cfg, model, tokenizer, transform
        self.extract, self.rank, self.world_size, self.device, self.amp = extract, rank, world_size, device, amp
        self._cache: Optional[FeatureCache] = None
        self.progress = EvalProgress(cfg.progress_bar, cfg.progress_s, rank)

    def root(self, entry: EvalDataset) -> str:
        return D.resolve_root(entry, self.cfg.dataset_root)

    def features(self, entry: EvalDataset, split: str, task: str) -> tuple[D.EvalData, dict]:
        # Every step that can fail on one rank only (files, decoding) runs before the collectives of `gather`, and
        # the ranks agree on its outcome first: a dataset fails on all ranks or on none, and the collectives of the
        # next dataset pair up with each other, never with a rank still inside this one.
        try:
            data = D.build(entry, self.root(entry), split, self.transform, task, self.cfg.language)
            loader = D.rank_loader(data, self.rank, self.world_size, self.cfg.batch_size, self.cfg.workers)
            error = None
        except Exception as err:  # noqa: BLE001 - any local failure must reach the other ranks
            error = err
        agree_on_failure(error, self.rank, self.world_size)
        guarded = Guarded(loader)
        try:
            outputs = self.extract(self.progress.track(guarded, f"{entry.key} {split} images", total=length(loader)))
        except Exception as err:  # noqa: BLE001
            outputs, guarded.error = [], guarded.error or err
        agree_on_failure(guarded.error, self.rank, self.world_size)
        feats = gather(outputs, self.cfg.batch_size)
        if data.num_samples is not None and len(feats["idx"]) != data.num_samples:
            raise RuntimeError(f"{entry.key}/{split}: gathered {len(feats['idx'])} of {data.num_samples} samples")
        if "target" in feats:  # every rank holds all the labels: all raise or none
            D.check_labels(data, entry.key, split, feats["target"])
        return data, feats

    @property
    def cache(self) -> FeatureCache:
        if self._cache is None:
            cache_dir = self.cfg.linear_probe.cache_dir
            if cache_dir:
                cache_dir = cache_dir.replace("{output_dir}", self.cfg.output_dir)
            self._cache = FeatureCache(cache_dir, self.cfg.model.name, weights_fingerprint(self.model))
        return self._cache

    def cached_features(self, entry: EvalDataset, split: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
        key = self.cache.key(entry.key, D.dataset_name(entry), self.root(entry), split, self.transform, self.amp)
        try:
            hit, error = self.cache.load(key), None
        except Exception as err:  # noqa: BLE001 - an unreadable entry on one rank must reach the other ranks
            hit, error = None, err
        agree_on_failure(error, self.rank, self.world_size)
        # A hit counts only where every rank has one (caches are per node, or one rank's view may lag): the ranks
        # that miss extract, and `features` is a collective every rank has to enter.
        if all(every_rank(hit is not None, self.world_size)):
            return hit["features"], hit["targets"], True
        _, feats = self.features(entry, split, "linear_probe")
        if self.rank == 0:
            try:
                self.cache.save(key, feats["image"], feats["target"])
            except (OSError, RuntimeError) as err:  # the features are good; failing rank 0 alone would split the ranks
                print(f"warning: feature cache not written: {self.cache.path(key)}: {_reason(err)}", file=sys.stderr)
        return feats["image"], feats["target"], False

    def run(self, entry: EvalDataset, task: str) -> TaskResult:
        result = TaskResult(entry.key, D.dataset_name(entry), task, entry.metric)
        start = time.perf_counter()
        if task == "zeroshot_classification":
            data, feats = self.features(entry, entry.split, task)
            templates = templates_for(self.cfg.templates, entry, data.templates)
            if not data.classes:
                raise ValueError(f"{entry.key}: the dataset has no class names (classnames.txt)")
            with self.progress.clip_benchmark_loops(f"{entry.key} zero-shot"):
                result.metrics = zeroshot.evaluate(self.model, self.tokenizer, feats["image"], feats["target"],
                                                   data.classes, templates, self.device, self.amp,
                                                   batch_sizes=feats["batch_sizes"], dtype=feats["dtype"])
            result.extra["templates"] = self.cfg.templates
            result.extra["classnames"] = data.classes_source
            result.num_samples = len(feats["idx"])
        elif task == "zeroshot_retrieval":
            _, feats = self.features(entry, entry.split, task)
            # clip-benchmark's recall loop steps by the size of its first batch
            first = feats["batch_sizes"][0] if feats["batch_sizes"] else self.cfg.batch_size
            result.metrics = retrieval.evaluate(feats["image"], feats["text"], feats["text_image"],
                                                list(self.cfg.recall_k), self.device, first, self.amp,
                                                feats["dtype"])
            result.num_samples = len(feats["idx"])
            result.extra["num_texts"] = len(feats["text"])
        else:
            result.metrics, result.extra = self.linear_probe(entry)
            result.num_samples = result.extra["num_test"]
        result.seconds = time.perf_counter() - start
        result.extra["amp"] = self.amp
        return result

    def linear_probe(self, entry: EvalDataset) -> tuple[dict, dict]:
        lp = self.cfg.linear_probe
        train_x, train_y, hit_train = self.cached_features(entry, entry.train_split)
        test_x, test_y, hit_test = self.cached_features(entry, entry.split)
        val_x = val_y = None
        hits = [hit_train, hit_test]
        if entry.val_split:
            val_x, val_y, hit_val = self.cached_features(entry, entry.val_split)
            hits.append(hit_val)
        elif entry.val_proportion:
            train_x, train_y, val_x, val_y = linear_probe.split_validation(train_x, train_y, entry.val_proportion, lp.seed)
        device = self.device if lp.device == "auto" else torch.device(lp.device)
        metrics = linear_probe.evaluate(train_x, train_y, test_x, test_y, lp, device, val_x, val_y)
        num_val = 0 if val_x is None else len(val_x)
        # the final classifier's training set: train + val (clip-benchmark merges them after the sweep, full data)
        num_fit = len(train_x) + num_val if lp.fewshot_k < 0 else None
        extra = {"num_train": len(train_x), "num_val": num_val, "num_test": len(test_x), "num_fit": num_fit,
                 "weight_decay_sweep": bool(num_val),
                 "feature_cache": "hit" if all(hits) else ("partial" if any(hits) else "miss"),
                 "weights_sha256": self.cache.fingerprint}
        return metrics, extra

    def run_all(self, runs: list[tuple[EvalDataset, str]], log: Callable[[str], None],
                missing: Optional[dict[str, str]] = None,
                on_result: Optional[Callable[[int, TaskResult], None]] = None) -> list[TaskResult]:
        """`missing` (dataset key -> reason, shared across calls): a dataset found missing is reported once and its
        other tasks (and other models' runs) are not tried again. `on_result(i, result)` follows each computed run
        (`eval` writes its result file there, so a killed sweep keeps what it finished)."""
        missing = {} if missing is None else missing
        results = []
        for entry, task in runs:
            if entry.key in missing:
                results.append(TaskResult(entry.key, D.dataset_name(entry), task, entry.metric, "missing",
                                          missing[entry.key]))
                continue
            try:
                result = self.run(entry, task)
                log(f"{entry.key} {task}: {_headline(result)} ({result.seconds:.1f}s)")
            except D.DatasetMissing as err:
                result = TaskResult(entry.key, D.dataset_name(entry), task, entry.metric, "missing", str(err))
                missing[entry.key] = str(err)
                log(f"missing: {err}")
            except NotWeightsOnly:
                raise  # a planted or foreign pickle in the cache stops the whole eval, not just this dataset
            except (ValueError, ConfigError, RuntimeError, OSError, KeyError) as err:
                reason = str(err) if isinstance(err, DatasetFailed) else _reason(err)
                result = TaskResult(entry.key, D.dataset_name(entry), task, entry.metric, "failed", reason)
                log(f"failed: {entry.key} {task}: {reason}")
            if on_result is not None:
                on_result(len(results), result)
            results.append(result)
        return results


class DatasetFailed(RuntimeError):
    """A dataset that failed on some rank; the message (the same on every rank) is the reason."""


class Guarded:
    """A loader that stops at its first error and keeps it, so a rank whose data breaks mid-way still leaves the
    predict loop the way the other ranks do (Trainer.predict would tear the run down otherwise)."""

    def __init__(self, loader: "torch.utils.data.DataLoader"):
        self.loader, self.error = loader, None

    def __iter__(self):
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as err:  # noqa: BLE001
                self.error = err
                return
            yield batch


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def agree_on_failure(error: Optional[BaseException], rank: int, world_size: int) -> None:
    """Raise on every rank if this step failed on any, as the first failing rank's error: DatasetMissing with its
    message, or DatasetFailed with its reason; a refused file (NotWeightsOnly) on any rank comes first, so it never
    hides behind another rank's failure (one collective, made by all ranks whatever happened locally)."""
    if not _grouped(world_size):
        if error is not None:
            raise error
        return
    passed_on = (NotWeightsOnly, D.DatasetMissing)
    kind = next((i for i, k in enumerate(passed_on) if isinstance(error, k)), None)
    mine = None if error is None else (kind, str(error).strip() if kind is not None else _reason(error))
    every = every_rank(mine, world_size)
    failed = [(r, f) for r, f in enumerate(every) if f is not None]
    if not failed:
        return
    where, (kind, reason) = next(((r, f) for r, f in failed if f[0] == 0), failed[0])
    if kind is not None:
        raise passed_on[kind](reason)
    raise DatasetFailed(f"{reason} (on rank {where}{f' and {len(failed) - 1} more' if len(failed) > 1 else ''})")


def _grouped(world_size: int) -> bool:
    import torch.distributed as dist

    return world_size > 1 and dist.is_available() and dist.is_initialized()


def every_rank(value: Any, world_size: int) -> list:
    """Every rank's `value` in rank order, on every rank (one collective), for a decision the ranks must share;
    [value] without a process group (one process, or Lightning's launcher before it starts the other ranks)."""
    if not _grouped(world_size):
        return [value]
    import torch.distributed as dist

    every: list = [None] * world_size
    dist.all_gather_object(every, value)
    return every


def _headline(result: TaskResult) -> str:
    cols = result.columns()
    return ", ".join(f"{k}={100 * v:.2f}" for k, v in cols.items()) or "no headline metric"


def _is_amp(precision: str) -> bool:
    return "mixed" in str(precision)


def plain_device(cfg: EvalConfig) -> Optional[torch.device]:
    """The device when this eval is one process on one device in a precision a plain loop reproduces exactly
    (fp32 anywhere, *-mixed autocast on CUDA); None = run Trainer.predict."""
    from realsyn_pl.training.environment import resolve_topology

    t = cfg.trainer
    if not cfg.plain_single_process or t.strategy != "auto" or os.environ.get("WORLD_SIZE", "1") != "1":
        return None
    devices, num_nodes = resolve_topology(t.devices, t.num_nodes)
    if num_nodes != 1 or devices not in (1, "1", "auto"):
        return None
    n_cuda = torch.cuda.device_count()
    if t.accelerator == "cpu" or (t.accelerator == "auto" and n_cuda == 0):
        device = torch.device("cpu")
    elif t.accelerator in ("auto", "gpu", "cuda") and (devices != "auto" or n_cuda == 1) and n_cuda:
        device = torch.device("cuda", 0)
    else:
        return None
    precision = str(t.precision)
    if precision in ("32", "32-true") or (device.type == "cuda" and precision in ("16-mixed", "bf16-mixed")):
        return device
    return None


def autocast_context(precision: str, device: torch.device) -> Callable:
    """What Lightning's precision plugin does around predict_step, for the precisions plain_device accepts."""
    if "mixed" not in str(precision):
        return contextlib.nullcontext
    dtype = torch.bfloat16 if str(precision).startswith("bf16") else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def amp_context(device: torch.device) -> Callable:
    """clip-benchmark's `torch.autocast(device)`: the device type's default dtype (bf16 on a CPU, fp16 on CUDA)."""
    return lambda: torch.autocast(device.type)


def connect_early(trainer: "L.Trainer") -> None:
    """Join the process group now when an outside launcher (torchrun, SLURM, ...) started every rank, so the ranks can
    agree on a failure of the first dataset before its Trainer.predict. Lightning's own launcher starts the other
    ranks inside the first predict; there every rank joins there, and agrees from then on."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    strategy = trainer.strategy
    if trainer.world_size > 1 and hasattr(strategy, "setup_distributed") and not isinstance(
            strategy.cluster_environment, LightningEnvironment):
        strategy.setup_environment()  # Trainer.predict's own call finds the group initialised and goes on


def build_trainer(cfg: EvalConfig) -> "L.Trainer":
    import lightning as L

    from realsyn_pl.training.environment import resolve_topology

    devices, num_nodes = resolve_topology(cfg.trainer.devices, cfg.trainer.num_nodes)
    # No Lightning bar: the Runner wraps each loader in its own progress (a bar on a terminal, lines in a log file).
    return L.Trainer(accelerator=cfg.trainer.accelerator, devices=devices, num_nodes=num_nodes,
                     strategy=cfg.trainer.strategy, precision=cfg.trainer.precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, inference_mode=False, default_root_dir=cfg.output_dir)


def manual_extractor(model: torch.nn.Module, tokenizer: Callable, device: torch.device,
                     context: Callable = torch.no_grad) -> Extractor:
    """The predict step as a plain loop: one process on one device, or a caller already inside a Trainer (no
    nested Trainer.predict). Progress is the Runner's (it wraps the loader)."""

    def extract(loader):
        outputs = []
        with torch.no_grad(), context():
            for batch in loader:
                outputs.append(encode_batch(model, tokenizer, batch, device))
        return outputs

    return extract
