"""Lightning checkpoint -> model directory (config.json, model.safetensors, tokenizer files),
the format `astrai serve` and `astrai export-hf` take.

A checkpoint of a LoRA run (its recipe's `lora.rank` > 0) holds the frozen base weights and the
adapters. `merge=True` writes the merged weights W + s B A as an ordinary model directory;
`merge=False` writes the base weights there and the adapters, in PEFT's format, to
`adapter_dir` (default `<out>/adapter`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from astrai_train.adapters import apply_lora, has_lora, merge_lora, remove_lora, save_adapter
from astrai_train.model import ModelConfig, Transformer
from astrai_train.objectives.base import CKPT_KEY, lora_spec
from astrai_train.objectives.checkpointing import read_checkpoint
from astrai_train.objectives.config import LoRASection, build

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
    lora = lora_section(meta)
    if lora is not None:  # the LoRA layers the run trained, so their weights have somewhere to go
        apply_lora(model, lora_spec(lora))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("rope_")]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, meta


def lora_section(meta: dict[str, Any]) -> LoRASection | None:
    """The lora section of the run's recipe when it trained adapters, else None."""
    data = (meta.get("recipe") or {}).get("lora") or {}
    if not data.get("rank"):
        return None
    return build(LoRASection, data, "checkpoint recipe", prefix="lora.")


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                      dtype: torch.dtype | None = None, merge: bool = False, adapter_dir: str | Path | None = None,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write the model directory; the tokenizer comes from `tokenizer_dir` or the recipe's.

    A LoRA checkpoint: see the module docstring. `adapter_dir` with merge=True writes the adapter
    too (a run's end: merged model and adapter). The adapter names `base_model_name_or_path` as its
    base (default: the model directory written here when it holds the base, else the run's
    model.init_from)."""
    checkpoint = load_checkpoint(checkpoint_path)
    model, meta = model_from_checkpoint(checkpoint, source=str(checkpoint_path))
    out_dir = Path(out_dir)
    if has_lora(model):
        if not merge and adapter_dir is None:
            adapter_dir = out_dir / "adapter"
        if adapter_dir is not None:
            if base_model_name_or_path is None:
                init_from = ((meta.get("recipe") or {}).get("model") or {}).get("init_from")
                base = out_dir if not merge else (Path(init_from) if init_from else None)
                base_model_name_or_path = str(base.resolve()) if base is not None else None
            save_adapter(model, adapter_dir, base_model_name_or_path)
        model = merge_lora(model) if merge else remove_lora(model)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out_dir)
    tok_dir = tokenizer_dir or meta.get("tokenizer_dir")
    if tok_dir is not None:
        from astrai_train.tokenizer import Tokenizer

        if not Path(tok_dir).is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {tok_dir} (pass --tokenizer DIR)")
        Tokenizer.from_pretrained(tok_dir).save_pretrained(out_dir)
    return out_dir
