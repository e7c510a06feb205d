"""Lightning checkpoint -> model directory (config.json, model.safetensors, tokenizer files),
the format `astrai serve` and `astrai export-hf` take."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from astrai_train.model import ModelConfig, Transformer
from astrai_train.objectives.base import CKPT_KEY
from astrai_train.objectives.checkpointing import read_checkpoint

_PREFIX = "model."  # the Transformer is the LightningModule's `model` attribute
_WRAPPED = "_checkpoint_wrapped_module."  # activation checkpointing's wrapper, if it leaked into names


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; export takes a single-file Lightning checkpoint (.ckpt)")
    # weights_only: a checkpoint handed over from elsewhere must not run code (checkpointing.py)
    return read_checkpoint(path)


def model_from_checkpoint(checkpoint: dict[str, Any], source: str = "checkpoint") -> tuple[Transformer, dict[str, Any]]:
    meta = checkpoint.get(CKPT_KEY)
    if meta is None or "model_config" not in meta:
        raise ValueError(f"{source} was not written by astrai train (no {CKPT_KEY!r} entry)")
    config = ModelConfig.from_dict(meta["model_config"], source=f"{source}: model_config")
    weights = {k[len(_PREFIX):].replace(_WRAPPED, ""): v for k, v in checkpoint["state_dict"].items()
               if k.startswith(_PREFIX)}
    model = Transformer(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("rope_")]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, meta


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write the model directory; the tokenizer comes from `tokenizer_dir` or the recipe's."""
    checkpoint = load_checkpoint(checkpoint_path)
    model, meta = model_from_checkpoint(checkpoint, source=str(checkpoint_path))
    if dtype is not None:
        model = model.to(dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok_dir = tokenizer_dir or meta.get("tokenizer_dir")
    if tok_dir is not None:
        from astrai_train.tokenizer import Tokenizer

        if not Path(tok_dir).is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {tok_dir} (pass --tokenizer DIR)")
        Tokenizer.from_pretrained(tok_dir).save_pretrained(out_dir)
    return out_dir
