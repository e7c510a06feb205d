"""AstraiDataModule: prepared HDF5 files -> DataLoaders for every objective, resumable mid-epoch.

The training sampler's state rides in the Lightning checkpoint through the DataModule's
state_dict/load_state_dict hooks, so `trainer.fit(..., ckpt_path=...)` continues at the exact
batch an uninterrupted run would have seen next (on every rank). With `repeat` (GRPO's
num_iterations) the training sampler yields each optimizer step's batches several times in a row.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from .datasets import build_dataset, collate_for
from .h5store import OBJECTIVE_KEYS
from .repeat_sampler import RepeatConfig, RepeatSampler
from .sampler import CountingDataLoader, ResumableDistributedSampler


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is batched."""

    train_path: str                       # prepared HDF5 file for training (`astrai prepare`)
    val_path: str | None = None           # prepared HDF5 file for validation, or None
    objective: str = "seq"                # seq | sft | dpo | grpo: must match the files
    window_size: int = 256                # seq/sft: tokens per training window
    stride: int | None = None             # seq/sft: tokens between window starts (None: window_size)
    max_length: int | None = None         # dpo: cut chosen/rejected sequences to this many tokens
    batch_size: int = 8                   # samples per batch and rank
    num_workers: int = 0                  # DataLoader worker processes
    pin_memory: bool = False              # page-locked batches for faster host-to-GPU copies
    persistent_workers: bool = False      # keep workers alive between epochs (needs num_workers > 0)
    seed: int = 0                         # shuffling seed; epoch e uses seed + e
    drop_last: bool = True                # drop the last incomplete batch (keeps every step the same size)
    tokenizer_hash: str | None = None     # expected Tokenizer.hash; None skips the check
    text_path: str | None = None          # sft: a prepared seq file whose plain-text windows are mixed into training
    text_fraction: float = 0.0            # sft: share of training windows taken from text_path (loss on all their tokens)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVE_KEYS:
            raise ValueError(f"data objective {self.objective!r} is not one of {sorted(OBJECTIVE_KEYS)}")
        for name in ("window_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data {name} must be >= 1, got {getattr(self, name)}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"data stride must be >= 1, got {self.stride}")
        if self.num_workers < 0:
            raise ValueError(f"data num_workers must be >= 0, got {self.num_workers}")
        if self.persistent_workers and self.num_workers == 0:
            raise ValueError("data persistent_workers needs num_workers > 0")
        if not 0.0 <= self.text_fraction < 1.0:
            raise ValueError(f"data text_fraction must be in [0, 1), got {self.text_fraction}")
        if (self.text_fraction > 0) != (self.text_path is not None):
            raise ValueError("data text_path and text_fraction go together: set both (text_fraction > 0) or neither")
        if self.text_path is not None and self.objective != "sft":
            raise ValueError(f"data text_path mixes plain text into sft training; the objective is {self.objective!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        return cls(**values)


class AstraiDataModule(L.LightningDataModule):
    def __init__(self, config: DataConfig | dict[str, Any], repeat: RepeatConfig = RepeatConfig()) -> None:
        super().__init__()
        self.config = config if isinstance(config, DataConfig) else DataConfig.from_dict(config)
        self.repeat = repeat
        self.train_dataset = None
        self.val_dataset = None
        self._train_sampler: ResumableDistributedSampler | None = None
        self._pending_state: dict[str, Any] | None = None

    def _dataset(self, path: str, train: bool = False):
        c = self.config
        text = dict(text_path=c.text_path, text_fraction=c.text_fraction) if train else {}
        return build_dataset(c.objective, path, c.window_size, c.stride, c.tokenizer_hash, c.max_length, **text)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = self._dataset(self.config.train_path, train=True)
        if self.val_dataset is None and self.config.val_path:
            self.val_dataset = self._dataset(self.config.val_path)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _generator(self) -> torch.Generator:
        # Each iterator a DataLoader starts draws its workers' base seed from this generator; without
        # one it draws from the global generator, which dropout (LoRA's) also draws from: a run
        # resumed mid-epoch starts its iterator after the RNG was restored, the uninterrupted run at
        # the epoch's start, and the two would drop different units.
        return torch.Generator().manual_seed(self.config.seed)

    def _loader(self, dataset, sampler: ResumableDistributedSampler, cls: type = DataLoader) -> DataLoader:
        c = self.config
        return cls(dataset, batch_size=c.batch_size, sampler=sampler, num_workers=c.num_workers,
                   pin_memory=c.pin_memory, persistent_workers=c.persistent_workers,
                   drop_last=c.drop_last, collate_fn=collate_for(c.objective, dataset.store.attrs["pad_id"]),
                   generator=self._generator())

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self._train_sampler is None:
            replicas, rank = self._world()
            c, r = self.config, self.repeat
            common = dict(dataset_len=len(self.train_dataset), num_replicas=replicas, rank=rank, shuffle=True,
                          seed=c.seed, drop_last=c.drop_last)
            if r.times > 1:
                self._train_sampler = RepeatSampler(**common, step_size=c.batch_size * r.batches_per_step,
                                                    repeats=r.times)
            else:
                self._train_sampler = ResumableDistributedSampler(**common)
            if self._pending_state is not None:
                self._train_sampler.load_state_dict(self._pending_state)
                self._pending_state = None
        return self._loader(self.train_dataset, self._train_sampler, CountingDataLoader)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if self.val_dataset is None:
            return []
        replicas, rank = self._world()
        sampler = ResumableDistributedSampler(len(self.val_dataset), replicas, rank, shuffle=False)
        c = self.config
        return DataLoader(self.val_dataset, batch_size=c.batch_size, sampler=sampler, num_workers=c.num_workers,
                          pin_memory=c.pin_memory, persistent_workers=c.persistent_workers,
                          collate_fn=collate_for(c.objective, self.val_dataset.store.attrs["pad_id"]),
                          generator=self._generator())

    @property
    def pad_id(self) -> int:
        self.setup()
        return int(self.train_dataset.store.attrs["pad_id"])

    def state_dict(self) -> dict[str, Any]:
        """Saved into the Lightning checkpoint: where the training sampler stands."""
        if self._train_sampler is not None:
            return {"train_sampler": self._train_sampler.state_dict()}
        return {"train_sampler": self._pending_state} if self._pending_state else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_sampler")
        if state is None:
            return
        if self._train_sampler is not None:
            self._train_sampler.load_state_dict(state)
        else:
            self._pending_state = state  # applied when train_dataloader() builds the sampler
