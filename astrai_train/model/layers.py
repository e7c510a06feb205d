"""Small building blocks: RMSNorm, rotary position embeddings, the SwiGLU MLP."""
from __future__ import annotations

import math

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


def rope_inv_freq(rope_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                  original_max_len: int = 0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
                  attention_factor: float | None = None, device: torch.device | str | None = None
                  ) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rope_dim // 2], the constant cos/sin are multiplied by).

    Every scaling here is a function of the config alone, never of the sequence length, so the
    tables are built once and a serving engine gathers rows by position. The float32 arithmetic
    follows transformers' rope init functions step for step so tables match HF's to the last bits.
    """
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.int64, device=device).float() / rope_dim
    inv_freq = 1.0 / (theta ** exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":   # positions divided by factor == frequencies divided by it
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        # Llama 3.1: long wavelengths (beyond original/low) slowed by `factor`, short ones (below
        # original/high) kept, a linear blend in 1/wavelength between them.
        low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled), 1.0
    if rope_type == "yarn":
        # YaRN: dims that turn fewer than beta_slow times over the original context interpolate
        # (divided by factor), those turning more than beta_fast times extrapolate (kept), a
        # linear ramp over dim index between; attention_factor compensates the softmax entropy.
        def dim_of(rotations: float) -> float:
            return rope_dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(beta_fast), dim_of(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rope_dim - 1)
        if low == high:
            high += 0.001   # a ramp of zero width would divide by zero
        pos_freqs = theta ** (torch.arange(0, rope_dim, 2, device=device).float() / rope_dim)
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
        if attention_factor is None:
            attention_factor = yarn_mscale(factor)
        return inv_freq, attention_factor
    raise ValueError(f"unknown rope_type {rope_type!r}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 * mscale * ln(factor) + 1 (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_tables(rope_dim: int, max_len: int, theta: float, device: torch.device | str | None = None,
                **scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [max_len, rope_dim], in the half-split layout ([f0..fk, f0..fk]).

    `scaling`: rope_inv_freq's keyword arguments (rope_type, factor, ...); none: plain RoPE."""
    inv_freq, attention_factor = rope_inv_freq(rope_dim, theta, device=device, **scaling)
    pos = torch.arange(max_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


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
