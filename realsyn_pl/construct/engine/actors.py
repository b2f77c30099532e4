"""Model stages on Ray actors: each actor holds one device and one model, loaded once, and runs a one-device
Lightning `Trainer.predict` over the whole shards the driver hands it as it becomes free.

No process group and no barrier: an actor that finishes early simply gets the next shard, a straggler delays only its
own shards, and an actor that dies (its process, or its node) is replaced while its shards go to the others. Actors
outlive their stage only when the driver runs a model stage next (caption, tag, syn_text, embed_syn_text run back to
back): the next model replaces the last in the same process; otherwise they go at the end of their stage. The
Trainer inside must not believe it is one rank of a job: a worker started under torchrun or srun inherits RANK,
LOCAL_RANK, WORLD_SIZE or SLURM_*, from which Lightning would build a distributed run, so the actor drops them and
gives the Trainer a plain cluster environment and its single device explicitly.
Resources: one GPU per actor where the cluster has GPUs and trainer.accelerator allows them (auto or gpu), else
`ray.actor_cpus` CPUs; `ray.stages.<stage>` overrides either; `ray.max_actors` caps the count.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

from realsyn_pl.construct.engine.config import PredictTrainerConfig
from realsyn_pl.construct.engine.executor import Attempts, Executor, Resources, error_line, thread_limits
from realsyn_pl.construct.engine.predict import PredictJob
from realsyn_pl.construct.engine.progress import Progress
from realsyn_pl.construct.engine.runtime import raise_open_files_limit
from realsyn_pl.construct.engine.stage import Stage, StageError, input_indices

# what launchers set that makes Lightning (or torch.distributed) join a job
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "ROLE_NAME", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "JSM_NAMESPACE_RANK")
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_COMM_WORLD_", "PMIX_")


def plain_environment() -> list[str]:
    """Remove the launcher variables from this process's environment; returns their names."""
    gone = [k for k in os.environ if k in LAUNCHER_VARS or k.startswith(LAUNCHER_PREFIXES)]
    for k in gone:
        del os.environ[k]
    return gone


class PredictActor:
    """One model on one device, loaded by load() (again for each model stage the actor serves)."""

    def __init__(self) -> None:
        plain_environment()
        raise_open_files_limit(say=None)  # as a plain task's worker does (executor.run_unit)
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)  # the per-call "GPU available" lines
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")  # rows carry their positions
        self.task: Any = None
        self.module: Any = None

    def load(self, job: PredictJob, stage: Stage, trainer: PredictTrainerConfig, threads: int) -> Optional[str]:
        """Build the stage's task and module; None, or the one line saying why the model cannot be used."""
        self.task = self.module = None  # the last stage's model goes before the next one is loaded
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.job, self.stage, self.trainer_cfg, self.threads = job, stage, trainer, threads
        try:
            with thread_limits(threads):
                self.task = job.make()
                self._check()
                self.module = self.task.build_module()
        except Exception as err:  # a model that cannot load: the driver stops the stage with this line
            return str(err).splitlines()[0] if isinstance(err, StageError) else error_line(err)
        return None

    def _check(self) -> None:
        if not self.job.agrees(self.task, self.stage.work_dir):
            raise StageError(f"{self.stage.label}: the task built in the actor has another config than the driver's "
                             f"(driver {self.stage.hash}); the stage's config_of and stage_config disagree")

    def run(self, shard: int) -> int:
        """Predict one whole input shard (its batches decoded by the task's DataLoader workers); the writer marks it
        done once its files are written."""
        import torch
        from torch.utils.data import DataLoader

        from realsyn_pl.construct.engine.predict import ShardBatches
        from realsyn_pl.data.writers import ShardPredictionWriter

        task, stage = self.task, self.stage
        path = self.job.input_path(stage.work_dir, shard)
        writer = ShardPredictionWriter(stage, lambda result: task.write(stage, path, result),
                                       getattr(task, "output_dtypes", None))
        with thread_limits(self.threads):
            trainer = predict_trainer(self.trainer_cfg.accelerator, task.precision or self.trainer_cfg.precision,
                                      [writer])
            # batches in page-locked memory where this actor holds a GPU: the Trainer's copy to the device is then
            # asynchronous (non_blocking) and overlaps the model's work on the last batch
            loader = DataLoader(ShardBatches(task, [(shard, path)]), batch_size=None, num_workers=task.workers,
                                persistent_workers=False, pin_memory=torch.cuda.is_available())
            trainer.predict(self.module, dataloaders=loader, return_predictions=False)
        if not stage.shard_done(shard):
            raise StageError(f"{stage.label}: predict ended without finishing shard {shard}")
        return shard


def predict_trainer(accelerator: str, precision: str, callbacks: list[Any]) -> Any:
    """The Trainer of one model actor: one device, no process group (Ray hands out the shards), no logger."""
    import lightning as L
    from lightning.fabric.plugins.environments import LightningEnvironment

    return L.Trainer(accelerator=accelerator, devices=1, num_nodes=1, strategy="auto", plugins=[LightningEnvironment()],
                     precision=precision, logger=False, callbacks=callbacks, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     inference_mode=True)


