"""The frozen reference policy DPO and GRPO measure drift against.

Held outside the LightningModule's submodules on purpose: it is not trained, so it must not be in
the optimizer, in DDP's gradient buckets, or (at full size again) in every checkpoint. It is
rebuilt deterministically on resume: from its model directory, or as a copy of the policy taken
at construction, which the seeded build makes identical run after run.

A policy trained with LoRA needs no copy: its base weights are frozen, so the reference is the
policy itself with the adapters switched off for the forward (`AdaptersOff`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from astrai_train.adapters import disable_adapters, has_lora
from astrai_train.model import Transformer


class FrozenReference:
    def __init__(self, model: nn.Module) -> None:
        model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model

    @classmethod
    def copy_of(cls, policy: nn.Module) -> "FrozenReference":
        return cls(copy.deepcopy(policy))

    @classmethod
    def from_dir(cls, directory: str) -> "FrozenReference":
        return cls(Transformer.from_pretrained(directory))

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "FrozenReference":
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


class AdaptersOff:
    """The reference of a LoRA policy: the policy's own frozen base weights, adapters off."""

    def __init__(self, policy: nn.Module) -> None:
        self.model = policy

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "AdaptersOff":
        return self  # it is the policy: it lives where the policy lives

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        with disable_adapters(self.model):
            return self.model(input_ids)


def reference_of(policy: nn.Module) -> FrozenReference | AdaptersOff:
    """The policy's starting point: its base with adapters off under LoRA, else a frozen copy."""
    return AdaptersOff(policy) if has_lora(policy) else FrozenReference.copy_of(policy)
