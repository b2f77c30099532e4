"""LightningDataModule for CLIP pretraining on webdataset shards."""
from __future__ import annotations

from typing import Callable, Optional

import lightning as L
import torch

from realsyn_pl.config import DataConfig
from realsyn_pl.data.shards import ClipShardDataset, ShardLoader, check_shard_split, plan_batches, resolve_sources
from realsyn_pl.data.texts import TextChooser


class ShardDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, transform: Callable, tokenizer: Callable, accumulate: int = 1):
        super().__init__()
        self.cfg = cfg
        # One loader batch is one optimizer step: `accumulate` micro-batches of data.batch_size, split by the
        # module for the contrastive accumulation.
        self.batch_size = cfg.batch_size * max(1, accumulate)
        self.transform = transform
        self.tokenizer = tokenizer
        self.chooser = TextChooser.create(cfg.text_keys, cfg.text_weights)
        self.sources = resolve_sources(cfg)
        self.loader: Optional[ShardLoader] = None
        self._resume: Optional[dict] = None

    @property
    def num_samples(self) -> int:
        if self.cfg.num_samples is not None:
            return self.cfg.num_samples
        return sum(s.num_samples for s in self.sources)

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> ShardLoader:
        rank, world = self._rank_world()
        check_shard_split(sum(len(s.shards) for s in self.sources), world, self.cfg.workers, self.cfg.resampled)
        per_worker = plan_batches(self.num_samples, world, self.cfg.workers, self.batch_size)
        dataset = ClipShardDataset(
            sources=self.sources,
            transform=self.transform,
            tokenizer=self.tokenizer,
            chooser=self.chooser,
            batch_size=self.batch_size,
            batches_per_worker=per_worker,
            rank=rank,
            world_size=world,
            resampled=self.cfg.resampled,
            shuffle_buffer=self.cfg.shuffle_buffer,
            seed=self.cfg.seed,
            image_keys=self.cfg.image_keys,
            max_pixels=self.cfg.max_pixels,
        )
        self.loader = ShardLoader(
            dataset,
            workers=self.cfg.workers,
            length=per_worker * max(1, self.cfg.workers),
            epoch_fn=lambda: self.trainer.current_epoch if self.trainer is not None else 0,
            resume=self._resume,
        )
        self._resume = None
        return self.loader

    def state_dict(self) -> dict:
        """Where the data stream stands, saved in every checkpoint (mid-epoch resume skips what was trained on)."""
        if self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches_done": done, "consumed": self._positions(done)}

    def _positions(self, done: int) -> list[list[int]]:
        """Items each loader stream of each rank consumed through the trained batches: ranks skip different bad
        samples, so each rank resumes from its own row (a collective: every rank saves the checkpoint)."""
        if self.loader is None:
            return []
        local = self.loader.positions(done)
        if self.trainer.world_size <= 1:
            return [local]
        mine = torch.tensor(local, dtype=torch.long, device=self.trainer.strategy.root_device)
        return self.trainer.strategy.all_gather(mine).reshape(self.trainer.world_size, -1).tolist()

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if state else None
        if self.loader is not None:
            self.loader.resume = self._resume
