"""Checkpoints that are never half-written, and where `--resume last` finds them.

Lightning's `_atomic_save` serialises to memory and then writes the bytes over the target path,
so a crash mid-write leaves a truncated file under the final name. Here the bytes go to a
temporary file in the same directory, are fsync'ed, and replace the target with one rename.
"""
from __future__ import annotations

import os
import pickle
import sys
import tempfile
import zipfile
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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: empty, truncated, corrupt or unsafe (one line)."""


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """torch.load(path) with weights_only=True: tensors, plain containers and numbers only, so a
    checkpoint from elsewhere cannot run code while it loads (a pickle may name any callable;
    the weights-only unpickler refuses every one outside torch's allowlist). Our checkpoints
    need nothing more (base._rng_state stores the generators' states as tensors). mmap: map the
    tensors instead of reading them (a cheap full check of a large file).

    Every failure is a CheckpointError naming the file: empty, not a torch zip archive
    (truncated or corrupt), or refused by the weights-only unpickler."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a run was killed while writing it?")
    if not zipfile.is_zipfile(path):   # torch.save writes a zip; a cut-off file has no central directory
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({path.stat().st_size} bytes, "
                              "not a complete torch.save archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; the line that names the refused callable is the news
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        first = next((ln.removeprefix("WeightsUnpickler error: ") for ln in lines
                      if "GLOBAL" in ln or "WeightsUnpickler error" in ln), type(err).__name__)
        raise CheckpointError(f"checkpoint {path} was refused: it holds objects other than tensors and plain "
                              f"data, which could run code when loaded ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(err).__name__}: {first})") from None


def _step_of(path: Path) -> int:
    digits = path.stem.removeprefix("step-")
    return int(digits) if digits.isdigit() else -1


def resolve_resume(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to resume from, checked before training starts (read_checkpoint, mmap'ed).

    `--resume last`: <run>/checkpoints/last.ckpt, or, when that file is empty, truncated or
    corrupt, the newest intact step-*.ckpt beside it (saying so on stderr). A path given
    explicitly must be intact itself: no fall-back from a file the user named."""
    if resume is None:
        return None
    if resume != "last":
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
        read_checkpoint(path, mmap=True)
        return str(path)
    folder = run_dir / "checkpoints"
    last = folder / "last.ckpt"
    steps = sorted(folder.glob("step-*.ckpt"), key=_step_of, reverse=True) if folder.is_dir() else []
    if not last.exists() and not steps:
        raise FileNotFoundError(f"checkpoint to resume from not found: {last} "
                                "(no checkpoint has been written for this run yet)")
    problems = []
    for path in ([last] if last.exists() else []) + steps:
        try:
            read_checkpoint(path, mmap=True)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            print(f"[astrai] {problems[0]}; resuming from {path} instead", file=sys.stderr)
        return str(path)
    raise CheckpointError(f"no intact checkpoint to resume from in {folder}: {'; '.join(problems)}")
