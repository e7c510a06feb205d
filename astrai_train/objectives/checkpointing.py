"""Checkpoints that are never half-written, and where `--resume last` finds them.

Lightning's `_atomic_save` serialises to memory and then writes the bytes over the target path,
so a crash mid-write leaves a truncated file under the final name. Here the bytes go to a
temporary file in the same directory, are fsync'ed, and replace the target with one rename.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from astrai_train.objectives.config import CheckpointSection


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def checkpoint_callback(run_dir: Path, section: CheckpointSection) -> ModelCheckpoint:
    """step-NNNNNNN.ckpt every `every_n_steps` optimizer steps, the newest `keep_last` kept."""
    return ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step-{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=section.every_n_steps,  # 0: none during training
        every_n_epochs=0,  # steps, not epochs: an epoch of a large corpus may never end
        save_top_k=section.keep_last,
        monitor="step",
        mode="max",       # highest step = newest: top-k by step is "the last k"
        save_last=False,  # LastCheckpoint writes last.ckpt (see there why not Lightning)
        save_on_train_epoch_end=False,
        # A resumed run re-runs steps a killed one may have saved already: overwrite them.
        enable_version_counter=False,
    )


class LastCheckpoint(L.Callback):
    """last.ckpt at every checkpoint interval and at the final optimizer step, always written
    inside the training loop.

    Lightning's own save_last also writes last.ckpt from on_train_end, after the loop has
    finished; a run resumed from that file does not replay the uninterrupted run (its loop and
    data-sampler counters are taken at another point). Saving here keeps every checkpoint at the
    same point of a step: after the optimizer update, before the next batch is drawn.
    """

    def __init__(self, run_dir: Path, every_n_steps: int) -> None:
        self.path = run_dir / "checkpoints" / "last.ckpt"
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: no optimizer step happened
        if step >= trainer.max_steps or (self.every_n_steps and step % self.every_n_steps == 0):
            trainer.save_checkpoint(self.path)


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """`--resume last` -> <run>/checkpoints/last.ckpt; a path must exist."""
    if resume is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.exists():
        hint = " (no checkpoint has been written for this run yet)" if resume == "last" else ""
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}{hint}")
    return str(path)
