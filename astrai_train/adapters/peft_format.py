"""LoRA adapters on disk in PEFT's format, the one `peft`, TRL and vLLM exchange.

    adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors    base_model.model.<HF module name>.lora_A.weight  [r, in]
                                 base_model.model.<HF module name>.lora_B.weight  [out, r]

HF module names are ours with `model.` in front (astrai_train/model/hf_export.py writes the
weights under the same names), so the adapter applies to the `astrai export-hf` directory of the
base model: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), adapter_dir)`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .apply import AdapterSpec, adapter_spec, apply_lora, lora_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PARTS = ("lora_A", "lora_B")


def peft_key(name: str, part: str) -> str:
    """`layers.0.self_attn.q_proj`, `lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    hf = name if name.startswith("lm_head") else f"model.{name}"
    return f"{_PREFIX}{hf}.{part}.weight"


def _our_name(key: str, source: str) -> tuple[str, str]:
    for part in _PARTS:
        suffix = f".{part}.weight"
        if key.startswith(_PREFIX) and key.endswith(suffix):
            hf = key[len(_PREFIX):-len(suffix)]
            return (hf if hf.startswith("lm_head") else hf.removeprefix("model.")), part
    raise ValueError(f"{source}: tensor {key!r} is not a LoRA weight of a causal LM "
                     f"(expected {_PREFIX}model.<module>.lora_A.weight / .lora_B.weight)")


def adapter_config(spec: AdapterSpec, base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT's LoraConfig fields for plain LoRA (the ones PEFT has read since its 0.5 release)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the LoRA layers of `model` as a PEFT adapter directory; returns it."""
    layers = lora_layers(model)
    spec = adapter_spec(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        for part in _PARTS:
            tensors[peft_key(name, part)] = getattr(layer, part).detach().to("cpu").contiguous()
    (out / CONFIG_FILE).write_text(json.dumps(adapter_config(spec, base_model_name_or_path), indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


# What this reader does not implement; each must be at its plain-LoRA value.
_PLAIN = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
          "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def read_adapter(directory: str | Path) -> tuple[AdapterSpec, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(spec, {module name: {"lora_A": A, "lora_B": B}}, the raw config) of a PEFT LoRA directory."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"not a PEFT adapter directory: {path} is missing")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type={config.get('peft_type')!r}; only LORA adapters load here")
    for key, plain in _PLAIN.items():
        value = config.get(key, plain)
        empty_ok = plain in (None, {}) and value in (None, [], {})   # PEFT writes either
        if value != plain and not empty_ok:
            raise ValueError(f"{config_path}: {key}={value!r} is not supported (plain LoRA needs {plain!r})")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_path)).items():
        name, part = _our_name(key, str(weights_path))
        weights.setdefault(name, {})[part] = tensor
    for name, parts in weights.items():
        if set(parts) != set(_PARTS):
            raise ValueError(f"{weights_path}: {name} has {sorted(parts)} but needs both lora_A and lora_B")
    rank = int(config["r"])
    spec = AdapterSpec(rank=rank, alpha=float(config.get("lora_alpha", rank)),
                       dropout=float(config.get("lora_dropout") or 0.0),
                       target_modules=tuple(sorted({n.rpartition(".")[2] for n in weights})))
    return spec, weights, config


def load_adapter(model: nn.Module, directory: str | Path) -> AdapterSpec:
    """Wrap `model`'s layers as the adapter in `directory` says and load its weights (in place)."""
    spec, weights, _ = read_adapter(directory)
    layers = apply_lora(model, spec)
    missing = sorted(set(layers) - set(weights))
    extra = sorted(set(weights) - set(layers))
    if missing or extra:
        raise ValueError(f"{directory}: the adapter does not fit this model "
                         f"(no weights for {missing[:3]}, weights for unknown layers {extra[:3]})")
    with torch.no_grad():
        for name, layer in layers.items():
            for part in _PARTS:
                target, value = getattr(layer, part), weights[name][part]
                if target.shape != value.shape:
                    raise ValueError(f"{directory}: {name}.{part} has shape {tuple(value.shape)}, "
                                     f"the model needs {tuple(target.shape)}")
                target.copy_(value)
    return spec