def actor_resources(ex: Executor, stage: Stage, trainer: PredictTrainerConfig) -> Resources:
    """One GPU per actor where the cluster has them and the accelerator allows, plus ray.actor_cpus CPUs."""
    if trainer.accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise StageError(f"trainer.accelerator must be auto, gpu or cpu, got {trainer.accelerator!r}")
    if trainer.accelerator in ("gpu", "cuda") and ex.session.gpus < 1:
        raise StageError(f"trainer.accelerator={trainer.accelerator} but the Ray cluster has no GPU "
                         f"({ex.session.address}); use trainer.accelerator=auto or cpu")
    return ex.resources(stage.root, gpu=trainer.accelerator != "cpu" and ex.session.gpus >= 1,
                        cpus=ex.rc.actor_cpus)


def run_on_actors(ex: Executor, stage: Stage, job: PredictJob, trainer: PredictTrainerConfig,
                  shards: Sequence[int]) -> None:
    """Hand the stage's pending shards to actors, one per call as each becomes free, until every one is done."""
    import ray

    todo = [i for i in shards if not stage.shard_done(i)]
    if not todo:
        return
    res = actor_resources(ex, stage, trainer)
    if ex.local:
        actor = PredictActor()
        why = actor.load(job, stage, trainer, res.threads())
        if why is not None:
            raise StageError(f"{stage.label}: {why}")
        return ex.serially(stage, todo, actor.run, already=len(shards) - len(todo))
    ex.check_fits(res, stage.label, f"ray.actor_cpus or ray.stages.{stage.root}")
    queue = deque(todo)
    target = min(len(queue), ex.slots(res), ex.rc.max_actors or len(queue))
    cls = ray.remote(PredictActor).options(**res.options(), max_restarts=0, max_task_retries=0)
    kept = ex.take_actors(res, target)  # the last model stage's actors, if it asked for the same resources
    starting: dict[Any, Any] = {}  # load() ref -> actor whose model is loading
    free: deque = deque()
    busy: dict[Any, tuple[Any, int]] = {}
    started = 0

    def start(actor: Any = None) -> None:
        nonlocal started
        actor = actor or cls.remote()
        starting[actor.load.remote(job, stage, trainer, res.threads())] = actor
        started += 1

    for actor in kept:
        start(actor)
    for _ in range(target - len(kept)):
        start()
    att = Attempts(ex.rc.max_retries, stage.label, stage)
    bar = Progress(stage.label, len(todo), ex.rc.progress_s, ex.progress, already=len(shards) - len(todo))
    done = 0
    t0 = time.time()
    try:
        while queue or busy:
            while free and queue:
                actor, shard = free.popleft(), queue.popleft()
                busy[actor.run.remote(shard)] = (actor, shard)
            if not busy and not starting and not free:
                start()  # every actor was lost: bring one back
            ready, _ = ray.wait(list(busy) + list(starting), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        why = ray.get(ref)
                    except ray.exceptions.RayError as err:  # lost while loading (its node went away)
                        print(f"[build] {stage.label}: an actor was lost while loading its model ({error_line(err)}); "
                              "starting another", flush=True)
                        if started < target + len(todo) * (ex.rc.max_retries + 1):
                            start()
                        continue
                    if why is not None:
                        raise StageError(f"{stage.label}: {why}")
                    free.append(actor)
                    continue
                actor, shard = busy.pop(ref)
                try:
                    ray.get(ref)
                    done += 1
                    att.succeeded(shard)
                    free.append(actor)
                except ray.exceptions.RayError as err:
                    if isinstance(err, ray.exceptions.RayActorError):  # the actor (or its node) is gone
                        ray.kill(actor)
                        start()
                    else:
                        free.append(actor)
                    if att.failure(shard, err):
                        queue.append(shard)
            bar.update(done, len(busy), att.retried, len(att.failed))
    except BaseException:
        for actor in [*starting.values(), *free, *(a for a, _ in busy.values())]:
            ray.kill(actor)
        raise
    for actor in starting.values():  # replacements that never got work
        ray.kill(actor)
    if ex.next_is_model_stage:  # the next stage loads its model into these processes instead of starting others
        ex.keep_actors(res, list(free))
    else:
        Executor.release(list(free))
    bar.close()
    if ex.progress:
        print(f"[build] {stage.label}: {started} actor(s) of {res.gpus:g} GPU / {res.cpus:g} CPU, "
              f"{time.time() - t0:.0f} s", flush=True)
    att.check()


def run_predict_task(job: PredictJob, ex: Executor, work_dir: str | Path, trainer_cfg: PredictTrainerConfig,
                     force: bool | str = False) -> bool:
    """Run one model stage to completion on Ray actors. True when the stage is complete."""
    started = time.time()
    work_dir = Path(work_dir)
    indices = input_indices(work_dir / job.input_stage, job.input_kind)
    stage = job.stage(work_dir, trainer_cfg.precision)
    if stage.skip_complete(force):
        return True
    stage.begin(force)
    run_on_actors(ex, stage, job, trainer_cfg, indices)
    return stage.finalize(indices, started)
