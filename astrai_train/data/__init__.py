"""Data: `astrai prepare` (text/JSONL -> HDF5), datasets (SEQ/SFT/DPO/GRPO), the resumable
sampler, the LightningDataModule, and task derivation from the Shakespeare corpus.

Names are imported lazily: tokenizer worker processes and `astrai tasks` import submodules of
this package and should not pay for torch and Lightning.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AstraiDataModule": "datamodule", "DataConfig": "datamodule",
    "SeqDataset": "datasets", "SFTDataset": "datasets", "TextMixDataset": "datasets", "DPODataset": "datasets",
    "GRPODataset": "datasets",
    "collate_dpo": "datasets", "collate_grpo": "datasets", "num_windows": "datasets",
    "ResumableDistributedSampler": "sampler", "CountingDataLoader": "sampler",
    "RepeatSampler": "repeat_sampler", "RepeatConfig": "repeat_sampler",
    "TokenStore": "h5store", "H5Writer": "h5store", "OBJECTIVE_KEYS": "h5store", "token_dtype": "h5store",
    "PrepareConfig": "prepare", "PrepareStats": "prepare", "prepare": "prepare",
    "TaskConfig": "tasks", "derive_tasks": "tasks", "EVAL_PLAYS": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'astrai_train.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
