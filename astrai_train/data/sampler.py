"""A distributed sampler that can resume mid-epoch exactly, and the loader that tells it what
was consumed.

Each epoch has one global order: a permutation seeded with seed + epoch (or 0..n-1), padded by
repetition (or cut, with drop_last) to a multiple of the world size. Rank r takes order[r::R].
After every rank has consumed c samples, the consumed set is exactly order[:c * R], so the
state is two numbers: (epoch, c). Resuming yields order[r::R][c:].

Consumption is counted where batches reach the training loop (CountingDataLoader, in the main
process). Counting inside the sampler would be wrong: DataLoader workers pull indices several
batches ahead of what the loop has trained on.

The class subclasses DistributedSampler only so Lightning recognises it as distributed and does
not wrap it in another sampler; it shares no code with it.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

STATE_VERSION = 1
# Settings a checkpoint must share with the run resuming it, with the value older checkpoints imply.
_SETTINGS = {"dataset_len": None, "seed": None, "shuffle": None, "repeats": 1, "step_size": 1}


class ResumableDistributedSampler(DistributedSampler):
    repeats = 1    # RepeatSampler's: how often each step's samples come in a row (1: no repetition)
    step_size = 1  # RepeatSampler's: samples per optimizer step and rank

    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        # DistributedSampler.__init__ is not called: it wants a dataset and a process group.
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(f"drop_last with {dataset_len} samples and {num_replicas} ranks leaves no sample")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0  # samples this rank has handed to the loop in the current epoch
        per_rank = dataset_len / num_replicas
        self.num_samples = math.floor(per_rank) if drop_last else math.ceil(per_rank)
        self.total_size = self.num_samples * num_replicas
        self.dataset = range(dataset_len)  # what DistributedSampler users may look at

    def epoch_order(self, epoch: int) -> list[int]:
        """The global order of an epoch, length total_size."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        if len(order) < self.total_size:
            reps = math.ceil(self.total_size / len(order))
            order = (order * reps)[: self.total_size]
        return order[: self.total_size]

    def rank_order(self, epoch: int) -> list[int]:
        """What this rank yields in an epoch, length num_samples."""
        return self.epoch_order(epoch)[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        # Decided when iteration starts, not lazily: a loader's workers may pull indices at any time.
        return iter(self.rank_order(self.epoch)[self.consumed:])

    def __len__(self) -> int:
        # The whole epoch, also when resuming: Lightning counts batches already done on its own.
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def advance(self, n: int) -> None:
        """Record that n more samples of this rank reached the training loop."""
        self.consumed = min(self.consumed + n, self.num_samples)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "consumed_per_rank": self.consumed,
                "samples_consumed": self.consumed * self.num_replicas, "num_replicas": self.num_replicas,
                "dataset_len": self.dataset_len, "seed": self.seed, "shuffle": self.shuffle,
                "repeats": self.repeats, "step_size": self.step_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, implied in _SETTINGS.items():
            if state.get(key, implied) != getattr(self, key):
                raise ValueError(f"cannot resume the sampler: checkpoint has {key}={state.get(key, implied)!r}, this "
                                 f"run has {key}={getattr(self, key)!r} (different data or settings)")
        self.epoch = int(state["epoch"])
        if state["num_replicas"] == self.num_replicas:
            self.consumed = int(state["consumed_per_rank"])
        else:
            # Another world size: resume after the same global prefix, rounded down so no sample is lost.
            self.consumed = int(state["samples_consumed"]) // self.num_replicas
        self.consumed = min(self.consumed, self.num_samples)


class CountingDataLoader(DataLoader):
    """A DataLoader over a ResumableDistributedSampler that advances it by each batch it yields,
    in the main process, just before the batch reaches the loop. A checkpoint written while the
    loop handles batch k therefore records k batches consumed, however far workers prefetched."""

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableDistributedSampler):
            raise TypeError("CountingDataLoader needs sampler=ResumableDistributedSampler(...)")
        batch_size = self.batch_size or 1
        for batch in super().__iter__():
            sampler.advance(batch_size)
            yield batch

    # Lightning treats a loader with these two methods as resumable: it saves the state in the
    # fit loop too (same dump, same numbers as the DataModule hook, so restoring twice is
    # harmless) and does not warn that a mid-epoch resume is unreliable.
    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
