"""The fold loop's data loaders. With loader workers (``data.num_workers``; ``auto`` on a GPU), each loader
is built once per fold and its workers persist between epochs: no re-fork and no worker start-up per epoch.
What an epoch draws still depends on its seed alone: the shuffle comes from a sampler generator reseeded
per epoch, and each worker reseeds its augmentations at its first item of an epoch from (epoch seed,
worker id) (``ImageDataset``). So a resumed run draws what an uninterrupted one does. Without workers the
loader is made per epoch, as it always was (the same draws as before, on the CPU)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, RandomSampler

from pipeline.competition.images import seed_worker


class Loaders:
    def __init__(self, batch_size: int, workers: int, pin_memory: bool, dist):
        self.batch_size, self.workers, self.pin_memory, self.dist = batch_size, workers, pin_memory, dist
        self._made: dict = {}  # (id of dataset, shuffle) -> (dataset, loader, sampler, sampler generator)

    def get(self, ds, shuffle: bool, seed: int) -> DataLoader:
        """The loader over ``ds`` for the epoch whose seed is ``seed``."""
        if self.workers == 0:
            return self._made_now(ds, shuffle, seed)
        key = (id(ds), shuffle)
        if key not in self._made:
            self._made[key] = self._persistent(ds, shuffle)
        _, loader, sampler, gen = self._made[key]
        if sampler is not None and hasattr(sampler, "set_epoch"):  # DDP: the sampler's seed is the epoch's
            sampler.seed = seed
            sampler.set_epoch(0)
        elif gen is not None:
            gen.manual_seed(seed + self.dist.rank)
        return loader

    def close(self) -> None:
        """Stop the persistent workers (a fold's end)."""
        self._made.clear()

    def _kwargs(self, ds, shuffle: bool) -> dict:
        return dict(batch_size=self.batch_size if shuffle else max(self.batch_size, 64), num_workers=self.workers,
                    # a last training batch of one image would break BatchNorm: drop that one image
                    drop_last=shuffle and len(ds) % self.batch_size == 1, pin_memory=self.pin_memory,
                    worker_init_fn=seed_worker if self.workers > 0 else None)

    def _distributed(self, ds, seed: int):
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(ds, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True, seed=seed)

    def _made_now(self, ds, shuffle: bool, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed + self.dist.rank)  # DDP: each process its own augmentations
        sampler = self._distributed(ds, seed) if shuffle and self.dist.enabled else None
        return DataLoader(ds, shuffle=shuffle and sampler is None, sampler=sampler, generator=g,
                          **self._kwargs(ds, shuffle))

    def _persistent(self, ds, shuffle: bool):
        gen = torch.Generator() if shuffle and not self.dist.enabled else None
        sampler = (self._distributed(ds, 0) if shuffle and self.dist.enabled
                   else RandomSampler(ds, generator=gen) if shuffle else None)
        # (the loader's own generator only seeds the workers' global random state, once)
        loader = DataLoader(ds, sampler=sampler, generator=torch.Generator().manual_seed(0), persistent_workers=True,
                            **self._kwargs(ds, shuffle))
        return ds, loader, sampler, gen
