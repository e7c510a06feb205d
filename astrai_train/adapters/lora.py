"""The LoRA layer: a frozen nn.Linear plus a trainable low-rank update, y = x W^T + b + s B A x.

The model's code reads projection weights as tensors (`F.linear(x, proj.weight)`, the serving
engine's `ops.linear(x, proj.weight)`) instead of calling the modules, so the layer has to work
through `.weight` and not only through `forward`:

- training (grad enabled): `.weight` is a `LowRankWeight`, an alias of the base weight whose
  `F.linear(x, w)` computes x W^T + s (dropout(x) A^T) B^T. That is LoRA's cost: no [out, in]
  weight gradient, no merged copy kept for backward, only x A^T saved beside x. Any other use of
  the tensor (a reshape, a concatenation) gets the merged weight W + s B A instead, so it is
  never silently wrong, only slower.
- inference (no grad: the GRPO rollout engine, `generate`, validation): `.weight` is the merged
  W + s B A as a plain tensor, computed at each read (one addmm per layer). Kernels that take the
  raw pointer (Triton GEMV, CUDA graphs) then see the adapted weights; under a CUDA graph the
  addmm is captured too and replays with the live A and B.
- adapters disabled (`disable_adapters`, the DPO/GRPO reference): `.weight` is the base weight.

The base weight stays registered as the `weight` parameter, so state-dict names are those of the
model without LoRA plus `lora_A` / `lora_B` beside each adapted weight.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map_only


class LoRALinear(nn.Module):
    """Wraps `base` (an nn.Linear) in place of it: base weight and bias frozen, A [r, in] random
    (kaiming-uniform, as PEFT), B [out, r] zero, so the wrapped model starts equal to the base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.scaling = self.alpha / rank
        self.adapters_enabled = True
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        w = base.weight
        # Adapters of a bf16/fp16 base are kept in fp32, as PEFT does (autocast_adapter_dtype): the
        # optimizer updates them, and their small steps would round away in 8 mantissa bits.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=dtype))
        if not w.is_meta:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    # `weight` is a property over the registered parameter: reading it picks the view above.
    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        base = self.__dict__["_parameters"].get("weight")
        if base is None:  # only while __init__ registers it (register_parameter asks hasattr first)
            raise AttributeError("weight")
        try:
            if not self.adapters_enabled:
                return base
            if torch.is_grad_enabled():
                return LowRankWeight.of(self)
            return self.merged_weight()
        except AttributeError as err:
            # An AttributeError escaping a property makes nn.Module.__getattr__ answer instead,
            # with the bare base weight: a wrong result with no error. Make it loud.
            raise RuntimeError(f"LoRA layer weight: {err}") from err

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight" and "weight" in self.__dict__.get("_parameters", {}):
            # fusion.fuse_projections re-assigns weights as views of a fused tensor: that would
            # bake the adapter in once and then add it again on top.
            raise RuntimeError("a LoRA layer's weight cannot be replaced (fusing projections for inference?): "
                               "merge the adapters first (astrai_train.adapters.merge_lora)")
        super().__setattr__(name, value)

    def base_weight(self) -> torch.Tensor:
        return self._parameters["weight"]

    def delta(self) -> torch.Tensor:
        """s B A, [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + s B A in the base weight's dtype (differentiable when grad is enabled)."""
        base = self._parameters["weight"]
        # One kernel, no separate [out, in] delta; it accumulates in fp32 and rounds once.
        return torch.addmm(base, self.lora_B.to(base.dtype), self.lora_A.to(base.dtype), alpha=self.scaling)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, self._parameters["weight"], bias)
        if not self.adapters_enabled:
            return y
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        a = self.lora_A   # (under autocast F.linear casts anyway; without it x may be bf16 and A fp32)
        return y + (F.linear(F.linear(h.to(a.dtype), a), self.lora_B) * self.scaling).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}")


class LowRankWeight(torch.Tensor):
    """An alias of a LoRA layer's base weight, handed out by `.weight` while grad is enabled.

    `F.linear(x, w[, b])` runs the layer's low-rank forward. Metadata reads (shape, dtype, device)
    answer from the base weight; every other function receives the merged weight W + s B A.
    """

    _layer: LoRALinear

    @staticmethod
    def of(layer: LoRALinear) -> "LowRankWeight":
        w = layer.base_weight().detach().as_subclass(LowRankWeight)
        w._layer = layer
        return w

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and type(args[1]) is cls and type(args[0]) is not cls:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return args[1]._layer.linear(args[0], bias)
        if getattr(func, "__name__", None) == "__get__":   # a property: .shape, .dtype, .device, ...
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map_only(cls, lambda w: w._layer.merged_weight(), (args, kwargs))
        return func(*args, **kwargs)
