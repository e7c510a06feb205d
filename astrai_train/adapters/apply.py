"""Putting LoRA layers into a model, switching them off, and taking them out again.

Layers are found by the last part of their module name, as PEFT's `target_modules` names them
(`q_proj`, `down_proj`, ...), so the same list means the same layers here and in PEFT. Wrapping
happens from outside the model: each matching nn.Linear child is replaced by a LoRALinear holding
the very same weight tensor, so nothing is copied and the model's code is unchanged.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .lora import LoRALinear

# Every projection of attention and MLP, by their HF/PEFT names (a recipe's lora.target_modules default).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_WRAPPED = "_checkpoint_wrapped_module."  # activation checkpointing's wrapper in module names


@dataclass(frozen=True)
class AdapterSpec:
    """What a set of LoRA adapters is: PEFT's r, lora_alpha, lora_dropout and target_modules."""

    rank: int                                   # r
    alpha: float                                # lora_alpha: the update is scaled by alpha / rank
    dropout: float = 0.0                        # lora_dropout on the adapter's input while training
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # leaf names of the adapted Linear layers


def clean_name(name: str) -> str:
    return name.replace(_WRAPPED, "")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name (as in the model without wrappers) -> its LoRA layer."""
    return {clean_name(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _check_unfused(model: nn.Module) -> None:
    # fusion.fuse_projections makes q|k|v and gate|up one tensor that inference reads instead of the
    # separate weights: an adapter on q_proj would not be seen there.
    for name, module in model.named_modules():
        if getattr(module, "qkv_weight", None) is not None or getattr(module, "gate_up_weight", None) is not None:
            raise ValueError(f"{name or 'the model'} has fused projections (fusion.fuse_projections, for inference): "
                             "apply LoRA to an unfused model")


def apply_lora(model: nn.Module, spec: AdapterSpec) -> dict[str, LoRALinear]:
    """Freeze every parameter of `model` and wrap the target Linear layers in LoRA layers, in place.
    Returns the new layers by name. As in PEFT, a target may match nothing (the default list names
    gate/up/down_proj, which a mixture-of-experts model keeps as stacked expert tensors, not
    Linear layers: those stay frozen), but a list that matches no layer at all is a ValueError."""
    if has_lora(model):
        raise ValueError("the model has LoRA layers already")
    targets = tuple(spec.target_modules)
    if not targets:
        raise ValueError("lora.target_modules is empty: name at least one Linear layer")
    _check_unfused(model)
    found: list[tuple[nn.Module, str, str, nn.Linear]] = []
    linear_leaves: set[str] = set()
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is nn.Linear:
                linear_leaves.add(child_name)
                if child_name in targets:
                    full = f"{parent_name}.{child_name}" if parent_name else child_name
                    found.append((parent, child_name, clean_name(full), child))
    if not found:
        raise ValueError(f"lora.target_modules={list(targets)} matches no Linear layer of this model "
                         f"(its Linear layers: {', '.join(sorted(linear_leaves))})")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for parent, child_name, full, child in found:
        layer = LoRALinear(child, spec.rank, spec.alpha, spec.dropout)
        setattr(parent, child_name, layer)
        layers[full] = layer
    return layers


def adapter_spec(model: nn.Module) -> AdapterSpec:
    """The spec of the LoRA layers in `model` (one rank/alpha/dropout for all of them)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = next(iter(layers.values()))
    if any((m.rank, m.alpha, m.dropout) != (first.rank, first.alpha, first.dropout) for m in layers.values()):
        raise ValueError("the model's LoRA layers differ in rank, alpha or dropout")
    targets = tuple(sorted({name.rpartition(".")[2] for name in layers}))
    return AdapterSpec(first.rank, first.alpha, first.dropout, targets)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes with its base weights only (the adapters stay in place)."""
    layers = list(lora_layers(model).values())
    before = [m.adapters_enabled for m in layers]
    for m in layers:
        m.adapters_enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.adapters_enabled = was


def _replace(model: nn.Module, merge: bool) -> nn.Module:
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, LoRALinear):
                continue
            base = child.base_weight()
            with torch.no_grad():
                # Summed in fp32 (a bf16 base would round the small update away); for an fp32 base
                # the very arithmetic of LoRALinear.merged_weight, so merged == what inference saw.
                weight = torch.addmm(base.float(), child.lora_B.float(), child.lora_A.float(),
                                     alpha=child.scaling).to(base.dtype) if merge and child.adapters_enabled \
                    else base.detach()
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
            setattr(parent, child_name, linear)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain nn.Linear with weight W + s B A (summed in fp32), in place."""
    return _replace(model, merge=True)


def remove_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain nn.Linear with its base weight, dropping the adapters."""
    return _replace(model, merge=False)
