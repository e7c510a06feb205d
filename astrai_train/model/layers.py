"""Small building blocks: RMSNorm, rotary position embeddings, the SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 squares lose too much), scale in the input dtype as HF does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(rope_dim: int, max_len: int, theta: float, device: torch.device | str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [max_len, rope_dim], in the half-split layout ([f0..fk, f0..fk])."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.int64, device=device).float() / rope_dim))
    pos = torch.arange(max_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., tokens, heads, d] with cos/sin [..., tokens, d] gathered at its positions."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_up_weight: torch.Tensor | None = None   # set by fusion.fuse_projections (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None and not torch.is_grad_enabled():
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)   # one matmul for both
        else:
            gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)

    def forward_flat(self, x: torch.Tensor, ops) -> torch.Tensor:
        """Inference through `ops` (an inference_ops.InferenceOps): its kernels may merge launches."""
        if self.gate_up_weight is not None and not torch.is_grad_enabled():
            return ops.silu_mul_linear(ops.linear(x, self.gate_up_weight), self.down_proj.weight)
        gate, up = ops.linear(x, self.gate_proj.weight), ops.linear(x, self.up_proj.weight)
        return ops.linear(F.silu(gate) * up, self.down_proj.weight)
