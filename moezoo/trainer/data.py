"""Training data with a checkpointable position: a map-style ``Dataset`` shuffled per epoch (resumed mid-epoch with
accelerate's ``skip_first_batches``), or a ``sample_batch(generator, batch_size)`` callable."""
from __future__ import annotations

import random
import warnings

import numpy as np
import torch

__all__ = ["make_data_source"]


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class _DatasetSource:
    """Epoch-wise shuffled batches of a map-style dataset; state = epoch, position and the generator at epoch start."""

    def __init__(self, dataset, *, batch_size, seed, rank, world_size, collate_fn, num_workers, drop_last, pin_memory):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.collate_fn, self.num_workers, self.drop_last, self.pin_memory = collate_fn, num_workers, drop_last, pin_memory
        n = len(dataset)
        n_batches = n // batch_size if drop_last else -(-n // batch_size)
        self.batches_per_epoch = n_batches // world_size  # per process; the remainder is dropped to keep ranks in step
        if self.batches_per_epoch < 1:
            raise ValueError(f"train_data has {n} samples: too few for batch_size={batch_size} x {world_size} "
                             f"process(es){' with drop_last' if drop_last else ''}")
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0
        self._epoch_state = None
        self._batches = None
        self._iter = None

    def _start_epoch(self):
        self._epoch_state = self.generator.get_state()
        perm = torch.randperm(len(self.dataset), generator=self.generator).tolist()
        batches = [perm[i:i + self.batch_size] for i in range(0, len(perm), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        self._batches = batches[self.rank::self.world_size][: self.batches_per_epoch]
        self._iter = None

    def _make_iter(self):
        from torch.utils.data import DataLoader

        loader_gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 7919 + self.rank) % 2**63)
        loader = DataLoader(self.dataset, batch_sampler=self._batches, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, generator=loader_gen,
                            worker_init_fn=_seed_worker if self.num_workers else None)
        if self.pos:  # resumed mid-epoch: the batches already trained on are skipped, never loaded
            from accelerate import skip_first_batches

            loader = skip_first_batches(loader, self.pos)
        return iter(loader)

    def next(self):
        if self._batches is None:
            self._start_epoch()
        if self.pos >= len(self._batches):
            self.epoch, self.pos = self.epoch + 1, 0
            self._start_epoch()
        if self._iter is None:
            self._iter = self._make_iter()
        batch = next(self._iter)
        self.pos += 1
        return batch

    def state_dict(self) -> dict:
        if self._batches is None:
            self._start_epoch()
        return {"kind": "dataset", "epoch": self.epoch, "pos": self.pos, "epoch_generator_state": self._epoch_state,
                "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "dataset":
            raise ValueError("checkpoint was written for a sample_batch callable, but train_data is a Dataset")
        if state["batches_per_epoch"] != self.batches_per_epoch:
            warnings.warn(f"the dataset now gives {self.batches_per_epoch} batches per epoch, the checkpoint "
                          f"{state['batches_per_epoch']}: the data order will differ from the original run", stacklevel=3)
        self.generator.set_state(state["epoch_generator_state"])
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._start_epoch()


class _CallableSource:
    """``sample_batch(generator, batch_size)`` with a checkpointed CPU generator (seeded ``seed + rank``)."""

    def __init__(self, fn, *, batch_size, seed, rank):
        self.fn, self.batch_size = fn, batch_size
        self.generator = torch.Generator().manual_seed((seed + rank) % 2**63)
        self.calls = 0
        self.epoch = 0

    def next(self):
        self.calls += 1
        return self.fn(self.generator, self.batch_size)

    def state_dict(self) -> dict:
        return {"kind": "callable", "generator_state": self.generator.get_state(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "callable":
            raise ValueError("checkpoint was written for a Dataset, but train_data is a sample_batch callable")
        self.generator.set_state(state["generator_state"])
        self.calls = int(state["calls"])


def make_data_source(train_data, *, config, rank: int, world_size: int, collate_fn, pin_memory: bool):
    """The data source of a Trainer (see :class:`moezoo.trainer.Trainer`'s ``train_data``)."""
    if callable(train_data) and not hasattr(train_data, "__getitem__"):
        return _CallableSource(train_data, batch_size=config.batch_size, seed=config.seed, rank=rank)
    from torch.utils.data import IterableDataset

    if isinstance(train_data, IterableDataset) or not (hasattr(train_data, "__getitem__")
                                                       and hasattr(train_data, "__len__")):
        raise TypeError("train_data must be a map-style Dataset (with __getitem__ and __len__) or a callable "
                        f"sample_batch(generator, batch_size); got {type(train_data).__name__}")
    return _DatasetSource(train_data, batch_size=config.batch_size, seed=config.seed, rank=rank,
                          world_size=world_size, collate_fn=collate_fn, num_workers=config.num_workers,
                          drop_last=config.drop_last, pin_memory=pin_memory)
