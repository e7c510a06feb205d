"""Attention layers. Each has two entry points over the same weights:

- `forward(x[B,T,D], cos, sin)`: training, causal SDPA over the whole sequence, no cache.
- `forward_flat(x[N,D], cos, sin, attn, layer)`: inference over a flattened batch of new tokens;
  the backend (see backend.py) stores K/V and attends each token to its own sequence's past.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backend import AttentionBackend, KVLayout, Linear
from .config import ModelConfig
from .inference_ops import TORCH_OPS, InferenceOps
from .layers import RMSNorm, apply_rope


def kv_layout(config: ModelConfig) -> KVLayout:
    """What the KV cache holds per layer and token for this model."""
    if config.attention == "mla":
        # Absorbed MLA: one shared "head" = [latent, rotary key]; the value is the latent.
        return KVLayout(n_kv=1, k_dim=config.kv_lora_rank + config.qk_rope_head_dim,
                        v_dim=config.kv_lora_rank, value_in_key=True)
    hd = config.resolved_head_dim
    return KVLayout(n_kv=config.n_kv_heads, k_dim=hd, v_dim=hd, value_in_key=False)


class _Gate(nn.Module):
    """Gated attention: out * sigmoid(x W_g), per head and channel, before the output projection."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.g_proj = nn.Linear(dim, width, bias=False)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out * torch.sigmoid(self.g_proj(x))


class GQAAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hd = config.resolved_head_dim
        self.n_heads, self.n_kv, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.scale = 1.0 / math.sqrt(hd)
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.dim, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(config.dim, self.n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(config.dim, self.n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, config.dim, bias=False)
        self.q_norm = RMSNorm(hd, config.norm_eps) if config.use_qk_norm else None
        self.k_norm = RMSNorm(hd, config.norm_eps) if config.use_qk_norm else None
        self.gate = _Gate(config.dim, self.n_heads * hd) if config.use_gated_attention else None
        # Set by fusion.fuse_projections (inference): q|k|v weights [nq + 2 nk, dim] and, with
        # qkv_bias, their biases concatenated the same way.
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ops: InferenceOps = TORCH_OPS):
        lead, linear = x.shape[:-1], ops.linear
        if self.qkv_weight is not None and not torch.is_grad_enabled():
            # One matmul; gradients would reach only the fused tensor, so training never takes it.
            nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            qkv = linear(x, self.qkv_weight)
            if self.qkv_bias is not None:   # added after the matmul: ops.linear has no bias
                qkv = qkv + self.qkv_bias
            q, k, v = qkv.split([nq, nk, nk], dim=-1)
        else:
            q, k, v = (self._project(linear, x, p) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(*lead, self.n_heads, self.head_dim)
        k = k.view(*lead, self.n_kv, self.head_dim)
        v = v.view(*lead, self.n_kv, self.head_dim)
        q, k = ops.qk_norm_rope(q, k, self.q_norm, self.k_norm, cos, sin)
        return q, k, v

    @staticmethod
    def _project(linear: Linear, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        y = linear(x, proj.weight)
        return y if proj.bias is None else y + proj.bias

    def _out(self, x: torch.Tensor, o: torch.Tensor, linear: Linear = F.linear) -> torch.Tensor:
        o = o.reshape(*x.shape[:-1], self.n_heads * self.head_dim)
        if self.gate is not None:
            o = self.gate(x, o)
        return linear(o, self.o_proj.weight)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=self.scale,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self._out(x, o.transpose(1, 2))

    def forward_flat(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     attn: AttentionBackend, layer: int, ops: InferenceOps = TORCH_OPS) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin, ops)
        return self._out(x, attn.attend(layer, q, k, v, self.scale), ops.linear)


class MLAAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 style, no query compression).

    Keys and values come from a shared latent c = norm(x W_a) of width kv_lora_rank, expanded
    per head by W_b; a small rotary key part is shared by all heads. Training expands the latent
    (plain SDPA). Inference absorbs W_b into the query and output side, so the cache stores only
    [c, k_rope] per token and attention runs as one shared KV "head".
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.r, self.dn, self.dr, self.dv = (config.kv_lora_rank, config.qk_nope_head_dim,
                                             config.qk_rope_head_dim, config.v_head_dim)
        self.scale = 1.0 / math.sqrt(self.dn + self.dr)
        self.q_proj = nn.Linear(config.dim, self.n_heads * (self.dn + self.dr), bias=False)
        self.kv_a_proj = nn.Linear(config.dim, self.r + self.dr, bias=False)
        self.kv_a_norm = RMSNorm(self.r, config.norm_eps)
        self.kv_b_proj = nn.Linear(self.r, self.n_heads * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.dv, config.dim, bias=False)
        self.gate = _Gate(config.dim, self.n_heads * self.dv) if config.use_gated_attention else None

    def _q_and_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.n_heads, self.dn + self.dr)
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)
        c, k_rope = self.kv_a_proj(x).split([self.r, self.dr], dim=-1)
        c = self.kv_a_norm(c)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.unsqueeze(-2), cos, sin)  # [..., 1, dr]
        return q_nope, q_rope, c, k_rope

    def _out(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        o = o.reshape(*x.shape[:-1], self.n_heads * self.dv)
        if self.gate is not None:
            o = self.gate(x, o)
        return self.o_proj(o)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q_nope, q_rope, c, k_rope = self._q_and_latent(x, cos, sin)
        kv = self.kv_b_proj(c).view(*c.shape[:-1], self.n_heads, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(*k_nope.shape[:-1], self.dr)), dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=self.scale)
        return self._out(x, o.transpose(1, 2))

    def forward_flat(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     attn: AttentionBackend, layer: int, ops: InferenceOps = TORCH_OPS) -> torch.Tensor:
        # (MLA keeps its module calls: its projections are not the batch-1 bottleneck measured)
        q_nope, q_rope, c, k_rope = self._q_and_latent(x, cos, sin)
        w = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.r)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]
        q_latent = torch.einsum("nhd,hdr->nhr", q_nope, w_uk)
        q = torch.cat((q_latent, q_rope), dim=-1)           # [N, H, r + dr]
        key = torch.cat((c.unsqueeze(-2), k_rope), dim=-1)  # [N, 1, r + dr]
        o_latent = attn.attend(layer, q, key, None, self.scale)  # [N, H, r]
        return self._out(x, torch.einsum("nhr,hvr->nhv", o_latent, w_uv))
