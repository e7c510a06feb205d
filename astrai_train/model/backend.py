"""The contract between the model and whoever owns its K/V storage.

Training runs `Transformer.forward(input_ids)` with causal SDPA and no cache. Inference runs
`Transformer.forward_flat(input_ids, positions, attn)`: a flattened batch of N new tokens
(from any number of sequences, each contributing any number of tokens) plus an
`AttentionBackend` that carries the step's metadata (which sequence each token belongs to,
where its K/V go, how long each context is) and the storage itself. The model's math is the
same either way; only where keys and values come from changes.

The backend contract is one call per layer:

    out = attn.attend(layer, q, k, v, scale)

    q:     [N, n_heads, Dk]      queries of the new tokens (RoPE and QK-norm already applied)
    k:     [N, n_kv, Dk]         keys of the new tokens (RoPE applied)
    v:     [N, n_kv, Dv] | None  values of the new tokens; None means "the value is the first
                                 Dv channels of the key" (MLA: key = [latent, rope part],
                                 value = latent), so the cache stores the key alone
    scale: float                 softmax scale
    out:   [N, n_heads, Dv]

The backend writes k (and v) into its storage at each token's slot, then attends every new
token to all keys of its own sequence at positions <= its own. GQA layers have
n_kv = n_kv_heads, Dk = Dv = head_dim. MLA layers, in their absorbed form, are one shared
"head" of Dk = kv_lora_rank + qk_rope_head_dim and Dv = kv_lora_rank: that is all the cache
holds per token, which is the point of MLA.

`kv_layout(config)` tells a backend what to allocate per layer and token.

`forward_flat` also takes `ops` (inference_ops.InferenceOps: the projections, SwiGLU's activation,
QK-norm + rotary; torch by default): a serving engine may pass faster kernels for its small
decode batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # y = x @ weight.T, as F.linear without bias


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
               scale: float) -> torch.Tensor: ...


@dataclass(frozen=True)
class KVLayout:
    """Per layer and token: n_kv heads of a key of k_dim channels and (unless value_in_key) a value of v_dim."""

    n_kv: int
    k_dim: int
    v_dim: int
    value_in_key: bool  # True for MLA: the value is key[..., :v_dim] and no value tensor is stored

    def bytes_per_token(self, n_layers: int, dtype: torch.dtype) -> int:
        per_layer = self.n_kv * (self.k_dim + (0 if self.value_in_key else self.v_dim))
        return per_layer * n_layers * torch.empty((), dtype=dtype).element_size()
