"""Model directories on disk: config.json + model.safetensors (sharded with an index when large).

Loading never unpickles. A directory written by `transformers` for any family hf.SUPPORTED_MODEL_TYPES
loads too: its config and weight names are translated by hf.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX).is_file():
        index = json.loads((directory / INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory / INDEX} names shard {missing[0]!r}, which does not exist")
        return [directory / f for f in files]
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    raise FileNotFoundError(f"no weights in model directory {directory}: expected {WEIGHTS} or {INDEX}")


def read_state_dict(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def load_config(directory: str | Path) -> tuple[ModelConfig, str]:
    """(config, source format) where the format is "astrai" or the HF model_type (hf.SUPPORTED_MODEL_TYPES)."""
    from .hf import config_from_hf

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model directory {directory} has no config.json")
    data = json.loads(path.read_text())
    model_type = data.get("model_type", "astrai")
    if model_type == "astrai":
        return ModelConfig.from_dict(data, source=str(path)), "astrai"
    return config_from_hf(data, source=str(path)), model_type


def load_pretrained(cls, directory: str | Path, device=None, dtype=None):
    from .hf import state_dict_from_hf

    directory = Path(directory)
    config, fmt = load_config(directory)
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = read_state_dict(directory, device="cpu")
    if fmt != "astrai":
        state = state_dict_from_hf(state, config)
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ValueError(f"weights in {directory} do not match its config.json: {what}")
    for key, tensor in model.state_dict().items():
        if state[key].shape != tensor.shape:
            raise ValueError(f"weight {key!r} in {directory} has shape {tuple(state[key].shape)}, "
                             f"config.json implies {tuple(tensor.shape)}")
    target_dtype = dtype or next(iter(state.values())).dtype
    state = {k: v.to(device=device, dtype=target_dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model._build_rope(device)
    return model.eval()


def save_pretrained(model, directory: str | Path, max_shard_bytes: int = 4 << 30) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_safetensors(state, directory, max_shard_bytes, metadata={"format": "pt"})
    return directory


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int,
                      metadata: dict[str, str]) -> None:
    for stale in [directory / WEIGHTS, directory / INDEX, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_file(state, str(directory / WEIGHTS), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update({k: name for k in shard})
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                               "weight_map": weight_map}, indent=2) + "\n")
